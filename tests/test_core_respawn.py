"""Issue 2 acceptance: respawn, the respawn limit, and stop-without-respawn."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from helpers import (
    Supervisor,
    find_pids,
    pid_alive,
    py_service,
    signal_caught,
    sleeper,
    wait_until,
)


def test_sigkill_ten_times_respawns_each_time(sup: Supervisor) -> None:
    marker = sup.marker("victim")
    sup.start({"services": {
        # Ten quick deaths must stay under the limit: this test is about respawn itself.
        "victim": sleeper(marker, **{"respawn-limit": {"count": 50, "seconds": 7}}),
    }})
    first = wait_until(lambda: sup.rstatus("victim")["pid"], 10, "victim (auto-start) to run")
    seen = [first]
    # A dashboard polls all along: status is the actor's own view, so it
    # never says "running" without a PID (a death noticed, not yet handled).
    torn: list[dict[str, Any]] = []
    polling = threading.Event()
    polling.set()

    def poll() -> None:
        conn = sup.connect(ro=True)
        try:
            while polling.is_set():
                svc = conn.call("status", "victim")["result"]["services"][0]
                if svc["state"] == "running" and svc["pid"] is None:
                    torn.append(svc)
        finally:
            conn.close()

    poller = threading.Thread(target=poll)
    poller.start()
    for i in range(10):
        old = seen[-1]
        assert find_pids(marker) == {old}, f"round {i}: expected only pid {old}"
        os.kill(old, signal.SIGKILL)

        def respawned(old: int = old) -> int | None:
            s = sup.rstatus("victim")
            return s["pid"] if s["state"] == "running" and s["pid"] not in (None, old) else None

        new = wait_until(respawned, 5, f"a new pid after SIGKILL #{i + 1} of pid {old}")
        assert pid_alive(new)
        seen.append(new)
    polling.clear()
    poller.join(30)
    assert not torn, f"status said running with no PID {len(torn)} time(s): {torn[0]}"
    assert len(set(seen)) == 11, f"pids were reused or repeated: {seen}"
    assert find_pids(marker) == {seen[-1]}, "exactly one process after ten respawns"

    status = sup.status("victim")
    assert status["state"] == "running" and status["enabled"] is True
    assert status["last-exit"]["signal"] == "SIGKILL", status["last-exit"]
    assert status["last-exit"]["code"] is None
    assert len(status["respawns"]) >= 5, status["respawns"]
    assert status["respawns"] == sorted(status["respawns"])


# Appends a line to argv[2] on every run; exits at once (status 3) while the
# flag file argv[3] exists, else stays up.
FLAKY = (
    "import os, sys, time\n"
    "open(sys.argv[2], 'a').write('run\\n')\n"
    "if os.path.exists(sys.argv[3]):\n"
    "    sys.exit(3)\n"
    "time.sleep(1e6)\n"
)


def test_fast_exit_disables_after_respawn_limit(sup: Supervisor, tmp_path: Path) -> None:
    runs, flag = tmp_path / "runs", tmp_path / "flag"
    flag.touch()
    marker = sup.marker("flaky")
    sup.start({"services": {
        # Default respawn-limit: { count = 5, seconds = 7 }; default delay 0.1 s.
        "flaky": py_service(FLAKY, marker, str(runs), str(flag)),
    }})
    status = wait_until(
        lambda: (s := sup.rstatus("flaky"))["enabled"] is False and s,
        10, "flaky to be disabled for respawning too fast",
    )
    assert status["state"] == "stopped", status
    assert status["pid"] is None
    assert find_pids(marker) == set()
    assert isinstance(status["disabled-reason"], str) and status["disabled-reason"], status
    assert status["last-exit"]["code"] == 3, status["last-exit"]
    assert status["last-exit"]["signal"] is None
    assert len(status["respawns"]) >= 5, status["respawns"]
    # The first run plus five respawns; the sixth exit is one too many.
    assert runs.read_text().count("run") == 6, runs.read_text()

    human = sup.herd("status", "flaky", check=True).stdout
    assert "disabled" in human, human
    assert status["disabled-reason"] in human, (status["disabled-reason"], human)
    assert "Running" not in human

    # Refused while disabled, even once the cause is gone.
    cp = sup.herd("start", "flaky", check=1)
    assert "Traceback" not in cp.stderr
    rep = sup.request({"action": "start", "service": "flaky"})
    assert rep["ok"] is False and rep["error"]["code"] == "disabled", rep
    flag.unlink()
    sup.herd("start", "flaky", check=1)
    assert find_pids(marker) == set()

    cp = sup.herd("enable", "flaky", json=True, check=True)
    assert cp.data == {"service": "flaky", "enabled": True}, cp.data
    cp = sup.herd("start", "flaky", json=True, check=True)
    assert cp.data["state"] == "running"
    assert find_pids(marker) == {cp.data["pid"]}
    status = sup.status("flaky")
    assert status["enabled"] is True and status["state"] == "running"
    human = sup.herd("status", "flaky", check=True).stdout
    assert "Running" in human
    assert "disabled" not in human, human


def test_disable_and_enable_by_hand(sup: Supervisor) -> None:
    marker = sup.marker("svc")
    sup.start({"services": {"svc": sleeper(marker, **{"auto-start": False})}})
    cp = sup.herd("disable", "svc", json=True, check=True)
    assert cp.data == {"service": "svc", "enabled": False}
    assert sup.status("svc")["enabled"] is False
    sup.herd("start", "svc", check=1)
    assert find_pids(marker) == set()
    sup.herd("enable", "svc", check=True)
    sup.herd("start", "svc", check=True)
    assert len(find_pids(marker)) == 1


# Exits with status 1 as soon as it gets SIGTERM: a "crash" during stop.
CRASH_ON_TERM = (
    "import os, signal, time\n"
    "signal.signal(signal.SIGTERM, lambda *a: os._exit(1))\n"
    "time.sleep(1e6)\n"
)


@pytest.mark.parametrize("kind", ["killed-by-sigterm", "exits-1-on-sigterm"])
def test_stop_never_triggers_respawn(sup: Supervisor, kind: str) -> None:
    marker = sup.marker("svc")
    if kind == "killed-by-sigterm":
        svc = sleeper(marker)
    else:
        svc = py_service(CRASH_ON_TERM, marker)
    svc["auto-start"] = False
    svc["respawn-delay"] = 0
    sup.start({"services": {"svc": svc}})
    events = sup.subscribe()
    for _ in range(5):
        pid = sup.herd("start", "svc", json=True, check=True).data["pid"]
        if kind == "exits-1-on-sigterm":
            wait_until(lambda: signal_caught(pid, signal.SIGTERM), 5, "the SIGTERM handler")
        sup.herd("stop", "svc", check=True)
        assert not pid_alive(pid)
        assert find_pids(marker) == set()
    # Observe for a while (well past the respawn delay): nothing may come back.
    got = [e for e in events.events(None, timeout=1.0) if e["service"] == "svc"]
    assert sum(e["to"] == "running" for e in got) == 5, got
    assert got[-1]["to"] == "stopped", got
    assert find_pids(marker) == set()
    status = sup.status("svc")
    assert status["state"] == "stopped", status
    assert status["respawns"] == [], status["respawns"]
    assert status["enabled"] is True


def test_respawn_false_leaves_it_stopped(sup: Supervisor) -> None:
    marker = sup.marker("once")
    sup.start({"services": {"once": sleeper(marker, respawn=False)}})
    pid = wait_until(lambda: sup.rstatus("once")["pid"], 10, "once (auto-start) to run")
    events = sup.subscribe()
    os.kill(pid, signal.SIGKILL)
    events.events(lambda ev: any(e["service"] == "once" and e["to"] == "stopped" for e in ev), 5)
    status = sup.status("once")
    assert status["state"] == "stopped" and status["pid"] is None
    assert status["last-exit"]["signal"] == "SIGKILL"
    # Observe past the default respawn delay: no new process.
    events.events(None, timeout=0.5)
    assert find_pids(marker) == set()
    assert sup.status("once")["state"] == "stopped"
