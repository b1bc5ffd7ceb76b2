"""Issue 2 acceptance: stopping services (signals, timeouts, kill modes) and
stopping the daemon itself with SIGTERM/SIGINT."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from helpers import (
    PY_FORK_CHILD,
    Supervisor,
    find_pids,
    pid_alive,
    py_service,
    signal_caught,
    signal_ignored,
    sleeper,
    wait_until,
)

IGNORE_TERM = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "time.sleep(1e6)\n"
)


def test_sigterm_ignored_is_killed_after_stop_timeout(sup: Supervisor) -> None:
    marker = sup.marker("stubborn")
    sup.start({"services": {
        "stubborn": py_service(IGNORE_TERM, marker, **{"stop-timeout": 1, "auto-start": False}),
    }})
    pid = sup.herd("start", "stubborn", json=True, check=True).data["pid"]
    wait_until(lambda: signal_ignored(pid, signal.SIGTERM), 5, "the service to ignore SIGTERM")

    t0 = time.monotonic()
    sup.herd("stop", "stubborn", check=True)
    elapsed = time.monotonic() - t0
    assert elapsed >= 0.95, f"herd stop returned after {elapsed:.2f} s, before the 1 s stop-timeout"
    assert elapsed < 5, f"herd stop took {elapsed:.2f} s with stop-timeout = 1"
    assert not pid_alive(pid), "the process is still there when herd stop returns"
    assert find_pids(marker) == set()
    status = sup.status("stubborn")
    assert status["state"] == "stopped"
    assert status["last-exit"]["signal"] == "SIGKILL", status["last-exit"]


HANDLE_INT = (
    "import os, signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "signal.signal(signal.SIGINT, lambda *a: os._exit(0))\n"
    "time.sleep(1e6)\n"
)


def test_stop_signal_is_sent(sup: Supervisor) -> None:
    marker = sup.marker("intr")
    sup.start({"services": {
        "intr": py_service(HANDLE_INT, marker, **{
            "stop-signal": "SIGINT", "stop-timeout": 20, "auto-start": False}),
    }})
    pid = sup.herd("start", "intr", json=True, check=True).data["pid"]
    wait_until(lambda: signal_caught(pid, signal.SIGINT), 5, "the SIGINT handler")
    t0 = time.monotonic()
    sup.herd("stop", "intr", check=True)
    assert time.monotonic() - t0 < 10, "stop waited for the timeout: SIGINT was not sent"
    assert not pid_alive(pid)
    assert sup.status("intr")["last-exit"]["code"] == 0


def fork_service(sup: Supervisor, name: str, setsid: bool, **keys: Any) -> dict[str, Any]:
    assert sup.marker(name + "-child") == sup.marker(name) + "-child"
    svc = py_service(PY_FORK_CHILD, sup.marker(name), "setsid" if setsid else "no")
    svc["auto-start"] = False
    svc.update(keys)
    return svc


def start_and_find_child(sup: Supervisor, name: str, setsid: bool) -> tuple[int, int]:
    pid = sup.herd("start", name, json=True, check=True).data["pid"]
    child = wait_until(lambda: find_pids(sup.marker(name + "-child")), 5, f"{name}'s child")
    assert len(child) == 1, child
    (child_pid,) = child
    assert child_pid != pid
    assert find_pids(sup.marker(name)) == {pid}
    if setsid:
        assert os.getsid(child_pid) == child_pid, "the child did not get its own session"
    else:
        assert os.getpgid(child_pid) == os.getpgid(pid)
    return pid, child_pid


def test_kill_mode_tree_kills_setsid_children(sup: Supervisor) -> None:
    sup.start({"services": {"tree": fork_service(sup, "tree", setsid=True, **{"kill-mode": "tree"})}})
    pid, child = start_and_find_child(sup, "tree", setsid=True)
    sup.herd("stop", "tree", check=True)
    assert not pid_alive(pid)
    assert not pid_alive(child), "the setsid'd child survived a kill-mode = tree stop"
    assert find_pids(sup.marker("tree")) == set()
    assert find_pids(sup.marker("tree-child")) == set()


def test_kill_mode_process_leaves_children(sup: Supervisor) -> None:
    sup.start({"services": {"main": fork_service(sup, "main", setsid=True, **{"kill-mode": "process"})}})
    pid, child = start_and_find_child(sup, "main", setsid=True)
    sup.herd("stop", "main", check=True)
    assert not pid_alive(pid)
    assert sup.status("main")["state"] == "stopped"
    assert pid_alive(child), "kill-mode = process must leave the child running"
    # (teardown kills the child)


def test_default_kill_mode_kills_the_process_group(sup: Supervisor) -> None:
    sup.start({"services": {"group": fork_service(sup, "group", setsid=False)}})
    pid, child = start_and_find_child(sup, "group", setsid=False)
    assert os.getsid(pid) == pid, "a service runs in its own session"
    assert os.getpgid(pid) == pid, "a service leads its own process group"
    sup.herd("stop", "group", check=True)
    assert not pid_alive(pid)
    assert not pid_alive(child), "the child in the service's process group survived stop"


# On SIGTERM: append "NAME" to the shared file argv[3], then exit 0.
RECORD_STOP = (
    "import os, signal, sys, time\n"
    "def term(*a):\n"
    "    with open(sys.argv[3], 'a') as f:\n"
    "        f.write(sys.argv[2] + '\\n')\n"
    "    os._exit(0)\n"
    "signal.signal(signal.SIGTERM, term)\n"
    "time.sleep(1e6)\n"
)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_daemon_signal_stops_everything_in_reverse_order(
    sup: Supervisor, tmp_path: Path, signum: int
) -> None:
    order = tmp_path / "stop-order"
    services: dict[str, Any] = {}
    for name, requires in (("A", []), ("B", ["A"]), ("C", ["B"])):
        services[name] = py_service(RECORD_STOP, sup.marker(name), name, str(order), requires=requires)
    # An independent service with a child in its process group.
    services["D"] = fork_service(sup, "D", setsid=False, **{"auto-start": True})
    services["E"] = sleeper(sup.marker("E"))
    sup.start({"services": services})

    def all_up() -> dict[str, Any] | None:
        st = sup.rstatus()
        return st if all(st[n]["state"] == "running" for n in "ABCDE") else None

    status = wait_until(all_up, 10, "the auto-start services to run")
    for name in "ABC":
        wait_until(lambda: signal_caught(status[name]["pid"], signal.SIGTERM), 5, f"{name}'s SIGTERM handler")
    wait_until(lambda: find_pids(sup.marker("D-child")), 5, "D's child")
    everything = set().union(*(find_pids(sup.marker(m)) for m in ["A", "B", "C", "D", "D-child", "E"]))
    assert len(everything) == 6

    code = sup.stop(timeout=30, signum=signum)
    assert code == 0, f"supervisor exited {code}\n{sup.stderr_tail()}"
    assert order.read_text().split() == ["C", "B", "A"], "services were not stopped in reverse dependency order"
    left = [pid for pid in everything if pid_alive(pid)]
    assert left == [], f"processes left behind after the supervisor exited: {left}"


def test_stop_racing_start_leaves_no_stray_process(sup: Supervisor) -> None:
    """A stop that overtakes a start must not leave the started process behind."""
    marker = sup.marker("racy")
    sup.start({"services": {"racy": sleeper(marker, **{"auto-start": False})}})
    starter, stopper = sup.connect(), sup.connect()
    for i in range(30):
        a = starter.send({"action": "start", "service": "racy"})
        b = stopper.send({"action": "stop", "service": "racy"})
        rep_start, rep_stop = starter.reply(a), stopper.reply(b)
        assert rep_stop["ok"] is True, rep_stop
        assert rep_start["ok"] is True or rep_start["error"]["code"] == "start-failed", rep_start
        status = sup.rstatus("racy")
        expected = {status["pid"]} if status["state"] == "running" else set()
        assert status["state"] in ("running", "stopped"), status
        assert find_pids(marker) == expected, (
            f"round {i}: state {status['state']} (pid {status['pid']}) but processes {find_pids(marker)}; "
            f"start -> {rep_start}")
