"""Issue 2 acceptance: dependencies and the start/stop/restart lifecycle.

A chain C -> B -> A (C requires B, B requires A) of `sleep` services, driven
with the real `herd`; order is checked on the `subscribe` event stream and on
the `since` times, processes with psutil.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from helpers import (
    Supervisor,
    base_env,
    find_pids,
    pid_alive,
    py_service,
    sleeper,
    wait_until,
)

CHAIN = ["A", "B", "C"]


def chain_config(sup: Supervisor, **extra: Any) -> dict[str, Any]:
    return {
        "services": {
            "A": sleeper(sup.marker("A"), **{"auto-start": False}, **extra),
            "B": sleeper(sup.marker("B"), requires=["A"], provides=["bee"], **{"auto-start": False}, **extra),
            "C": sleeper(sup.marker("C"), requires=["B"], **{"auto-start": False}, **extra),
        }
    }


def transitions(events: list[dict[str, Any]], to: str) -> list[str]:
    """Services in the order they reached state ``to``."""
    return [e["service"] for e in events if e.get("event") == "state" and e.get("to") == to]


def index_of(events: list[dict[str, Any]], service: str, to: str) -> int:
    for i, e in enumerate(events):
        if e.get("service") == service and e.get("to") == to:
            return i
    raise AssertionError(f"no event for {service} -> {to} in {events!r}")


def one_process_each(sup: Supervisor, names: list[str]) -> dict[str, int]:
    """Each service has exactly one process, whose pid is the one status shows."""
    status = sup.status()
    pids = {}
    for name in names:
        found = find_pids(sup.marker(name))
        assert len(found) == 1, f"{name}: expected one process, found {sorted(found)}"
        assert status[name]["pid"] in found, (name, status[name]["pid"], found)
        pids[name] = status[name]["pid"]
    return pids


def test_start_pulls_requirements_first(sup: Supervisor) -> None:
    sup.start(chain_config(sup))
    assert {n: s["state"] for n, s in sup.status().items()} == {n: "stopped" for n in CHAIN}
    events = sup.subscribe()

    cp = sup.herd("start", "C", json=True, check=True)
    result = cp.data
    assert result["service"] == "C"
    assert result["started"] == ["A", "B", "C"], result
    assert result["state"] == "running"
    assert isinstance(result["pid"], int)

    status = sup.status()
    for name in CHAIN:
        assert status[name]["state"] == "running", status[name]
        assert isinstance(status[name]["since"], float | int)
    assert status["A"]["since"] <= status["B"]["since"] <= status["C"]["since"]
    assert result["pid"] == status["C"]["pid"]
    one_process_each(sup, CHAIN)

    got = events.events(lambda ev: len(transitions(ev, "running")) >= 3, timeout=5)
    assert transitions(got, "running") == ["A", "B", "C"], got
    # A service is started only once its requirement is up.
    for req, dep in (("A", "B"), ("B", "C")):
        if any(e["service"] == dep and e["to"] == "starting" for e in got):
            assert index_of(got, req, "running") < index_of(got, dep, "starting"), got
    for e in got:
        assert set(e) >= {"event", "service", "from", "to", "pid", "time", "reason"}, e


def test_start_of_running_service_starts_nothing(sup: Supervisor) -> None:
    sup.start(chain_config(sup))
    sup.herd("start", "C", check=True)
    pids = one_process_each(sup, CHAIN)
    cp = sup.herd("start", "C", json=True, check=True)
    assert cp.data["started"] == [], cp.data
    assert cp.data["pid"] == pids["C"]
    assert one_process_each(sup, CHAIN) == pids


def test_stop_takes_dependents_down_first(sup: Supervisor) -> None:
    sup.start(chain_config(sup))
    sup.herd("start", "C", check=True)
    pids = one_process_each(sup, CHAIN)
    events = sup.subscribe()

    cp = sup.herd("stop", "A", json=True, check=True)
    assert cp.data["service"] == "A"
    assert cp.data["stopped"] == ["C", "B", "A"], cp.data
    # `herd stop` returns only once the processes are gone.
    for name in CHAIN:
        assert not pid_alive(pids[name]), f"{name} (pid {pids[name]}) still alive after herd stop"
        assert find_pids(sup.marker(name)) == set()
    status = sup.status()
    for name in CHAIN:
        assert status[name]["state"] == "stopped"
        assert status[name]["pid"] is None

    got = events.events(lambda ev: len(transitions(ev, "stopped")) >= 3, timeout=5)
    assert transitions(got, "stopped") == ["C", "B", "A"], got
    # B is stopped before A begins stopping, C before B.
    for dep, req in (("C", "B"), ("B", "A")):
        if any(e["service"] == req and e["to"] == "stopping" for e in got):
            assert index_of(got, dep, "stopped") < index_of(got, req, "stopping"), got


def test_restart_restarts_dependents_with_new_pids(sup: Supervisor) -> None:
    sup.start(chain_config(sup))
    sup.herd("start", "C", check=True)
    old = one_process_each(sup, CHAIN)

    cp = sup.herd("restart", "A", json=True, check=True)
    assert cp.data["service"] == "A"
    assert cp.data["stopped"] == ["C", "B", "A"], cp.data
    assert cp.data["started"] == ["A", "B", "C"], cp.data

    new = one_process_each(sup, CHAIN)
    status = sup.status()
    for name in CHAIN:
        assert status[name]["state"] == "running"
        assert new[name] != old[name], f"{name} kept pid {old[name]} across restart"
        assert not pid_alive(old[name])


def test_restart_does_not_start_what_was_not_running(sup: Supervisor) -> None:
    sup.start(chain_config(sup))
    sup.herd("start", "B", check=True)
    cp = sup.herd("restart", "A", json=True, check=True)
    assert cp.data["stopped"] == ["B", "A"], cp.data
    assert cp.data["started"] == ["A", "B"], cp.data
    assert sup.status("C")["state"] == "stopped"
    assert find_pids(sup.marker("C")) == set()


def test_stop_already_stopped_exits_0(sup: Supervisor) -> None:
    sup.start(chain_config(sup))
    cp = sup.herd("stop", "A", check=0)
    assert "Traceback" not in cp.stderr
    cp = sup.herd("stop", "A", json=True, check=0)
    assert cp.data == {"service": "A", "stopped": []}, cp.data


def test_provisions_name_the_service(sup: Supervisor) -> None:
    sup.start(chain_config(sup))
    cp = sup.herd("start", "bee", json=True, check=True)
    assert cp.data["service"] == "B"
    assert cp.data["started"] == ["A", "B"]
    assert sup.status("bee")["name"] == "B"
    assert "bee" in sup.status("B")["provides"]
    sup.herd("stop", "bee", check=True)
    assert sup.status("B")["state"] == "stopped"


def test_unknown_service_exits_2_naming_it(sup: Supervisor) -> None:
    sup.start(chain_config(sup))
    for action in ("start", "stop", "restart", "status", "enable", "disable"):
        cp = sup.herd(action, "no-such-service", check=2)
        assert "no-such-service" in cp.stdout + cp.stderr, (action, cp.stdout, cp.stderr)
        assert "Traceback" not in cp.stderr
        rep = sup.request({"action": action, "service": "no-such-service"})
        assert rep["ok"] is False, rep
        assert rep["error"]["code"] == "unknown-service", rep
        assert "no-such-service" in rep["error"]["message"]
    # Nothing was started on the way.
    assert all(s["state"] == "stopped" for s in sup.status().values())


def test_unknown_action_exits_2(sup: Supervisor) -> None:
    sup.start(chain_config(sup))
    cp = sup.herd("frobnicate", "A", check=2)
    assert "frobnicate" in cp.stdout + cp.stderr, (cp.stdout, cp.stderr)
    rep = sup.request({"action": "frobnicate", "service": "A"})
    assert rep["ok"] is False and rep["error"]["code"] == "unknown-action", rep


def test_herd_status_human_output(sup: Supervisor) -> None:
    sup.start(chain_config(sup))
    sup.herd("start", "B", check=True)
    summary = sup.herd("status", check=True).stdout
    assert "Started:" in summary and "Stopped:" in summary, summary
    sections: dict[str, str] = {}
    current = None
    for line in summary.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith(":"):
            current = line.strip()
            sections[current] = ""
        elif current:
            sections[current] += line + "\n"
    assert any(w.strip("+-* ") == "A" for w in sections["Started:"].split()), sections
    assert any(w.strip("+-* ") == "C" for w in sections["Stopped:"].split()), sections

    running = sup.herd("status", "B", check=True).stdout
    assert "Status of B:" in running and "Running" in running, running
    stopped = sup.herd("status", "C", check=True).stdout
    assert "Status of C:" in stopped and "Running" not in stopped, stopped
    assert "disabled" not in running + stopped


def test_herd_without_daemon_exits_3(sup: Supervisor) -> None:
    # No daemon started: nothing listens on the socket.
    cp = sup.herd("status", check=3)
    assert "Traceback" not in cp.stderr


def test_auto_start_services_come_up(sup: Supervisor) -> None:
    config = chain_config(sup)
    config["services"]["D"] = sleeper(sup.marker("D"), requires=["B"])  # auto-start defaults to true
    sup.start(config)
    wait_until(lambda: sup.rstatus("D")["state"] == "running", 10, "D (auto-start) running")
    status = sup.status()
    assert status["A"]["state"] == status["B"]["state"] == "running"
    assert status["C"]["state"] == "stopped"
    assert find_pids(sup.marker("C")) == set()
    one_process_each(sup, ["A", "B", "D"])


# A one-shot that records each run in a file, then takes 1.5 s to finish.
SLOW_ONESHOT = (
    "import sys, time\n"
    "open(sys.argv[2], 'a').write('run\\n')\n"
    "time.sleep(1.5)\n"
)


def test_concurrent_starts_make_one_process(sup: Supervisor, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    sup.start({
        "services": {
            "slow": py_service(SLOW_ONESHOT, sup.marker("slow"), str(runs),
                               **{"one-shot": True, "auto-start": False}),
            "X": sleeper(sup.marker("X"), requires=["slow"], **{"auto-start": False}),
        }
    })
    herd = [sys.executable, "-m", "herd", "-s", str(sup.socket), "--json", "start", "X"]
    first = subprocess.Popen(herd, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # The one-shot is running (it wrote its line): X is mid-start.
        wait_until(lambda: runs.exists() and runs.read_text(), 10, "the slow requirement to begin")
        second = subprocess.Popen(herd, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out2, err2 = second.communicate(timeout=30)
        finally:
            second.kill()
        out1, err1 = first.communicate(timeout=30)
    finally:
        first.kill()
    assert first.returncode == 0, (out1, err1)
    assert second.returncode == 0, (out2, err2)
    r1, r2 = json.loads(out1), json.loads(out2)
    assert r1["state"] == r2["state"] == "running", (r1, r2)
    assert r1["pid"] == r2["pid"], (r1, r2)
    assert runs.read_text() == "run\n", "the one-shot requirement ran more than once"
    found = find_pids(sup.marker("X"))
    assert found == {r1["pid"]}, f"expected exactly X's process {r1['pid']}, found {found}"


def test_independent_services_start_in_parallel(sup: Supervisor) -> None:
    names = [f"p{i}" for i in range(5)]
    services: dict[str, Any] = {
        n: py_service("import time; time.sleep(1)", sup.marker(n), **{"one-shot": True, "auto-start": False})
        for n in names
    }
    services["top"] = sleeper(sup.marker("top"), requires=names, **{"auto-start": False})
    sup.start({"services": services})
    t0 = time.monotonic()
    cp = sup.herd("start", "top", json=True, check=True)
    elapsed = time.monotonic() - t0
    assert sorted(cp.data["started"]) == sorted([*names, "top"]), cp.data
    assert cp.data["started"][-1] == "top"
    assert elapsed >= 1.0, f"the one-shots take 1 s each, yet start returned after {elapsed:.2f} s"
    assert elapsed < 3.5, f"5 independent 1 s one-shots took {elapsed:.2f} s: not started in parallel"


def test_several_services_on_one_command_line_run_in_parallel(sup: Supervisor) -> None:
    names = [f"q{i}" for i in range(5)]
    sup.start({"services": {
        n: py_service("import time; time.sleep(1)", sup.marker(n), **{"one-shot": True, "auto-start": False})
        for n in names
    }})
    t0 = time.monotonic()
    sup.herd("start", *names, check=True)
    elapsed = time.monotonic() - t0
    assert 1.0 <= elapsed < 3.5, f"`herd start` of 5 one-shots of 1 s took {elapsed:.2f} s"


def test_failing_one_shot_fails_start(sup: Supervisor) -> None:
    sup.start({"services": {
        "bad": py_service("import sys; sys.exit(3)", sup.marker("bad"), **{"one-shot": True, "auto-start": False}),
        "user": sleeper(sup.marker("user"), requires=["bad"], **{"auto-start": False}),
    }})
    cp = sup.herd("start", "bad", check=1)
    assert "Traceback" not in cp.stderr
    rep = sup.request({"action": "start", "service": "user"})
    assert rep["ok"] is False and rep["error"]["code"] == "start-failed", rep
    assert sup.status("user")["state"] == "stopped"
    assert find_pids(sup.marker("user")) == set()
    status = sup.status("bad")
    assert status["state"] == "stopped"
    assert status["startup-failures"], status
    assert status["last-exit"]["code"] == 3, status


def test_command_not_found_fails_start(sup: Supervisor, tmp_path: Path) -> None:
    sup.start({"services": {
        "ghost": {"command": [str(tmp_path / "does-not-exist")], "auto-start": False},
    }})
    cp = sup.herd("start", "ghost", check=1)
    assert "Traceback" not in cp.stderr
    assert sup.status("ghost")["state"] == "stopped"
    # The daemon is still fine.
    sup.herd("status", check=True)

