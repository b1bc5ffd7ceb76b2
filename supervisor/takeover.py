"""Taking over from a previous supervisor: after a re-exec, or after a crash.

`restore` runs before the engine does: it reads each service's record and
adopts what still runs.  After a re-exec, the old image handed over each
service's open descriptors and its record (`describe`, written into the
handover file by `reexec.Reexec`); after a crash, a recorded PID is adopted only if it is
the same process, and the keeper gives back the pipes and listening sockets
it held (docs/keeper.md).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import structlog

from . import _guard, _proc, _service_record, _sockets
from ._keeper_link import Held, close_held, pipe_key, socket_key
from ._state import StateStore, same_process
from ._transient import Spawned

if TYPE_CHECKING:
    from .engine import Engine
    from .service import Service

__all__ = ["describe", "restore"]

log = structlog.get_logger("supervisor.engine")


def restore(engine: Engine, store: StateStore, handover: dict[str, Any] | None = None,
            kept: Held | None = None) -> None:
    """Before `Engine.run`: read the service records; adopt what still runs.

    After a re-exec, `handover` holds the open descriptors of each service
    (pidfd, pipes, listening sockets), which are taken over as they are.
    After a crash, a recorded PID is adopted only if the process with that
    PID started when the record says (a reused PID is never adopted), and
    the pipes and listening sockets the keeper held (`kept`, from
    `KeeperLink.open`) are taken back.
    """
    kept = dict(kept or {})
    handed: dict[str, Any] = (handover or {}).get("services", {})
    # Always load: it opens the journal and keeps every record for the next
    # compaction (a snapshot of only what changed since would lose the rest);
    # with the journal that is one snapshot and one short file to read.
    on_disk = store.load()
    revived = _revive_transients(engine, store, handed, on_disk)
    records = _handed_records(handed, engine) or on_disk
    engine.store = store
    engine.resumed_by_reexec = handover is not None
    events = (handover or {}).get("events")
    if isinstance(events, dict) and isinstance(events.get("epoch"), str):
        engine.events.take_over(events)
    else:  # a fresh start: a new epoch, remembered with the earlier ones
        engine.events.remember(store.dir.parent)
    for name, service in engine.services.items():
        service.store = store
        record, passed = records.get(name), handed.get(name)
        if (passed is None and record is not None and Spawned.parse(record) is not None
                and not isinstance(service.spec.type_state, Spawned)):
            # a transient's (herd spawn), before the configuration took its name
            log.warning("a transient service's record is not taken over by the configured service "
                        "of the same name, nor its process", service=name,
                        pid=record.get("pid"))
            record = None
        child = None
        if passed is not None:
            service.output.take_over(passed.get("output", {}))
            service.take_over_listeners(passed.get("listeners", []))
            if passed.get("pidfd") is not None:
                os.set_inheritable(passed["pidfd"], False)
                child = _proc.Child(passed["pid"], passed["pidfd"])
        else:
            _take_kept(service, kept)
        if passed is None and record is not None and record.get("pid") and service.spec.command is not None:
            group = service.containment.cgroup
            if group is not None and not group.contains(record["pid"]):
                log.info("recorded process is gone", service=name, pid=record["pid"],
                         why="no such process in the service's cgroup")
            elif same_process(record["pid"], record.get("pid-start")):
                try:
                    child = _proc.Child.adopt(record["pid"])
                    log.info("adopted a running service", service=name, pid=child.pid)
                except OSError:
                    child = None
            else:
                log.info("recorded process is gone", service=name, pid=record["pid"])
        if passed is None and child is not None and record is not None:
            _reclaim_pipes(service, child, record)
        if record is not None or child is not None:
            _service_record.restore(service, record or {}, child)
            service.output.reload_history()
    for name in revived:
        service = engine.services[name]
        if service.child is None:  # not adopted after all (not in its cgroup, say): forget it again
            log.info("transient service ended", service=name, pid=(records.get(name) or {}).get("pid"),
                     why="its process was not found")
            service.output.close()
            del engine.services[name]
            engine.transients.running.discard(name)
            store.forget(name)
    close_held(kept)  # duplicates of what a re-exec handed over, or of what nothing uses
    for name, passed in handed.items():
        if name not in engine.services:  # dropped from the configuration meanwhile
            log.warning("service no longer configured; its process is left alone",
                        service=name, pid=passed.get("pid"))
            _close_passed(passed)


def _revive_transients(engine: Engine, store: StateStore, handed: dict[str, Any],
                       on_disk: dict[str, dict[str, Any]]) -> list[str]:
    """Put back the transients (`herd spawn`) whose process still runs: handed
    over by a re-exec (with its pidfd), or after a crash, the same process as
    its record says; return their names.  Those that ended meanwhile are
    forgotten."""
    revived = []
    for name in sorted({*handed, *on_disk} - engine.services.keys()):
        passed = handed.get(name)
        record = (passed or {}).get("record") or on_disk.get(name)
        if not isinstance(record, dict) or Spawned.parse(record) is None:
            continue
        if passed is not None:
            alive = passed.get("pidfd") is not None
        else:
            pid = record.get("pid")
            alive = type(pid) is int and pid > 0 and same_process(pid, record.get("pid-start"))
        if alive and engine.transients.revive(name, record):
            revived.append(name)
            continue
        store.forget(name)
        on_disk.pop(name, None)
        if passed is not None and not alive:  # ended just before the re-exec: nothing to leave alone
            _close_passed(handed.pop(name))
    return revived


def _close_passed(passed: dict[str, Any]) -> None:
    """Close the descriptors a re-exec handed over for a service not taken over."""
    for fd in [passed.get("pidfd"), *passed.get("listeners", []),
               *[f for pair in passed.get("output", {}).get("pipes", {}).values() for f in pair]]:
        if isinstance(fd, int):
            os.close(fd)


def describe(engine: Engine) -> dict[str, Any]:
    """Each service's open descriptors, for a re-exec (see `restore`)."""
    out: dict[str, Any] = {}
    for name, service in engine.services.items():
        child = service.child if service.child is not None and service.child.alive else None
        out[name] = {
            "pid": child.pid if child else None,
            "pidfd": child.pidfd if child else None,
            "output": service.output.handover(),
            "listeners": [sock.fileno() for sock in service.listeners],
        }
        record = _service_record.record(service)
        try:
            json.dumps(record)  # a service type's state could hold what only TOML writes
        except (TypeError, ValueError):
            continue  # the new image reads the records from disk (flushed before the exec)
        out[name]["record"] = record
    return out


def _handed_records(handed: dict[str, Any], engine: Engine) -> dict[str, dict[str, Any]] | None:
    """Every service's record from a re-exec's hand-over, or None (then
    they are read from disk).  Both are written by the previous image at the
    exec; reading 1,000 TOML files took 0.3 s of a re-exec."""
    records = {name: (handed.get(name) or {}).get("record") for name in engine.services}
    if not handed or not all(isinstance(r, dict) for r in records.values()):
        return None
    return records  # type: ignore[return-value]


def _take_kept(service: Service, kept: Held) -> None:
    """Crash recovery: the service's pipes and listening sockets, from the keeper.

    Sockets are taken only when the keeper holds every one the service's
    definition names (else they are all bound anew)."""
    pipes = {stream: fds for stream in ("stdout", "stderr")  # the read end (an older keeper has the write end after it)
             if (item := kept.pop(pipe_key(service.name, stream), None)) is not None
             and 1 <= len(fds := item[1]) <= 2}
    if pipes:
        service.output.take_over({"pipes": pipes})
    wanted = [socket_key(service.name, _sockets.describe(spec)) for spec in service.spec.sockets]
    if wanted and all(key in kept and len(kept[key][1]) == 1 for key in wanted):
        service.take_over_listeners([kept.pop(key)[1][0] for key in wanted])


def _reclaim_pipes(service: Service, child: _proc.Child, record: dict[str, Any]) -> None:
    """Crash recovery with no keeper (it was killed too): take the pipes the
    keeper did not hand back from the adopted service itself (`_guard`)."""
    taken: dict[str, list[int]] = {}
    failed: dict[str, str] = {}
    guards = record.get("guards") if isinstance(record.get("guards"), dict) else {}
    for stream in [s for s in _guard.STREAM_FDS if s not in service.output.pipes]:
        try:
            taken[stream] = [_guard.reclaim(child.pidfd, stream, guards.get(stream))]
        except OSError as exc:
            failed[stream] = exc.strerror or str(exc)
    if failed:
        log.warning("output pipes not recovered (keeper gone, guard closed): what the service writes there "
                    "is lost, and it may die of SIGPIPE", service=service.name, pid=child.pid, errors=failed)
    if taken:
        log.info("took the output pipes back from the service itself", service=service.name, pid=child.pid,
                 streams=sorted(taken))
        service.output.take_over({"pipes": taken})
