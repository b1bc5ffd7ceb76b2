"""Dashboards polling `status` (issue 17): the reply is built once per change
and served as the same bytes to every poller, yet it is never stale once a
change was acknowledged; live figures come apart, from `stats`."""

from __future__ import annotations

import os
import signal
import socket
import threading
from pathlib import Path
from typing import Any

from helpers import Client, Supervisor, py_service, sleeper, wait_running, wait_until

#: Exits at once: with no respawn delay, an endless storm of state changes.
FLAP = "import sys; sys.exit(3)"


def _storm(sup: Supervisor) -> dict[str, Any]:
    return {"services": {
        "flap": py_service(FLAP, sup.marker("flap"), **{"respawn-delay": 0,
                                                         "respawn-limit": {"count": 1000000, "seconds": 1}}),
        "x": sleeper(sup.marker("x"), **{"auto-start": False}),
    }}


def test_status_after_an_acknowledged_change_is_never_stale_during_a_storm(sup: Supervisor) -> None:
    sup.start(_storm(sup))
    stop = threading.Event()
    seen: list[int] = []
    errors: list[BaseException] = []

    def poll() -> None:  # other dashboards, polling the cached reply all along
        c = Client(sup.status_socket, timeout=20)
        try:
            while not stop.is_set():
                rep = c.call("status", timeout=20)
                assert rep["ok"], rep
                seen.append(len(rep["result"]["services"]))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            c.close()

    pollers = [threading.Thread(target=poll) for _ in range(4)]
    for t in pollers:
        t.start()
    rw, ro = Client(sup.socket, timeout=30), Client(sup.status_socket, timeout=30)
    try:
        respawns_before = None
        for i in range(15):
            for action, state in (("start", "running"), ("stop", "stopped")):
                rep = rw.call(action, "x", timeout=30)
                assert rep["ok"], rep
                # right after the acknowledgement, on another connection and socket
                svcs = {s["name"]: s for s in ro.call("status")["result"]["services"]}
                assert svcs["x"]["state"] == state, (i, action, svcs["x"])
                assert (svcs["x"]["pid"] is None) == (state == "stopped"), svcs["x"]
                one = ro.call("status", "x")["result"]["services"][0]
                assert one["state"] == state, (i, action, one)
            flap = svcs["flap"]
            if respawns_before is None:
                respawns_before = flap["respawns"]
        assert svcs["flap"]["respawns"] != respawns_before, "the storm went on: the flapping service respawned"
        rep = rw.call("disable", "x")
        assert ro.call("status")["result"]["services"][1]["enabled"] is False
    finally:
        stop.set()
        for t in pollers:
            t.join(30)
        rw.close()
        ro.close()
    assert not errors, errors
    assert len(seen) > 10, "the pollers were served throughout"


def test_changes_that_publish_no_event_show_at_once(sup: Supervisor, tmp_path: Path) -> None:
    """A reload marks a running service's replacement pending, and the
    process respawned for a service that is still starting shows its pid:
    neither is a state change (no event), and both show in the very next
    `status`, though the previous view was cached."""
    ready = tmp_path / "ready.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(ready))
    listener.listen(16)
    config = {"services": {
        "a": sleeper(sup.marker("a")),
        "slow": sleeper(sup.marker("slow"), **{"ready": {"type": "unix", "path": str(ready)},
                                               "start-timeout": 60, "respawn-delay": 1.5}),
    }}
    sup.start(config)
    wait_until(lambda: all(s["state"] == "running" for s in sup.rstatus().values()), 20, "both running")
    assert sup.rstatus()["a"]["replacement-pending"] is False  # both views cached now
    assert sup.rstatus("a")["replacement-pending"] is False
    config["services"]["a"]["environment"]["NEW"] = "1"
    sup.write_config(config)
    rep = sup.request({"action": "reload", "service": "root"})
    assert rep["ok"] and rep["result"]["pending"] == ["a"], rep
    assert sup.rstatus()["a"]["replacement-pending"] is True
    assert sup.rstatus("a")["replacement-pending"] is True

    # `slow` dies; its respawn waits 1.5 s (starting, no pid: cached), then
    # spawns a process whose readiness never passes (the socket is gone).
    listener.close()
    ready.unlink()
    old = sup.rstatus()["slow"]["pid"]
    os.kill(old, signal.SIGKILL)
    svc = wait_until(lambda: (s := sup.rstatus()["slow"])["state"] == "starting" and s, 20, "the respawn")
    assert svc["pid"] is None, svc
    svc = wait_until(lambda: (s := sup.rstatus()["slow"])["pid"] not in (None, old) and s, 20,
                     "the respawned process's pid in status")
    assert svc["state"] == "starting", svc


def test_stats_gives_live_figures_apart_from_status(sup: Supervisor) -> None:
    sup.start({"services": {"a": sleeper(sup.marker("a")),
                            "b": sleeper(sup.marker("b"), **{"auto-start": False})}})
    rep = sup.request({"action": "stats"}, ro=True)
    assert rep["ok"], rep
    stats = rep["result"]
    assert set(stats["services"]) == {"a", "b"}, stats
    assert stats["interval"] == 1.0 and stats["time"] > 0, stats
    a = stats["services"]["a"]
    assert a["containment"] == sup.rstatus("a")["processes"]["containment"]
    if sup.containment == "cgroup":
        assert a["processes"] == 1 and a["memory-bytes"] > 0, a
        assert stats["services"]["b"]["processes"] == 0
    # the cached `status` carries no live figures
    assert "processes" not in sup.rstatus()["a"]
    bad = sup.request({"action": "stats", "args": [1]}, ro=True)
    assert bad["error"]["code"] == "bad-arguments", bad


def test_the_cache_follows_services_added_and_removed_by_reload(sup: Supervisor) -> None:
    config: dict[str, Any] = {"services": {"a": sleeper(sup.marker("a"))}}
    sup.start(config)
    assert set(sup.rstatus()) == {"a"}
    config["services"]["b"] = sleeper(sup.marker("b"), **{"auto-start": False})
    sup.write_config(config)
    assert sup.request({"action": "reload", "service": "root"})["ok"]
    assert set(sup.rstatus()) == {"a", "b"}
    del config["services"]["a"]
    sup.write_config(config)
    assert sup.request({"action": "reload", "service": "root"})["ok"]
    assert set(sup.rstatus()) == {"b"}


def test_summary_gives_each_service_once_in_its_section_and_follows_changes(sup: Supervisor) -> None:
    """`summary` is `herd status`'s sections alone (names only): every service
    in exactly the section its full SVC puts it in, on the read-only socket,
    and never stale once a change was acknowledged."""
    from herd.protocol import SUMMARY_SECTIONS, summary_section

    sup.start({"services": {
        "up": sleeper(sup.marker("up")),
        "idle": sleeper(sup.marker("idle"), **{"auto-start": False}),
        "off": sleeper(sup.marker("off"), **{"auto-start": False}),
        "once": py_service("pass", sup.marker("once"), **{"one-shot": True}),
    }})
    wait_running(sup, ["up"])
    sup.herd("disable", "off", check=0)
    ro = Client(sup.status_socket, timeout=30)
    try:
        def both() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
            summary = ro.call("summary")
            assert summary["ok"], summary
            expected: dict[str, list[str]] = {key: [] for key in SUMMARY_SECTIONS}
            for svc in ro.call("status")["result"]["services"]:
                expected[summary_section(svc)].append(svc["name"])
            return summary["result"], expected

        wait_until(lambda: both()[0]["one-shot"] == ["once"], timeout=20, what="the one-shot done")
        got, expected = both()
        assert got == expected
        assert (got["running"], got["stopped"], got["disabled"]) == (["up"], ["idle"], ["off"])
        assert sorted(n for names in got.values() for n in names) == ["idle", "off", "once", "up"]

        rw = Client(sup.socket, timeout=30)
        try:
            for action, section in (("start", "running"), ("stop", "stopped")):
                assert rw.call(action, "idle")["ok"]
                assert "idle" in ro.call("summary")["result"][section], (action, section)
        finally:
            rw.close()
        assert ro.call("summary", "up")["error"]["code"] == "unknown-action"
        assert ro.call("summary", args=[1])["error"]["code"] == "bad-arguments"
    finally:
        ro.close()
    out = sup.herd("status", check=0).stdout
    assert out == "Started:\n + up\nStopped:\n - idle\nOne-shot:\n * once\nDisabled:\n x off\n"
