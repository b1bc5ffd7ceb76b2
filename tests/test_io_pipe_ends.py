"""A service's pipes reach their end when the service and all it left are gone.

The supervisor and the keeper hold only the read ends of a service's stdout
and stderr pipes (docs/keeper.md); each spawn gets new write ends.  So when
the service and whatever it left running are gone, the pipe reaches its
end: its last, unfinished line is ended (in the file and in `herd log`),
and nobody polls it any more, neither the supervisor nor, after a crash of
the supervisor, the keeper.  The next start reads the same pipe again.

Seen from outside: `herd log` (whole lines only), the log file, the
daemon's and the keeper's CPU time while idle (a reader spinning on a pipe
at its end would use a whole core: the bound is generous).
"""

from __future__ import annotations

import time
from pathlib import Path

import psutil

from helpers import Supervisor, wait_until
from test_lifecycle_crash import keeper_pids
from test_lifecycle_recovery import crash, restart

#: Seconds of idleness over which CPU time is measured, and the CPU time a
#: spinning reader would far exceed (a whole core: about IDLE).
IDLE = 2.0
SPIN = IDLE / 2

SH = "/bin/sh"


def ring(sup: Supervisor, name: str) -> list[tuple[str, str]]:
    """(stream, line) of the service's recent lines, as `herd log` has them."""
    rep = sup.request({"action": "log", "service": name, "args": [100]})
    assert rep.get("ok") is True, rep
    return [(e["stream"], e["line"]) for e in rep["result"]["lines"]]


def cpu_while_idle(pid: int) -> float:
    proc = psutil.Process(pid)
    before = sum(proc.cpu_times()[:2])
    time.sleep(IDLE)  # nothing to wait for: idleness is what is measured
    return sum(proc.cpu_times()[:2]) - before


def flagged(flag: Path, then: str) -> str:
    """A shell command: wait for `flag` to exist, then run `then`."""
    return f'while [ ! -e "{flag}" ]; do sleep 0.05; done; {then}'


def test_the_last_unfinished_line_and_a_left_over_writer_reach_the_log(sup: Supervisor) -> None:
    flag = sup.tmp / "go"
    sup.start({"services": {
        # exits at once, its last line unfinished
        "last": {"command": [SH, "-c", 'echo first; printf "no newline at the end"'], "respawn": False},
        # exits at once, leaving a process that writes on after it
        "leftover": {"command": [SH, "-c", "echo main; (" + flagged(flag, 'echo from-the-left-over; '
                                                                      'printf "left-over last"') + ") & exit 0"],
                     "respawn": False, "kill-mode": "process"},
    }})
    wait_until(lambda: ("stdout", "no newline at the end") in ring(sup, "last"), 20,
               "the unfinished last line in herd log")
    assert ring(sup, "last").count(("stdout", "first")) == 1
    assert ("stdout", "no newline at the end") in [line[1:] for line in sup.log_lines("last")]

    wait_until(lambda: sup.rstatus("leftover")["state"] == "stopped", 20, "leftover's main process to exit")
    flag.touch()
    wait_until(lambda: ("stdout", "left-over last") in ring(sup, "leftover"), 20,
               "the left-over process's lines in herd log")
    lines = [line for stream, line in ring(sup, "leftover") if stream == "stdout"]
    assert lines == ["main", "from-the-left-over", "left-over last"], lines

    # Every pipe is at its end now: nothing spins on it.
    assert sup.proc is not None
    used = cpu_while_idle(sup.proc.pid)
    assert used < SPIN, f"the supervisor used {used:.2f} s of CPU in {IDLE} s with nothing to do"

    # The next start reads the same pipe again.
    sup.herd("start", "last", check=True)
    wait_until(lambda: ring(sup, "last").count(("stdout", "no newline at the end")) == 2, 20,
               "the second run's lines in herd log")
    assert ring(sup, "last").count(("stdout", "first")) == 2


def test_the_keeper_ends_a_pipe_whose_writers_left_while_the_supervisor_was_down(sup: Supervisor) -> None:
    flag = sup.tmp / "go"
    sup.start({"services": {
        "svc": {"command": [SH, "-c", "echo before; " + flagged(flag, 'echo after; printf "tail"')],
                "respawn": False},
    }})
    wait_until(lambda: ("stdout", "before") in ring(sup, "svc"), 20, "the service's first line")
    keepers = wait_until(lambda: keeper_pids(sup) or None, 10, "the keeper to run")
    crash(sup)
    flag.touch()  # the service prints and exits while only the keeper reads
    wait_until(lambda: sup.log_file("svc").read_bytes().endswith(b" stdout tail\n"), 20,
               "the keeper to write the service's last line, ended")
    (keeper,) = keepers
    used = cpu_while_idle(keeper)
    assert used < SPIN, f"the keeper used {used:.2f} s of CPU in {IDLE} s with every pipe at its end"

    flag.unlink()  # the next run waits
    restart(sup)
    texts = [(stream, text) for _, stream, text in sup.log_lines("svc") if stream == "stdout"]
    assert texts[:3] == [("stdout", "before"), ("stdout", "after"), ("stdout", "tail")], texts
    sup.herd("restart", "svc", check=True)  # the pipe the keeper handed back is read again
    wait_until(lambda: [t for _, s, t in sup.log_lines("svc") if s == "stdout"].count("before") >= 2, 20,
               "the next run's first line")
