"""Issue 21: respawn backoff (``respawn-backoff``), black-box.

A service that crashes at once is respawned after growing delays, capped,
never disabled; it waits them out `stopped`, with the next attempt in its
status; a stop cancels the attempt and a start makes it now; the pending
attempt survives a re-exec and a SIGKILL of the supervisor.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from helpers import (Collector, Supervisor, append_record, check_config, crash, py_service, read_record, reexec,
                     restart, wait_until)

#: Exits with code 1 at once, unless DIR/up exists: then runs until DIR/crash
#: appears, removes both and exits 1 (so the next run crashes at once again).
PY_CRASHER = r"""
import os, sys, time
d = sys.argv[1]
if not os.path.exists(d + "/up"):
    sys.exit(1)
while not os.path.exists(d + "/crash"):
    time.sleep(0.05)
os.unlink(d + "/up"); os.unlink(d + "/crash")
sys.exit(1)
"""

DELAY = re.compile(r"respawning in ([0-9.]+) s")


def crasher(flags: Path, backoff: dict[str, Any], **keys: Any) -> dict[str, Any]:
    flags.mkdir(exist_ok=True)
    return py_service(PY_CRASHER, str(flags), **{"respawn-backoff": backoff, **keys})


def delays(events: list[dict[str, Any]]) -> list[float]:
    """The backoff delays the state events announced, in order."""
    return [float(m[1]) for e in events if e.get("reason") and (m := DELAY.search(e["reason"]))]


def pending(sup: Supervisor, name: str, timeout: float = 20.0) -> dict[str, Any]:
    """Wait until `name` waits out a backoff delay; its SVC."""
    def waiting() -> dict[str, Any] | None:
        svc = sup.rstatus(name)
        return svc if svc["state"] == "stopped" and svc["next-respawn"] is not None else None

    return wait_until(waiting, timeout, f"{name} to wait for a respawn")


def test_delays_grow_to_the_cap_never_disable_and_reset_after_a_long_run(sup: Supervisor, tmp_path: Path) -> None:
    flags = tmp_path / "flags"
    sup.start({"services": {"loop": crasher(flags, {"initial": 0.3, "factor": 2, "max": 1.2,
                                                    "reset-after": 2}, **{"auto-start": False})}})
    events = Collector(sup.subscribe())
    sup.herd("start", "loop", check=None)
    # Six crashes in a row: far more than the default limit (5 in 7 s) allows.
    wait_until(lambda: len(delays(events.events("state"))) >= 6, 40, "six respawn steps")
    state = events.events("state")
    assert delays(state)[:6] == [0.3, 0.6, 1.2, 1.2, 1.2, 1.2]
    assert all(e["enabled"] for e in state), "the backoff must never disable the service"
    # Each step: running -> stopped (the delay announced), then stopped ->
    # starting no sooner than that delay later.
    waits = [(e, next(n for n in state[i + 1:] if n["from"] == "stopped" and n["to"] == "starting"))
             for i, e in enumerate(state) if e["to"] == "stopped" and DELAY.search(e.get("reason") or "")
             and any(n["to"] == "starting" for n in state[i + 1:])]
    assert len(waits) >= 5
    for stopped, started in waits:
        announced = float(DELAY.search(stopped["reason"])[1])  # type: ignore[index]
        assert started["time"] - stopped["time"] >= announced - 0.05, (stopped, started)
        assert "backoff" in started["reason"]
    # While it waits: stopped, the next attempt and the delay in its status.
    svc = pending(sup, "loop")
    assert svc["enabled"] is True and svc["respawn-delay"] == 1.2
    assert svc["next-respawn"] > svc["since"]
    # A run that lasts past reset-after: the next crash starts from `initial`.
    (flags / "up").write_text("")
    wait_until(lambda: sup.rstatus("loop")["state"] == "running", 20, "a run that stays up")
    time.sleep(2.5)  # past reset-after (2 s): what is tested is this duration
    n = len(delays(events.events("state")))
    (flags / "crash").write_text("")
    wait_until(lambda: len(delays(events.events("state"))) >= n + 2, 20, "two more steps")
    after = [e for e in events.events("state") if DELAY.search(e.get("reason") or "")][n:n + 2]
    assert [float(DELAY.search(e["reason"])[1]) for e in after] == [0.3, 0.6]  # type: ignore[index]
    assert "backoff reset" in after[0]["reason"]
    events.stop()


def test_stop_cancels_the_pending_respawn_and_start_makes_it_now(sup: Supervisor, tmp_path: Path) -> None:
    sup.start({"services": {"slow": crasher(tmp_path / "flags", {"initial": 60, "max": 600})}})
    svc = pending(sup, "slow")
    assert svc["respawn-delay"] == 60 and svc["next-respawn"] - time.time() > 30
    # herd shows it: stopped, respawning, listed as such in the summary
    human = sup.herd("status", "slow", check=0).stdout
    assert "It is stopped; respawning in " in human and "(backoff delay 60 s)" in human
    summary = sup.herd("status", check=0).stdout
    assert "Respawning:\n ~ slow" in summary and "Stopped:" not in summary
    events = Collector(sup.subscribe())
    # `herd start` does not wait a minute: it starts at once.
    cp = sup.herd("start", "slow", check=None)
    assert cp.returncode == 0, cp.stderr
    svc = wait_until(lambda: (s := sup.rstatus("slow"))["respawn-delay"] == 120 and s, 15,
                     "the next (doubled) delay after the start made at once")
    started = [e for e in events.events("state") if e["to"] == "starting"]
    assert started and "at once" in started[0]["reason"]
    # `herd stop` cancels the pending attempt: stopped, nothing pending, said so.
    cp = sup.herd("stop", "slow", check=None)
    assert cp.returncode == 0, cp.stderr
    svc = sup.rstatus("slow")
    assert svc["state"] == "stopped" and svc["next-respawn"] is None and svc["respawn-delay"] is None
    wait_until(lambda: any("pending respawn cancelled" in (e.get("reason") or "")
                           for e in events.events("state")), 10, "the cancellation's event")
    assert " - slow" in sup.herd("status", check=0).stdout  # plain stopped again
    assert any("pending respawn cancelled" in line[2] for line in sup.log_lines("slow"))
    events.stop()


def attempt_kept(sup: Supervisor, before: dict[str, Any]) -> None:
    """The pending attempt `before` showed is kept: still pending as it was,
    or made, but never before its time (a new supervisor that lost it would
    start the service at once)."""
    now = sup.rstatus("loop")
    if time.time() < before["next-respawn"] - 0.05:  # (under load, the attempt may be made already)
        assert now["state"] == "stopped" and now["respawn-delay"] == before["respawn-delay"], (before, now)
        assert abs(now["next-respawn"] - before["next-respawn"]) < 0.01, (before, now)
    svc = wait_until(lambda: (s := sup.rstatus("loop"))["respawns"] != before["respawns"] and s, 60,
                     "the attempt")
    first = [t for t in svc["respawns"] if t not in before["respawns"]][0]
    assert first >= before["next-respawn"] - 0.05, (before, svc)


def test_a_pending_respawn_survives_a_reexec(sup: Supervisor, tmp_path: Path) -> None:
    sup.start({"services": {"loop": crasher(tmp_path / "flags", {"initial": 8, "max": 100})}})
    before = pending(sup, "loop")
    reexec(sup)
    attempt_kept(sup, before)


def test_a_pending_respawn_survives_a_sigkill_of_the_supervisor(sup: Supervisor, tmp_path: Path) -> None:
    sup.start({"services": {"loop": crasher(tmp_path / "flags", {"initial": 8, "max": 100}),
                            "other": py_service("import time; time.sleep(1e6)")}})
    before = pending(sup, "loop")
    crash(sup)
    restart(sup)  # its autostart must not start "loop" early
    attempt_kept(sup, before)


def test_backoff_settings_are_checked(tmp_path: Path) -> None:
    cp = check_config(tmp_path, """
[services.a]
command = ["/bin/true"]
respawn-backoff = { initial = 0, factor = 0.5, max = 1, reset-after = -1, typo = 2 }
respawn-limit = { count = 3, seconds = 10 }
[services.b]
command = ["/bin/true"]
respawn = false
respawn-backoff = { initial = 5, max = 1 }
[services.c]
command = ["/bin/true"]
one-shot = true
respawn-backoff = { initial = 1 }
""")
    assert cp.returncode != 0
    for text in ("services.a.respawn-backoff.initial: must be greater than 0",
                 "services.a.respawn-backoff.factor: must be at least 1",
                 "services.a.respawn-backoff.reset-after: must be greater than 0",
                 "services.a.respawn-backoff.typo: unknown key",
                 'services.a.respawn-limit: does not apply with "respawn-backoff"',
                 "services.b.respawn-backoff.max: must be at least initial (5)",
                 "services.b.respawn-backoff: has no effect with respawn = false",
                 "services.c.respawn-backoff: applies to long-running services only"):
        assert text in cp.stderr + cp.stdout, text


def test_a_respawn_due_while_the_supervisor_was_down_comes_at_its_start(sup: Supervisor, tmp_path: Path) -> None:
    sup.start({"services": {"loop": crasher(tmp_path / "flags", {"initial": 2, "max": 100})}})
    before = pending(sup, "loop")
    crash(sup)
    # what is tested is this: the attempt's time passes while no supervisor runs
    wait_until(lambda: time.time() > before["next-respawn"] + 0.5, 10, "the attempt's time to pass")
    restart(sup)
    wait_until(lambda: sup.rstatus("loop")["respawn-delay"] == 4, 15, "the overdue attempt, made at the start")


def test_a_garbled_pending_respawn_in_the_record_is_ignored(sup: Supervisor, tmp_path: Path) -> None:
    sup.start({"services": {"loop": crasher(tmp_path / "flags", {"initial": 60, "max": 100})}})
    pending(sup, "loop")
    crash(sup)
    record = read_record(sup.state_dir, "loop")
    assert record is not None
    record["respawn-at"], record["respawn-wait"] = "soon", [1]
    append_record(sup.state_dir, record)
    restart(sup)
    # no pending attempt to honour: autostart starts it (it crashes at once, and waits again)
    svc = wait_until(lambda: (s := sup.rstatus("loop"))["next-respawn"] is not None and s, 15, "a fresh attempt")
    assert svc["respawn-delay"] in (60, 100)


def test_stopping_a_requirement_cancels_a_dependents_pending_respawn(sup: Supervisor, tmp_path: Path) -> None:
    """Else the respawn would start the requirement again behind the stop."""
    sup.start({"services": {
        "base": py_service("import time; time.sleep(1e6)"),
        "loop": crasher(tmp_path / "flags", {"initial": 3, "max": 100}, requires=["base"]),
    }})
    before = pending(sup, "loop")
    cp = sup.herd("stop", "base", check=None)
    assert cp.returncode == 0, cp.stderr
    after = sup.rstatus()
    assert after["loop"]["next-respawn"] is None and after["base"]["state"] == "stopped"
    # past the cancelled attempt's time: nothing came back up
    wait_until(lambda: time.time() > before["next-respawn"] + 1, 10, "the cancelled attempt's time to pass")
    after = sup.rstatus()
    assert (after["loop"]["state"], after["base"]["state"]) == ("stopped", "stopped"), after
