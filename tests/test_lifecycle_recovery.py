"""Issue 8 acceptance: what survives the supervisor process.

* Crash recovery: after the supervisor (not PID 1) is SIGKILLed, a new one
  started with the same state directory and configuration re-adopts the
  services that still run (same PIDs, checked against the kernel's start
  time so a reused PID is never adopted), starts only what is missing, and
  keeps supervising the adopted processes (a later SIGKILL is respawned).
* Runtime intent: ``herd stop X`` and ``herd disable X`` are remembered in
  the state directory, so neither a crash nor a clean restart (SIGTERM, start
  again) undoes them.

The services here are plain ``sleep``; services that print through a crash
are test_lifecycle_crash.py's (the keeper holds their pipes).  A SIGKILLed
supervisor's children are re-parented to init; the harness's teardown finds
them by the token in their environment.
"""

from __future__ import annotations

import os
import signal
import subprocess

import psutil
import pytest

from helpers import (  # crash, restart and wait_running: test_lifecycle_crash imports them from here
    MARKER_ENV,
    SLEEP,
    TOKEN_ENV,
    Supervisor,
    append_record,
    assert_no_process,
    assert_one_process_each,
    crash,
    daemon_events,
    find_pids,
    pid_alive,
    read_record,
    restart,
    sleeper,
    wait_respawned,
    wait_running,
    wait_state,
    wait_until,
)

# --------------------------------------------------------------------------
# Crash recovery


def test_crash_recovery_readopts_running_services(sup: Supervisor) -> None:
    workers = [f"w{i}" for i in range(10)]
    services = {name: sleeper(sup.marker(name)) for name in workers}
    services.update({
        "gone": sleeper(sup.marker("gone")),         # dies while no supervisor runs
        "held": sleeper(sup.marker("held")),         # stopped by the operator
        "held-dep": sleeper(sup.marker("held-dep"), requires=["held"]),
        "off": sleeper(sup.marker("off")),           # disabled by the operator
    })
    sup.start({"services": services})
    pids = wait_running(sup, [*workers, "gone", "held", "held-dep", "off"])

    sup.herd("stop", "held", check=True)           # takes held-dep down first
    assert_no_process(sup, "held", "held-dep")
    sup.herd("disable", "off", check=True)
    os.kill(pids["off"], signal.SIGKILL)            # disabled: not respawned
    wait_state(sup, "off", "stopped")
    assert_no_process(sup, "off")

    crash(sup)
    kept = {name: pids[name] for name in workers}
    assert all(pid_alive(pid) for pid in kept.values()), "a service died with the supervisor"
    os.kill(pids["gone"], signal.SIGKILL)
    wait_until(lambda: not pid_alive(pids["gone"]), 5, "gone to die")

    restart(sup)
    after = wait_running(sup, [*workers, "gone"])
    # The same ten processes, supervised again; only the missing one was started.
    assert {n: after[n] for n in workers} == kept
    assert after["gone"] != pids["gone"]
    assert_one_process_each(sup, after)
    # The operator's stop and disable hold across the crash.
    status = sup.status()
    assert status["held"]["state"] == "stopped" and status["held-dep"]["state"] == "stopped"
    assert status["off"]["state"] == "stopped" and status["off"]["enabled"] is False, status["off"]
    assert_no_process(sup, "held", "held-dep", "off")
    cp = sup.herd("start", "off", check=1)
    assert "disabled" in cp.stdout + cp.stderr

    events = daemon_events(sup)
    adopted = sorted(ev["service"] for ev in events if ev["event"] == "adopted a running service")
    assert adopted == sorted(workers), adopted

    # Adopted processes stay supervised: a SIGKILL is noticed and respawned.
    os.kill(kept["w3"], signal.SIGKILL)
    svc = wait_respawned(sup, "w3", kept["w3"])
    after["w3"] = svc["pid"]
    assert_one_process_each(sup, after)


def test_a_service_added_by_reload_is_remembered_through_a_crash(sup: Supervisor) -> None:
    """A service a reload added has its record kept like the others: a crash
    later, the next supervisor re-adopts its process (same PID, not a second
    one), and an operator's stop of it is remembered."""
    sup.start({"services": {"a": sleeper(sup.marker("a"))}})
    wait_running(sup, ["a"])
    sup.write_config({"services": {"a": sleeper(sup.marker("a")), "b": sleeper(sup.marker("b")),
                                   "c": sleeper(sup.marker("c"))}})
    sup.herd("reload", "root", check=True)
    pids = wait_running(sup, ["a", "b", "c"])
    sup.herd("stop", "c", check=True)
    crash(sup)
    restart(sup)
    assert wait_running(sup, ["a", "b"]) == {"a": pids["a"], "b": pids["b"]}
    assert_one_process_each(sup, {"a": pids["a"], "b": pids["b"]})
    assert sup.status("c")["state"] == "stopped"
    assert_no_process(sup, "c")


def test_adopted_service_is_respawned_after_sigkill(sup: Supervisor) -> None:
    workers = [f"w{i}" for i in range(3)]
    sup.start({"services": {name: sleeper(sup.marker(name)) for name in workers}})
    pids = wait_running(sup, workers)
    crash(sup)
    restart(sup)
    assert wait_running(sup, workers) == pids
    for victim in ("w0", "w2"):
        os.kill(pids[victim], signal.SIGKILL)
        svc = wait_respawned(sup, victim, pids[victim])
        pids[victim] = svc["pid"]
    assert_one_process_each(sup, pids)
    assert sup.rstatus("w1")["pid"] == pids["w1"]
    # And the supervisor stops adopted processes like its own.
    sup.herd("stop", "w1", check=True)
    assert_no_process(sup, "w1")


def test_reused_pid_is_never_adopted(sup: Supervisor) -> None:
    """The record of a service names a PID that now belongs to another process
    (simulated: the record is pointed at a decoy started earlier): it is not
    adopted, and not touched."""
    decoy_marker = sup.marker("decoy")
    decoy = subprocess.Popen([SLEEP, "1000000"], env={**os.environ, MARKER_ENV: decoy_marker,
                                                      TOKEN_ENV: sup.token},
                             stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        sup.start({"services": {"svc": sleeper(sup.marker("svc")), "other": sleeper(sup.marker("other"))}})
        pids = wait_running(sup, ["svc", "other"])
        crash(sup)
        os.kill(pids["svc"], signal.SIGKILL)
        wait_until(lambda: not pid_alive(pids["svc"]), 5, "svc to die")

        record = read_record(sup.state_dir, "svc")
        assert record is not None and record.get("pid") == pids["svc"], record
        gap = psutil.Process(pids["other"]).create_time() - psutil.Process(decoy.pid).create_time()
        assert gap > 0.1, f"the decoy started only {gap:.3f} s before the services"
        record["pid"] = decoy.pid  # the PID number is alive again, as another process
        append_record(sup.state_dir, record)

        restart(sup)
        after = wait_running(sup, ["svc", "other"])
        assert after["other"] == pids["other"]
        assert after["svc"] not in (pids["svc"], decoy.pid), "the decoy was adopted"
        assert find_pids(sup.marker("svc")) == {after["svc"]}
        sup.herd("stop", "svc", check=True)
        assert decoy.poll() is None and find_pids(decoy_marker) == {decoy.pid}, "the decoy was touched"
        events = daemon_events(sup)
        assert any(ev["event"] == "recorded process is gone" and ev.get("service") == "svc" for ev in events)
    finally:
        decoy.kill()
        decoy.wait()


@pytest.mark.cgroup_only
def test_process_spawned_just_before_a_crash_is_not_left_running(sup: Supervisor) -> None:
    """The supervisor is SIGKILLed after spawning a service but before its
    record names the new PID (simulated: the record is put back as it was
    before the start, stopped by the operator).  The next supervisor finds
    the process in the service's cgroup with no record of it: it stops it,
    so that "stopped" means nothing runs, instead of leaving it unsupervised."""
    sup.start({"services": {"svc": sleeper(sup.marker("svc")), "other": sleeper(sup.marker("other"))}})
    pids = wait_running(sup, ["svc", "other"])
    crash(sup)
    record = read_record(sup.state_dir, "svc")
    assert record is not None and record.get("pid") == pids["svc"], record
    for key in ("pid", "pid-start"):
        record.pop(key, None)
    record.update({"state": "stopped", "intent": "down"})
    append_record(sup.state_dir, record)

    restart(sup)
    wait_until(lambda: not find_pids(sup.marker("svc")), 20, "the unrecorded process to be stopped")
    assert sup.rstatus("svc")["state"] == "stopped"
    assert wait_running(sup, ["other"])["other"] == pids["other"], "a recorded service was touched"
    events = daemon_events(sup)
    assert any("no recorded process" in ev["event"] and ev.get("service") == "svc" for ev in events), \
        [ev["event"] for ev in events]


# --------------------------------------------------------------------------
# Intent across a clean restart


def test_intent_survives_a_clean_restart(sup: Supervisor) -> None:
    sup.start({"services": {
        "plain": sleeper(sup.marker("plain")),
        "held": sleeper(sup.marker("held")),
        "held-dep": sleeper(sup.marker("held-dep"), requires=["held"]),
        "off": sleeper(sup.marker("off")),
    }})
    wait_running(sup, ["plain", "held", "held-dep", "off"])
    sup.herd("stop", "held", check=True)
    sup.herd("disable", "off", check=True)  # disabled while it runs: it runs on until stopped

    assert sup.stop() == 0
    assert_no_process(sup, "plain", "held", "held-dep", "off")

    restart(sup)
    pids = wait_running(sup, ["plain"])
    status = sup.status()
    # Stopped by the operator: stays stopped, and so does what requires it.
    assert status["held"]["state"] == "stopped", status["held"]
    assert status["held-dep"]["state"] == "stopped", status["held-dep"]
    # Disabled: stays disabled, is not started, cannot be started.
    assert status["off"]["state"] == "stopped" and status["off"]["enabled"] is False, status["off"]
    cp = sup.herd("start", "off", check=1)
    assert "disabled" in cp.stdout + cp.stderr
    assert_no_process(sup, "held", "held-dep", "off")
    assert_one_process_each(sup, pids)

    # The operator changes their mind; that is remembered as well.
    sup.herd("enable", "off", check=True)
    sup.herd("start", "held", check=True)
    assert sup.stop() == 0
    restart(sup)
    pids = wait_running(sup, ["plain", "held", "held-dep", "off"])
    assert_one_process_each(sup, pids)
    assert sup.rstatus("off")["enabled"] is True
