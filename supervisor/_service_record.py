"""A service's record and status views, built from its actor's fields.

`record` is everything a service knows at run time, what a re-exec hands
over and what crash recovery reads back (the actor has it written: see
`Service.save`); `restore` takes a previous supervisor's record over, before
the actor runs; `snapshot` is what `status` shows.  Only `restore` writes
the service's fields, and only before its actor starts: afterwards the actor
is their only writer.
"""

from __future__ import annotations

import signal
import time
from typing import TYPE_CHECKING, Any

import structlog

from . import _proc, health, respawn
from ._actor import State
from .timer import timer_details

if TYPE_CHECKING:
    from .service import Service

__all__ = ["live_fields", "process_stats", "record", "restore", "snapshot"]

log = structlog.get_logger("supervisor.service")


def record(service: Service) -> dict[str, Any]:
    """Everything this service knows at run time, TOML-able: what a
    re-exec hands over and what crash recovery reads back."""
    child = service.child if service.child is not None and service.child.alive else None
    type_state = service.spec.type_state.to_record() if service.spec.type_state is not None else None
    return {
        "name": service.name,
        "state": service.state.value,
        "since": service.since,
        "enabled": service.enabled,
        "disabled-reason": None if service.enabled else service.disabled_reason,
        "intent": service.intent,
        "pid": child.pid if child else None,
        "pid-start": child.start_time_ticks if child else None,
        "cgroup": service.containment.cgroup.rel if service.containment.cgroup is not None else None,
        "guards": service.guards if child else None,
        "one-shot-done": service.one_shot_done,
        "stayed-down": service._stayed_down,
        "status-text": service.status_text,
        "last-exit": service.last_exit.to_json() if service.last_exit else None,
        "last-failure": service.last_failure,
        "last-run": service.timer.last_run,
        "respawns": list(service.history.respawns),
        "startup-failures": list(service.history.startup_failures),
        "respawn-history": service.respawn_history.to_record(time.monotonic(), time.time()),
        "type-state": type_state or None,
        "respawn-at": service.respawn_at,
        "respawn-wait": service.respawn_wait,
        "health": service.health.to_record() if service.spec.health is not None else None,
    }



def restore(service: Service, record: dict[str, Any], child: _proc.Child | None) -> None:
    """Take over a previous supervisor's record (before `run`).

    `child` is the still-running main process, already verified (same pid,
    start time and cgroup) and opened by pidfd; None when it is gone.  A
    service without a process (hooks, a timer) that was running is
    running again, without running its start hook again.
    """
    service.restored = True
    service.enabled = bool(record.get("enabled", True))
    service.disabled_reason = record.get("disabled-reason") if not service.enabled else None
    service.intent = record.get("intent")
    service.last_failure = record.get("last-failure")
    service.timer.last_run = record.get("last-run")
    service.status_text = record.get("status-text")
    service._stayed_down = record.get("stayed-down")
    service.history.respawns.extend(record.get("respawns", []))
    service.history.startup_failures.extend(record.get("startup-failures", []))
    service.respawn_history = respawn.History.from_record(record.get("respawn-history"),
                                                       time.monotonic(), time.time())
    _restore_health(service, record)
    if service.spec.type_state is not None and isinstance(record.get("type-state"), dict):
        try:
            service.spec.type_state.from_record(record["type-state"])
        except Exception:  # a record from another version: start from scratch
            log.warning("could not restore the service type's state", exc_info=True)
    exit_ = record.get("last-exit")
    if isinstance(exit_, dict):
        sig = exit_.get("signal")
        signum = getattr(signal.Signals, sig, None) if isinstance(sig, str) else None
        service.last_exit = _proc.ExitStatus(exit_.get("code"), int(signum) if signum else None,
                                          float(exit_.get("time", 0)))
    since = record.get("since")
    if isinstance(since, (int, float)):
        service.since = float(since)
    processless = service.spec.command is None or service.spec.schedule is not None or service.spec.accepts
    if child is not None:
        service.child = child
        service.state = State.RUNNING
        if isinstance(record.get("guards"), dict):
            service.guards = record["guards"]
    elif processless and record.get("state") == State.RUNNING.value and service.enabled:
        service.state = State.RUNNING
        service._hook_ran = service.spec.command is None
    elif service.spec.one_shot and record.get("one-shot-done"):
        service.one_shot_done = True
    if service.state is State.STOPPED and record.get("state") != State.STOPPED.value:
        service.since = time.time()  # it was up, and is not any more
    at, wait = record.get("respawn-at"), record.get("respawn-wait")
    if (service.state is State.STOPPED and service.enabled and service.spec.respawn_backoff is not None
            and _number(at) and _number(wait)):
        service.respawn_at, service.respawn_wait = float(at), float(wait)  # the actor waits out the rest


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _restore_health(service: Service, record: dict[str, Any]) -> None:
    """The checks' results go on; an exec check the previous supervisor left
    running (it was killed, or re-executed, mid-check) is killed."""
    state = health.HealthState.from_record(record.get("health"))
    if state.check_pid is not None:
        if health.kill_check(state.check_pid, state.check_start):
            log.info("killed a health check left running", pid=state.check_pid)
        state.check_pid = state.check_start = None
    if service.spec.health is not None:
        service.health = state



def snapshot(service: Service, *, log_lines: int = 0) -> dict[str, Any]:
    spec = service.spec
    out: dict[str, Any] = {
        "name": spec.name,
        "provides": list(spec.names),
        "requires": list(spec.requires),
        "state": service.state.value,
        "enabled": service.enabled,
        "disabled-reason": None if service.enabled else service.disabled_reason,
        "one-shot": spec.one_shot,
        "respawn": spec.respawn,
        "auto-start": spec.auto_start,
        # the actor's own view: a death its monitor noticed but the actor
        # has not handled yet still shows, with the state, until it is
        "pid": service.child.pid if service.child is not None else None,
        "since": service.since,
        "command": list(spec.command) if spec.command is not None else None,
        "ready": spec.ready.to_json(),
        "status-text": service.status_text,
        "last-exit": service.last_exit.to_json() if service.last_exit else None,
        "respawns": list(service.history.respawns),
        "startup-failures": list(service.history.startup_failures),
        "last-failure": service.last_failure,
        "log-file": str(service.output.path) if spec.command is not None else None,
        "actions": [a.name for a in spec.actions] + (["trigger"] if spec.schedule else []),
        "replacement-pending": service.pending_spec is not None,
        "timer": service.timer.to_json() if spec.schedule is not None else None,
        "documentation": spec.documentation,
        "next-respawn": service.respawn_at,
        "respawn-delay": service.respawn_wait,
        "health": service.health.to_json(spec.health) if spec.health is not None else None,
        "waiting": waiting(service),
        "inetd": service.inetd.to_json() if spec.accepts else None,
    }
    if log_lines:
        out.update(live_fields(service, log_lines, process_stats(service)))
    return out


def waiting(service: Service) -> dict[str, Any] | None:
    """What a starting or stopping service waits for: ``{"for", "since",
    "timeout"}`` (herd's progress line), or None.  Derived from its state,
    `since` and definition only, so a cached status stays true."""
    spec = service.spec
    if service.state is State.STARTING:
        ready = spec.ready
        what = {"notify": "READY=1", "pid-file": f"its PID file {ready.path}",
                "tcp": f"a connection to {ready.address}", "unix": f"a connection to {ready.path}"}
        return {"for": what.get(ready.type, "its process to start"), "since": service.since,
                "timeout": spec.start_timeout}
    if service.state is State.STOPPING:
        try:
            sig = signal.Signals(spec.stop_signal).name
        except ValueError:
            sig = f"signal {spec.stop_signal}"
        return {"for": f"its processes to exit after {sig}", "since": service.since,
                "timeout": spec.stop_timeout}
    return None


def live_fields(service: Service, log_lines: int, processes: dict[str, Any]) -> dict[str, Any]:
    """What `status SERVICE` adds to the SVC object, read at each request:
    the recent log, the live figures (`processes`) and the service type's details."""
    spec = service.spec
    out: dict[str, Any] = {"recent-log": [line.to_json() for line in service.output.recent(log_lines)],
                           "processes": processes}
    if spec.schedule is not None:
        out["details"] = timer_details(service.timer.to_json())
    if spec.details_hook is not None:
        try:
            out["details"] = spec.details_hook(spec)
        except Exception as exc:  # a details hook must never break status
            out["details"] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def process_stats(service: Service) -> dict[str, Any]:
    """Live figures of the service's processes (cgroup), for one-service status."""
    stats: dict[str, Any] = {"containment": service.containment.mode}
    if service.containment.cgroup is not None:
        stats["cgroup"] = service.containment.cgroup.rel
        stats.update(service.containment.stats() or {})
        if service.state is State.STOPPED and stats.get("processes"):
            stats["left-over"] = stats["processes"]  # kill-mode "process" left them running
    return stats
