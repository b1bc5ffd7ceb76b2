"""Issue 15, items 5 and 8: open files, and a mass start that keeps answering.

The daemon is given the common soft open-files limit (1024) and must still
run hundreds of services, hand its children the limit it was given, keep
clients able to connect when its descriptor table is full, and say in one
line when the limit cannot cover the configuration.  During a mass start
`ping` and `status` are answered all along.

Seen from outside: service states, what a probe service reports about its
own limits, ``/proc/PID/fd`` and ``prlimit`` on the daemon, its log, and the
replies' latency (bounded generously: no wall-clock ceiling is tight).
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from supervisor._limits import BASE, PER_SERVICE
from supervisor._logfile import MAX_OPEN

from helpers import (
    PY_PROBE,
    SLEEP,
    Client,
    ConnectionClosed,
    Supervisor,
    base_env,
    crash,
    pid_alive,
    py_service,
    restart,
    wait_until,
)
from test_lifecycle_crash import keeper_pids

SOFT = 1024
HARD = resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def limited(soft: int, hard: int, *, raising: bool = True) -> Callable[[], None]:
    """For the daemon's process: an open-files limit; with `raising` False, and
    as root, without the capability to raise it (CAP_SYS_RESOURCE leaves the
    bounding set, so the exec drops it)."""
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        if not raising and os.geteuid() == 0:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_CAPBSET_DROP, _CAP_SYS_RESOURCE, 0, 0, 0)
    return apply


_PR_CAPBSET_DROP = 24
_CAP_SYS_RESOURCE = 24


def sleepers(n: int, prefix: str = "s") -> dict[str, dict[str, object]]:
    return {f"{prefix}{i:04d}": {"command": [SLEEP, str(1_000_000 + i)]} for i in range(n)}


def running(sup: Supervisor) -> int:
    return sum(1 for s in sup.rstatus().values() if s["state"] == "running")


def all_events(sup: Supervisor) -> list[dict[str, object]]:
    """The daemon's log (and the keeper's, on the same stderr), as JSON objects."""
    out = []
    for line in sup.stderr_path.read_text(errors="replace").splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and "event" in obj:
            out.append(obj)
    return out


def daemon_events(sup: Supervisor) -> list[str]:
    return [str(e["event"]) for e in all_events(sup)]


@pytest.mark.skipif(HARD < 4 * SOFT, reason=f"the hard open-files limit here ({HARD}) leaves nothing to raise")
def test_four_hundred_services_under_a_soft_limit_of_1024_and_children_keep_it(sup: Supervisor) -> None:
    # About 5 descriptors per service used to make the 201st fail.
    n = 400
    services = sleepers(n)
    services["probe"] = py_service(PY_PROBE, sup.marker("probe"))
    services["limited"] = py_service(PY_PROBE, sup.marker("limited"),
                                     **{"resource-limits": {"nofile": [256, 512]}})
    sup.start({"services": services}, preexec=limited(SOFT, HARD))

    wait_until(lambda: running(sup) == n + 2, 120, f"all {n + 2} services running")
    assert sup.probe("probe")["nofile"] == [SOFT, HARD]  # what the supervisor was given
    assert sup.probe("limited")["nofile"] == [256, 512]  # what resource-limits says
    fds = len(os.listdir(f"/proc/{sup.proc.pid}/fd"))  # type: ignore[union-attr]
    # what supervisor/_limits.py counts per service (PER_SERVICE), and no more
    assert fds < (PER_SERVICE + 1) * n, f"{fds} descriptors for {n} services"

    # A re-exec keeps the limit children get.
    sup.herd("reexec", "root", check=True)
    wait_until(lambda: "resumed after re-exec" in daemon_events(sup), 30, "the re-exec to complete")
    sup.herd("restart", "probe", check=True)
    reports = wait_until(lambda: (r := [t for _, _, t in sup.log_lines("probe") if t.startswith("PROBE ")])
                         and len(r) == 2 and r, 10, "the restarted probe's report")
    assert json.loads(reports[-1][len("PROBE "):])["nofile"] == [SOFT, HARD]


#: Prints "before-NAME", then "after-NAME" at each SIGUSR1 (argv: NAME).
TALKER = 'trap "echo after-$1" USR1; echo before-$1; sleep 1000000 & s=$!; while :; do wait $s && break; done'


def pipe_inodes(pid: int, fds: list[str] | None = None) -> set[str]:
    """The pipes (``pipe:[N]``) among a process's descriptors (or those `fds` of them)."""
    out = set()
    for fd in fds if fds is not None else os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("pipe:"):
            out.add(target)
    return out


def test_services_fit_a_hard_limit_the_old_layout_did_not_and_the_keeper_takes_every_pipe(sup: Supervisor) -> None:
    # Both ends of both pipes, the pidfd and the log file (6 per service)
    # needed 2100 descriptors for 350 services; the read ends and the pidfd,
    # with at most MAX_OPEN log files, fit in 1800.  The keeper holds the
    # read ends again (2 per service) under the same hard limit.
    n, hard = 350, 1800
    names = [f"t{i:03d}" for i in range(n)]
    sup.start({"services": {name: {"command": ["/bin/sh", "-c", TALKER, "sh", name]} for name in names}},
              preexec=limited(SOFT, hard, raising=False))
    wait_until(lambda: running(sup) == n, 240, f"all {n} services running")
    assert sup.proc is not None
    fds = len(os.listdir(f"/proc/{sup.proc.pid}/fd"))
    assert fds <= PER_SERVICE * n + MAX_OPEN + BASE, f"{fds} descriptors for {n} services"

    (keeper,) = wait_until(lambda: keeper_pids(sup) or None, 10, "the keeper")
    assert resource.prlimit(keeper, resource.RLIMIT_NOFILE) == (hard, hard)
    pids = {name: s["pid"] for name, s in sup.rstatus().items()}
    theirs = set().union(*(pipe_inodes(pid, ["1", "2"]) for pid in pids.values()))
    assert len(theirs) == 2 * n
    held = pipe_inodes(keeper)
    assert theirs <= held, f"the keeper lacks {len(theirs - held)} of the services' {2 * n} pipes"

    # The supervisor is killed; every service prints; a new one starts: no line lost.
    for name in names:
        sup.wait_log(name, lambda t, name=name: t == f"before-{name}", timeout=30)
    crash(sup)
    for pid in pids.values():
        os.kill(pid, signal.SIGUSR1)

    def printed(count: int) -> bool:
        return all([t for _, s, t in sup.log_lines(name) if s == "stdout"] == [f"before-{name}"] + [f"after-{name}"]
                   * count for name in names)

    wait_until(lambda: printed(1), 60, "the keeper to write every service's line")
    restart(sup)
    assert {name: s["pid"] for name, s in sup.rstatus().items()} == pids
    for pid in pids.values():
        os.kill(pid, signal.SIGUSR1)
    wait_until(lambda: printed(2), 60, "the new supervisor to read every pipe the keeper handed back")


def test_a_keeper_that_cannot_take_a_pipe_says_so(sup: Supervisor) -> None:
    services = sleepers(2)
    services["extra"] = {"command": [SLEEP, "1000"], "auto-start": False}
    sup.start({"services": services})
    wait_until(lambda: running(sup) == 2, 20, "2 services running")
    (keeper,) = wait_until(lambda: keeper_pids(sup) or None, 10, "the keeper")

    def pipes() -> int:
        return sum(os.readlink(f"/proc/{keeper}/fd/{fd}").startswith("pipe:")
                   for fd in os.listdir(f"/proc/{keeper}/fd"))

    # every pipe of the two running services taken first: only extra's may be refused
    wait_until(lambda: pipes() >= 4, 20, "the keeper to hold the running services' pipes")
    used = len(os.listdir(f"/proc/{keeper}/fd"))
    resource.prlimit(keeper, resource.RLIMIT_NOFILE, (used, used))  # its table is full
    sup.herd("start", "extra", check=True)  # the service runs all the same

    def said() -> list[dict[str, object]]:
        return [e for e in all_events(sup) if str(e["event"]).startswith("the keeper cannot hold")]

    (line,) = wait_until(said, 20, "the supervisor to say the keeper could not take extra's pipes")
    assert line["key"] == "extra/stdout" and "MSG_CTRUNC" in str(line["error"]), line
    assert any(str(e["event"]).startswith("cannot hold a descriptor") and e.get("key") == "extra/stdout"
               for e in all_events(sup)), "the keeper itself said nothing"
    assert running(sup) == 3


def test_a_full_descriptor_table_does_not_lock_clients_out(sup: Supervisor) -> None:
    services = sleepers(3)
    services["extra"] = {"command": [SLEEP, "1000"], "auto-start": False}
    sup.start({"services": services})
    wait_until(lambda: running(sup) == 3, 20, "3 services running")
    pid = sup.proc.pid  # type: ignore[union-attr]
    used = len(os.listdir(f"/proc/{pid}/fd"))
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (used, used))
    # Idle connections take whatever is left, and then some.
    idle = [Client(sup.status_socket, timeout=10) for _ in range(3)]
    try:
        # The table is full: a service cannot get its pipes...
        start = sup.herd("start", "extra", timeout=15)
        assert start.returncode != 0 and "Too many open files" in start.stdout + start.stderr, start
        # ...and clients are still served.
        for _ in range(3):
            assert sup.herd("status", timeout=15).returncode == 0
        reply = sup.request({"action": "ping"}, ro=True, timeout=10)
        assert reply["ok"] is True, reply
    finally:
        for c in idle:
            c.close()


def test_check_says_when_the_limit_cannot_cover_the_configuration(tmp_path: Path) -> None:
    conf = tmp_path / "init.toml"
    conf.write_text("".join(f'[services.s{i}]\ncommand = ["{SLEEP}", "100"]\n' for i in range(100)))
    result = subprocess.run(
        [sys.executable, "-m", "supervisor", "--check", "-c", str(conf)], env=base_env(), cwd=tmp_path,
        capture_output=True, text=True, timeout=60, preexec_fn=limited(256, 256, raising=False))
    assert result.returncode == 0, result
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, result.stderr
    assert "open-files limit 256 is too low" in warnings[0] and "100 services" in warnings[0], warnings

    # Where the limit covers it, nothing is said.
    quiet = subprocess.run(
        [sys.executable, "-m", "supervisor", "--check", "-c", str(conf)], env=base_env(), cwd=tmp_path,
        capture_output=True, text=True, timeout=60, preexec_fn=limited(256, 4096, raising=False))
    assert quiet.returncode == 0 and "warning:" not in quiet.stderr, quiet


def test_start_says_when_the_limit_cannot_cover_the_configuration(sup: Supervisor) -> None:
    sup.start({"services": sleepers(100)}, preexec=limited(256, 256, raising=False))
    lines = [e for e in daemon_events(sup) if e.startswith("open-files limit")]
    assert len(lines) == 1 and "open-files limit 256 is too low" in lines[0], lines
    assert sup.herd("status").returncode == 0


class Pinger(threading.Thread):
    """Pings the status socket back to back and records each reply's latency."""

    def __init__(self, sup: Supervisor) -> None:
        super().__init__(daemon=True)
        self.client = Client(sup.status_socket, timeout=60)
        self.latencies: list[float] = []
        self.answered_at: list[float] = []  # monotonic time of each reply
        self.failure: BaseException | None = None
        self.stop = threading.Event()
        self.ending = threading.Event()  # the supervisor is told to exit: its end closes the connection

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                t = time.monotonic()
                reply = self.client.call("ping", timeout=60)
                if reply is None and self.ending.is_set():
                    return
                assert reply["ok"] is True, reply
                self.answered_at.append(now := time.monotonic())
                self.latencies.append(now - t)
                time.sleep(0.01)
        except BaseException as exc:  # reported by the test
            if not (self.ending.is_set() and isinstance(exc, (OSError, EOFError, ConnectionClosed))):
                self.failure = exc


@pytest.mark.slow
def test_ping_and_status_are_answered_throughout_a_mass_start(sup: Supervisor) -> None:
    # 2000, not 5000: the test should stay near a minute on 2 shared cores
    # (contrib/bench/mass_start.py measures 5000).  Before, one loop pass
    # forked them all: the socket was silent for about the whole start.
    n = 2000
    sup.start({"services": sleepers(n)}, preexec=limited(SOFT, HARD))
    pinger = Pinger(sup)
    pinger.start()
    began = time.monotonic()
    status_latencies = []
    try:
        deadline = time.monotonic() + 300
        while True:
            t = time.monotonic()
            count = running(sup)
            status_latencies.append(time.monotonic() - t)
            if count == n or time.monotonic() > deadline or pinger.failure:
                break
            time.sleep(0.5)
        took = time.monotonic() - began
    finally:
        pinger.stop.set()
        pinger.join(70)
        pinger.client.close()
    assert pinger.failure is None, repr(pinger.failure)
    assert count == n, f"{count} of {n} services running after 300 s"
    worst = max(pinger.latencies)
    assert worst < 5, f"a ping took {worst:.1f} s"
    # Scale-free: however fast the machine, no ping waits for a good part of the start.
    assert worst < max(0.5, took / 4), f"the socket was silent for {worst:.1f} s of a {took:.1f} s mass start"
    assert max(status_latencies) < 10, f"a status took {max(status_latencies):.1f} s"

    # And the socket is still answered while they are all stopped, and none is left.
    pinger = Pinger(sup)
    pinger.start()
    wait_until(lambda: pinger.answered_at or pinger.failure, 30, "a first ping")
    pinger.ending.set()
    began = time.monotonic()
    sup.send_signal(signal.SIGTERM)
    assert sup.wait_exit(300) == 0, sup.stderr_tail()
    took = time.monotonic() - began
    pinger.join(70)
    pinger.client.close()
    assert pinger.failure is None, repr(pinger.failure)
    during = [lat for at, lat in zip(pinger.answered_at, pinger.latencies) if at > began]
    assert during, "no ping answered during the shutdown"
    assert max(during) < max(0.5, took / 4), (
        f"the socket was silent for {max(during):.1f} s of a {took:.1f} s shutdown")
    left = [pid for pid in sup.descendants if pid_alive(pid)]
    assert not left, f"processes left after the shutdown: {left}"
