"""Issue 14 acceptance: a supervisor that is SIGKILLed loses no service and no line.

Services' stdout and stderr are pipes; the keeper (docs/keeper.md) holds
duplicates of them, so a service that prints keeps running while no
supervisor does, what it prints meanwhile reaches its log, and the next
supervisor takes the pipes back.  Each test checks the log files themselves:
every number a service printed, exactly once, in order.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import psutil

from helpers import SLEEP, Supervisor, pid_alive, py_service, reexec, sleeper, wait_until
from test_lifecycle_recovery import crash, daemon_events, restart, wait_running

#: Prints "N" (argv[2]: "line" → "N\n"; "partial" → "N " with a newline
#: after every 7th number; "big" → "N:" + 1 MiB of "x" + "\n") every argv[3] s.
COUNTER = r"""
import sys, time
how, pause = sys.argv[2], float(sys.argv[3])
out = sys.stdout
i = 0
while True:
    if how == "line":
        out.write(f"{i}\n")
    elif how == "partial":
        out.write(f"{i} " + ("\n" if i % 7 == 6 else ""))
    else:
        out.write(f"{i}:" + "x" * (1 << 20) + "\n")
    out.flush()
    i += 1
    time.sleep(pause)
"""

BIG = 1 << 20


def counter(sup: Supervisor, name: str, how: str = "line", pause: float = 0.01, **keys: object) -> dict:
    return py_service(COUNTER, sup.marker(name), how, str(pause), **keys)


def log_files(sup: Supervisor, name: str) -> list[Path]:
    """NAME.log.K … NAME.log.1, NAME.log: oldest first."""
    base = sup.log_file(name)
    backups = sorted(((int(m.group(1)), p) for p in base.parent.iterdir()
                      if (m := re.fullmatch(re.escape(base.name) + r"\.(\d+)", p.name))), reverse=True)
    return [p for _, p in backups] + ([base] if base.exists() else [])


def stdout_text(sup: Supervisor, name: str) -> str:
    """Everything the service printed, as its log files hold it (pieces of a
    line cut or interrupted in the file joined again)."""
    out: list[str] = []
    for path in log_files(sup, name):
        for _stamp, stream, text in sup.log_lines(name, path):
            if stream == "stdout":
                out.append(text + "\n")
    return "".join(out)


def numbers(sup: Supervisor, name: str, how: str = "line") -> list[int]:
    """The numbers in the log, in order (the last one may be unfinished: dropped)."""
    text = stdout_text(sup, name)
    if how == "big":
        # "N:xxx…" cut into 64 KiB pieces: join them again
        joined = text.replace("\n", "")
        found = re.findall(r"(\d+):(x*)", joined)
        complete = [(int(n), len(xs)) for n, xs in found[:-1]]
        bad = [(n, size) for n, size in complete if size != BIG]
        assert not bad, f"{name}: lines of the wrong length (number, length): {bad[:5]}"
        return [n for n, _ in complete]
    if how == "partial":
        return [int(t) for t in text.replace("\n", "").split()[:-1]]
    return [int(t) for t in text.split("\n")[:-2]]


def assert_every_number_once(sup: Supervisor, name: str, how: str = "line", in_flight: int = 0) -> list[int]:
    """Every number once, in order.  `in_flight`: how many may be missing —
    the bytes a process had read but not yet written when it was SIGKILLed
    (docs/keeper.md, "What can still be lost"); never a duplicate."""
    got = numbers(sup, name, how)
    assert got, f"{name}: nothing in the log"
    expected = list(range(got[-1] + 1))
    seen = set(got)
    lost = [n for n in expected if n not in seen]
    if got == sorted(seen) and len(lost) <= in_flight:
        return got
    if got != expected:
        seen = set(got)
        missing = [n for n in expected if n not in seen]
        dups = len(got) - len(seen)
        first_bad = next(i for i, (a, b) in enumerate(zip(got + [-1] * len(expected), expected)) if a != b)
        raise AssertionError(f"{name}: {len(got)} numbers, {len(missing)} missing (first: {missing[:5]}), "
                             f"{dups} duplicated, first difference at index {first_bad}: "
                             f"{got[max(0, first_bad - 3):first_bad + 3]}")
    return got


def wait_printed(sup: Supervisor, names: list[str], beyond: dict[str, int], how: str = "line",
                 timeout: float = 30.0) -> None:
    """Until each service's log shows numbers beyond `beyond[name]`."""
    def done() -> bool:
        return all((got := numbers(sup, n, how)) and got[-1] > beyond.get(n, 0) for n in names)

    wait_until(done, timeout, f"{names} to print on")


def last_numbers(sup: Supervisor, names: list[str], how: str = "line") -> dict[str, int]:
    return {n: (numbers(sup, n, how) or [0])[-1] for n in names}


def keeper_pids(sup: Supervisor) -> set[int]:
    """The keeper processes of this test (their parent may be init after a crash)."""
    found = set()
    for p in psutil.process_iter(["cmdline", "environ"]):
        try:
            cmd = p.info["cmdline"] or []
            if any(c.endswith("supervisor/_keeper.py") for c in cmd) and \
                    (p.info["environ"] or {}).get("SVTEST_TOKEN") == sup.token:
                found.add(p.pid)
        except psutil.Error:
            continue
    return found


# --------------------------------------------------------------------------


def test_sigkill_of_the_supervisor_loses_no_line_of_twenty_services(sup: Supervisor) -> None:
    names = [f"w{i:02d}" for i in range(20)]
    services = {n: counter(sup, n) for n in names}
    # one of them rotates its log all the time: the keeper rotates it too
    services["w00"] = counter(sup, "w00", **{"log-max-size": 2000, "log-max-backups": 1000})
    sup.start({"services": services})
    pids = wait_running(sup, names)
    wait_printed(sup, names, {n: 20 for n in names})

    crash(sup)
    time.sleep(5)  # the scenario: five seconds without a supervisor
    assert all(pid_alive(pid) for pid in pids.values()), "a service died while no supervisor ran"
    during = last_numbers(sup, names)
    assert all(during[n] > 300 for n in names), f"the keeper did not write while we were down: {during}"
    restart(sup)

    assert wait_running(sup, names) == pids, "a service was replaced"
    wait_printed(sup, names, {n: during[n] + 50 for n in names})
    for name in names:
        assert_every_number_once(sup, name, in_flight=1)
    assert len(log_files(sup, "w00")) > 5, "w00's log did not rotate"
    st = sup.rstatus()
    assert all(st[n]["respawns"] == [] for n in names), "a service was respawned"


def test_sigkill_of_the_supervisor_with_mebibyte_lines(sup: Supervisor) -> None:
    big = {"log-max-size": 0}
    sup.start({"services": {"big": counter(sup, "big", "big", 0.1, **big)}})
    pids = wait_running(sup, ["big"])
    wait_printed(sup, ["big"], {"big": 3}, "big")

    crash(sup)
    time.sleep(5)
    during = last_numbers(sup, ["big"], "big")
    assert during["big"] > 20, f"the keeper did not write while we were down: {during}"
    restart(sup)

    assert wait_running(sup, ["big"]) == pids
    wait_printed(sup, ["big"], {"big": during["big"] + 10}, "big")
    assert_every_number_once(sup, "big", "big")


def test_sigkill_of_the_supervisor_amid_partial_lines(sup: Supervisor) -> None:
    names = ["p1", "p2", "p3"]
    sup.start({"services": {n: counter(sup, n, "partial", 0.003) for n in names}})
    pids = wait_running(sup, names)
    wait_printed(sup, names, {n: 20 for n in names}, "partial")

    for _ in range(3):  # each crash lands amid unfinished lines
        at_crash = last_numbers(sup, names, "partial")
        crash(sup)
        wait_printed(sup, names, at_crash, "partial")  # the keeper writes while no supervisor runs
        restart(sup)
        assert wait_running(sup, names) == pids
        wait_printed(sup, names, last_numbers(sup, names, "partial"), "partial")
    for name in names:
        assert_every_number_once(sup, name, "partial", in_flight=3)
    # a line cut by the crash is completed in the file, never repeated (what
    # was in flight at the crash may be missing: counted above)
    for name in names:
        for _stamp, stream, text in sup.log_lines(name):
            if stream == "stdout" and text.strip():
                words = [int(w) for w in text.split()]
                assert words == sorted(set(words)), text


def test_sigkill_of_the_keeper_loses_nothing(sup: Supervisor) -> None:
    names = ["k1", "k2"]
    sup.start({"services": {n: counter(sup, n) for n in names}})
    pids = wait_running(sup, names)
    wait_printed(sup, names, {n: 20 for n in names})
    (first,) = wait_until(lambda: keeper_pids(sup) or None, 10, "the keeper to run")

    psutil.Process(first).kill()
    second = wait_until(lambda: (k := keeper_pids(sup) - {first}) and k, 10, "a new keeper")
    assert len(second) == 1, second
    assert all(pid_alive(pid) for pid in pids.values())
    # the new keeper holds the pipes: a crash of the supervisor now loses nothing either
    at_crash = last_numbers(sup, names)
    crash(sup)
    wait_printed(sup, names, {n: at_crash[n] + 50 for n in names})  # the new keeper writes meanwhile
    assert all(pid_alive(pid) for pid in pids.values()), "a service died while no supervisor ran"
    during = last_numbers(sup, names)
    restart(sup)
    assert wait_running(sup, names) == pids
    wait_printed(sup, names, {n: during[n] + 50 for n in names})
    for name in names:
        assert_every_number_once(sup, name)
    assert keeper_pids(sup) == second, "the restarted supervisor did not keep the keeper"


def crash_with_the_keeper(sup: Supervisor) -> None:
    """SIGKILL the supervisor and its keeper at the same instant (back to back)."""
    keepers = wait_until(lambda: keeper_pids(sup) or None, 10, "the keeper to run")
    sup.send_signal(signal.SIGKILL)
    for pid in keepers:
        os.kill(pid, signal.SIGKILL)
    sup.wait_exit(10)
    wait_until(lambda: not any(pid_alive(k) for k in keepers), 10, "the keeper to be gone")


def test_sigkill_of_the_supervisor_and_the_keeper_together(sup: Supervisor) -> None:
    """Each service holds its own pipes' read ends (docs/keeper.md, "The
    guard"): with no supervisor and no keeper, no service dies of SIGPIPE,
    what they print waits in their pipes, and the next supervisor takes the
    pipes back from the services themselves."""
    names = ["g1", "g2", "g3"]
    # g3 has a listening socket: its guards come after it
    services = {n: counter(sup, n) for n in names}
    services["g3"]["sockets"] = [{"path": str(sup.tmp / "g3.sock")}]
    sup.start({"services": services})
    pids = wait_running(sup, names)
    wait_printed(sup, names, {n: 20 for n in names})

    crash_with_the_keeper(sup)
    time.sleep(2)  # the scenario: two seconds with neither (about 200 lines each)
    assert all(pid_alive(pid) for pid in pids.values()), "a service died while nothing read its pipes"
    at_restart = last_numbers(sup, names)
    restart(sup)

    assert wait_running(sup, names) == pids, "a service was replaced"
    wait_printed(sup, names, {n: at_restart[n] + 250 for n in names})  # beyond what waited in the pipe
    for name in names:  # lost: at most what a killed process had read and not yet written
        assert_every_number_once(sup, name, in_flight=2)
    st = sup.rstatus()
    assert all(st[n]["respawns"] == [] for n in names), "a service was respawned"
    # the new keeper holds them: a crash of the supervisor alone now loses nothing
    during = last_numbers(sup, names)
    crash(sup)
    wait_printed(sup, names, {n: during[n] + 50 for n in names})
    restart(sup)
    assert wait_running(sup, names) == pids


#: Closes every descriptor above 2 (as many daemons do), then prints "N"
#: every 10 ms, or (argv[2] == "signal") once and then on every SIGUSR1, or
#: ("mute") once and then sends its stdout and stderr to /dev/null.
CLOSER = r"""
import os, signal, sys, time
os.closerange(3, 1 << 16)
i = 0
def say(*_):
    global i
    print(i, flush=True)
    i += 1
if sys.argv[2] in ("signal", "mute"):
    signal.signal(signal.SIGUSR1, say)
    say()
    if sys.argv[2] == "mute":
        null = os.open("/dev/null", os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
    while True:
        signal.pause()
while True:
    say()
    time.sleep(0.01)
"""


def test_a_service_that_closed_its_guard(sup: Supervisor) -> None:
    """A service that closes every descriptor above 2 runs as any other.
    After a SIGKILL of the supervisor and the keeper together, one that
    printed meanwhile has died of SIGPIPE and is started again; one that
    stayed silent still writes to its pipe as stdout: the next supervisor
    takes it from there; one that has the pipe nowhere any more is named
    in a warning."""
    names = ["loud", "quiet", "mute"]
    sup.start({"services": {n: py_service(CLOSER, sup.marker(n), how)
                            for n, how in zip(names, ["loop", "signal", "mute"])}})
    pids = wait_running(sup, names)
    wait_printed(sup, ["loud"], {"loud": 20})
    for name in ("quiet", "mute"):
        wait_until(lambda: stdout_text(sup, name) == "0\n", 10, f"{name}'s first line")

    crash_with_the_keeper(sup)
    wait_until(lambda: not pid_alive(pids["loud"]), 10, "loud to die of SIGPIPE")
    restart(sup)

    now = wait_until(lambda: (p := wait_running(sup, names))["loud"] != pids["loud"] and p, 15, "loud to run again")
    assert (now["quiet"], now["mute"]) == (pids["quiet"], pids["mute"]), "a silent service was replaced"
    warned = [e for e in daemon_events(sup) if e["event"].startswith("output pipes not recovered")]
    assert [e.get("service") for e in warned] == ["mute"], warned
    wait_until(lambda: any(t == "Service loud started (PID %d)." % now["loud"] for _, s, t in sup.log_lines("loud")
                           if s == "supervisor"), 10, "loud's new start in its log")
    for i in range(1, 4):
        os.kill(pids["quiet"], signal.SIGUSR1)
        wait_until(lambda: stdout_text(sup, "quiet").endswith(f"{i}\n"), 10, f"quiet's line {i}")
    assert stdout_text(sup, "quiet") == "0\n1\n2\n3\n"


def test_orderly_shutdown_ends_the_keeper(sup: Supervisor) -> None:
    sup.start({"services": {"one": counter(sup, "one", pause=0.1)}})
    wait_running(sup, ["one"])
    keepers = wait_until(lambda: keeper_pids(sup) or None, 10, "the keeper to run")
    assert sup.stop() == 0
    wait_until(lambda: not any(pid_alive(k) for k in keepers), 10, "the keeper to exit")
    assert not (sup.state_dir / "keeper" / "keeper.sock").exists()


def test_services_start_with_sigpipe_default_and_nothing_blocked(sup: Supervisor) -> None:
    """What a service inherits: whatever the supervisor (a Python program,
    which ignores SIGPIPE) had, SIGPIPE is at its default and no signal is
    blocked — so a service whose reader is gone dies as it would anywhere."""
    show = 'grep -E "^Sig(Blk|Ign):" /proc/self/status; exec "$0" 1000000'
    sup.start({"services": {"sig": {"command": ["/bin/sh", "-c", show, SLEEP]}}})
    wait_running(sup, ["sig"])
    masks = dict(wait_until(lambda: (found := [t.split(":") for _, s, t in sup.log_lines("sig")
                                               if s == "stdout" and t.startswith("Sig")]) and len(found) == 2
                            and found, 10, "the masks in the log"))
    assert int(masks["SigBlk"], 16) == 0, masks
    assert not int(masks["SigIgn"], 16) & (1 << (13 - 1)), f"SIGPIPE ignored: {masks}"


def test_a_reexec_of_three_hundred_services_keeps_its_keeper(sup: Supervisor) -> None:
    """The socket to the keeper buffers about 280 messages: the burst a
    re-exec sends (600 pipes put again) must wait for room, not replace the keeper."""
    names = [f"s{i:03d}" for i in range(300)]
    sup.start({"services": {n: sleeper(sup.marker(n)) for n in names}})
    wait_running(sup, names, timeout=120)
    (first,) = wait_until(lambda: keeper_pids(sup) or None, 10, "the keeper to run")
    reexec(sup, timeout=120)
    wait_running(sup, names, timeout=120)
    assert keeper_pids(sup) == {first}
    assert "does not keep up" not in sup.stderr_path.read_text()


def test_a_stopped_keeper_is_replaced_and_the_new_one_holds_every_pipe(sup: Supervisor) -> None:
    """A keeper that takes nothing (SIGSTOPped) is replaced within seconds
    once its queue is full, the daemon answering all along; the new keeper
    holds every pipe: a crash of the supervisor then loses no line."""
    names = ["k1", "k2"]
    extra = [f"x{i:03d}" for i in range(160)]  # 320 pipes put: more than the socket's buffer holds (~280)
    sup.start({"services": {**{n: counter(sup, n) for n in names},
                            **{x: sleeper(sup.marker(x), **{"auto-start": False}) for x in extra}}})
    pids = wait_running(sup, names)
    (first,) = wait_until(lambda: keeper_pids(sup) or None, 10, "the keeper to run")
    os.kill(first, signal.SIGSTOP)
    try:
        conn = sup.connect()
        for x in extra:
            assert conn.call("start", x, timeout=30)["ok"]
        assert conn.call("ping")["ok"]
        second = wait_until(lambda: (k := keeper_pids(sup) - {first}) and k, 20, "a new keeper")
    finally:
        if pid_alive(first):
            os.kill(first, signal.SIGCONT)
    assert "does not keep up" in sup.stderr_path.read_text()
    at_crash = last_numbers(sup, names)
    crash(sup)
    wait_printed(sup, names, {n: at_crash[n] + 30 for n in names})  # the new keeper writes meanwhile
    restart(sup)
    assert wait_running(sup, names) == pids
    for name in names:
        assert_every_number_once(sup, name)
    assert keeper_pids(sup) == second
