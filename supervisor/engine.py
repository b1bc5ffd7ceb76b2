"""The engine: the graph of service actors, and operations across it.

Starting pulls requirements first (independent ones in parallel, each
service's actor deduplicating concurrent starts); stopping takes dependents
down first.  Reads (`status`, `graph`, logs) are served from the actors'
current fields and never wait on an actor.  Every state change is published
to subscribers as an event.  A reload's diff is applied by `reload`;
taking over after a re-exec or a crash is `takeover`'s.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import structlog
import trio

from herd.protocol import MAX_BACKLOG, ProtocolError

from . import __version__
from ._backlog import Backlog
from ._events import EventLog
from ._messages import MESSAGES, say
from ._notify_server import ancestors, session_of
from ._keeper_link import KeeperLink
from ._output import LogHub, ServiceOutput
from . import _sockets, reload
from ._pacer import Pacer
from ._service_record import snapshot
from ._status_cache import Encoded, StatusCache
from ._cgroup import Hierarchy, Watcher
from ._containment import Containment
from ._state import StateStore
from .config import Config
from .graph import Graph
from .service import Outcome, Service, State
from .spec import ActionContext, ActionSpec
from .timer import TRIGGER

__all__ = ["Engine", "say", "MESSAGES", "TRIGGER"]

log = structlog.get_logger("supervisor.engine")

class Engine:
    """Owns the service actors; the control server only calls its methods."""

    def __init__(self, config: Config, *, log_dir: Path, notify_socket: Path | None = None,
                 overrides: dict[str, Any] | None = None, cgroups: Hierarchy | None = None,
                 no_cgroups_reason: str | None = None, keeper: KeeperLink | None = None) -> None:
        self.config = config
        self.keeper = keeper  # holds pipes and sockets while we are down (docs/keeper.md)
        #: this supervisor's cgroup subtree; None: fall back to process trees
        self.cgroups = cgroups
        self.no_cgroups_reason = no_cgroups_reason
        self.watcher = Watcher() if cgroups is not None else None
        self.resumed_by_reexec = False  # set by takeover.restore() when a re-exec handed over
        self._reload_lock = trio.Lock()
        self.reloads_waiting = 0  # reloads asked for while another (or a re-exec) holds the lock
        # Events are numbered: `seq` is contiguous for this `epoch`, which is
        # drawn at a fresh start and kept across a re-exec; the last ones are
        # kept for subscribers that come back (`_events`).
        self.events = EventLog()
        self.store: StateStore | None = None  # the service records (set by takeover.restore)
        self.overrides = overrides or {}
        self.notify_socket = notify_socket
        #: reads the notify messages the kernel holds now (`NotifyServer.drain`; set by cli)
        self.hear_notify: Callable[[], None] | None = None
        self.graph: Graph = config.graph
        self.log_dir = log_dir
        self.hub = LogHub()
        self.services: dict[str, Service] = {}
        #: the encoded `status` replies, built once per change (`_status_cache`)
        self.status_cache = StatusCache(self.services)
        self._subscribers: set[Backlog[dict[str, Any]]] = set()
        self._nursery: trio.Nursery | None = None
        self.shutting_down = False
        self._pacer = Pacer()
        self.started_at = time.time()
        from ._transient import Transients

        self.transients = Transients(self)  # `herd spawn`
        for spec in config.services:
            self.services[spec.name] = self._new_service(spec)

    def _new_service(self, spec: Any) -> Service:
        path = Path(spec.log_file) if spec.log_file else self.log_dir / f"{spec.name}.log"
        group = self.cgroups.service(spec.name) if self.cgroups is not None else None
        containment = Containment(spec.name, group, self.watcher, self.pid_owner)
        service = Service(spec, log_path=path, hub=self.hub, publish=self._on_state,
                          notify_socket=self.notify_socket, activate=self._activate, containment=containment)
        service.on_change = self.status_cache.changed
        service.hear_notify = self._hear_notify
        service.store = self.store  # None until takeover.restore sets it (then for services a reload adds)
        if self.keeper is not None:
            service.output.on_pipe = self._keep_pipe
            service.on_listeners = self._keep_listeners
        return service

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run every service actor until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.watcher is not None:
                await nursery.start(self.watcher.run)
            if self.store is not None:
                await nursery.start(self.store.run)
            for service in list(self.services.values()):  # (an ended transient may leave meanwhile)
                if self.services.get(service.name) is service:
                    await nursery.start(self._run_actor, service)
            task_status.started()
            await trio.sleep_forever()

    @staticmethod
    async def _run_actor(service: Service, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            service.run_scope = scope
            await service.run(task_status=task_status)

    # -- the keeper (docs/keeper.md) -----------------------------------------------------

    def _keep_pipe(self, output: ServiceOutput, stream: str, fd: int | None) -> None:
        assert self.keeper is not None
        self.keeper.keep_pipe(output.service, stream, fd, output.path, output.max_size, output.max_backups)

    def _keep_listeners(self, service: Service) -> None:
        assert self.keeper is not None
        self.keeper.keep_sockets(service.name, [(_sockets.describe(spec), sock.fileno())
                                                for spec, sock in zip(service.spec.sockets, service.listeners)])

    def keep_all(self) -> None:
        """Once running: put every pipe in the keeper (taken over ones too) and
        let it drop what nothing uses any more.  Listening sockets are put as
        each actor binds (or takes over) them."""
        if self.keeper is None:
            return
        for service in self.services.values():
            for stream, fd in service.output.pipes.items():
                self._keep_pipe(service.output, stream, fd)
        self.keeper.forget_stale()

    def busy(self) -> list[str]:
        """Services in the middle of a transition."""
        return [n for n, s in self.services.items() if s.state in (State.STARTING, State.STOPPING)]

    # -- reload --------------------------------------------------------------------------

    async def reload(self, path: Path | None = None, *, requester: int | None = None,
                     counted: bool = False) -> dict[str, Any]:
        """Apply a configuration file as a diff; an invalid one changes nothing.

        Reloads are applied one after the other, never interleaved.

        The file is read and parsed in a worker thread.  `requester` is the
        uid of the client that asked (None: the daemon itself, on SIGHUP);
        see `_config_file.read_config_file` for what it may load.

        Raises:
            ProtocolError: ``config-error`` with every error (key paths),
                ``permission-denied`` (the requester may not load this file),
                or ``bad-arguments`` when there is no file to read.
        """
        if not counted:  # (SIGHUP: counted by the signal handler already)
            self.reloads_waiting += 1
        try:
            await self._reload_lock.acquire()
        finally:
            self.reloads_waiting -= 1
        try:
            self._check_running()
            return await reload.apply(self, path, requester)
        finally:
            self._reload_lock.release()

    async def add_service(self, spec: Any) -> None:
        """A new service (a reload): its actor, running."""
        service = self._new_service(spec)
        self.services[spec.name] = service
        self.status_cache.changed(spec.name)
        assert self._nursery is not None
        await self._nursery.start(self._run_actor, service)

    def start_soon(self, fn: Any, *args: Any) -> None:
        """Run `fn(*args)` as a task of the engine."""
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    def remove_service(self, name: str) -> None:
        """A service gone from the configuration (a reload, after it stopped) or an
        ended transient: its actor ends, its record is forgotten."""
        service = self.services.pop(name)
        self.status_cache.changed(name)
        if service.store is not None:  # its record goes too: names come and go (herd spawn)
            service.store.forget(name)
            service.store = None
        if service.run_scope is not None:
            service.run_scope.cancel()

    async def hold_reloads(self) -> None:
        """Wait for a reload under way, and keep others out (a re-exec)."""
        await self._reload_lock.acquire()

    def release_reloads(self) -> None:
        if self._reload_lock.locked():
            self._reload_lock.release()

    # -- events --------------------------------------------------------------------------

    def _on_state(self, service: Service, old: State, new: State, reason: str | None) -> None:
        self.status_cache.state_changed(service.name)
        event = self.events.number({
            "event": "state",
            "service": service.name,
            "from": old.value,
            "to": new.value,
            "pid": service.child.pid if service.child is not None and service.child.alive else None,
            "time": service.since if old is not new else time.time(),
            "reason": reason,
            "enabled": service.enabled,
        })
        if old is not new:
            log.info("state", service=service.name, old=old.value, new=new.value, reason=reason)
        for backlog in self._subscribers:  # a subscriber too far behind loses events, counted
            backlog.put(event)
        if self.transients.running:
            self.transients.on_state(service, new)

    @property
    def epoch(self) -> str:
        return self.events.epoch

    @property
    def seq(self) -> int:
        return self.events.seq

    @contextmanager
    def subscribe(self, replay: list[dict[str, Any]] = ()) -> Iterator[Backlog[dict[str, Any]]]:
        """The state events from now on (after those of `replay`), until the block ends."""
        backlog: Backlog[dict[str, Any]] = Backlog(MAX_BACKLOG + len(replay))
        for event in replay:
            backlog.put(event)
        self._subscribers.add(backlog)
        try:
            yield backlog
        finally:
            self._subscribers.discard(backlog)

    async def _activate(self, service: Service) -> bool:
        """A connection arrived on a lazy service's socket: start it (and its requirements)."""
        try:
            await self.start(service.name, operator=False)
            return True
        except ProtocolError as exc:
            log.warning("socket activation failed", service=service.name, error=exc.message)
            return False

    # -- sd_notify -------------------------------------------------------------------------

    def pid_owner(self, pid: int, *, notify_only: bool = False) -> str | None:
        """The service a process belongs to: its cgroup's; without cgroups, the
        service whose main process it is, or is in the session or below of."""
        if self.cgroups is not None:
            name = self.cgroups.owner_of(pid)
            if name is None or name not in self.services:
                return None
            return name if not notify_only or self.services[name].spec.ready.type == "notify" else None
        mains: dict[int, str] = {}
        for s in self.services.values():
            if notify_only and s.spec.ready.type != "notify":
                continue
            if s.child is not None and s.child.alive:
                mains[s.child.pid] = s.name
            if (unheard := s.spawned_unheard()) is not None:  # its actor has not run since the spawn
                mains.setdefault(unheard.pid, s.name)
        found = mains.get(pid)
        if found is None:
            sid = session_of(pid)
            found = mains.get(sid) if sid is not None else None
        if found is None:
            found = next((mains[a] for a in ancestors(pid) if a in mains), None)
        return found

    def _hear_notify(self) -> None:
        if self.hear_notify is not None:
            self.hear_notify()

    def route_notify(self, pid: int, fields: dict[str, str]) -> bool:
        """Hand a notify message to the service the *sender* belongs to.

        The sender is in the service's cgroup (without cgroups: it is the
        service's main process, in its session, or a descendant of it);
        anything else is ignored (returns False).
        """
        owner = self.pid_owner(pid, notify_only=True)
        service = self.services.get(owner) if owner is not None else None
        if service is None:
            log.warning("notify message from a process of no notify service ignored", pid=pid,
                        keys=sorted(fields))
            return False
        service.notify(pid, fields)
        return True

    # -- lookups -------------------------------------------------------------------------

    def lookup(self, name: str | None) -> Service:
        """The service a name or provision designates.

        Raises:
            ProtocolError: ``unknown-service``.
        """
        if not name:
            raise ProtocolError("bad-arguments", "this action needs a service name")
        canonical = self.graph.resolve(name)
        if canonical is None and name in self.transients.running and name in self.services:
            canonical = name
        if canonical is None:
            from herd.suggest import did_you_mean

            raise ProtocolError("unknown-service",
                                f"service {name!r} does not exist{did_you_mean(name, self.graph.names())}")
        return self.services[canonical]

    # -- operations ----------------------------------------------------------------------

    async def start(self, name: str, *, operator: bool = True) -> dict[str, Any]:
        """Start a service and, first, what it requires.

        `operator`: asked for by a person (recorded as the service's intent).
        Such an explicit start runs the one-shots it requires again (once per
        request, as Shepherd does); other starts (auto-start, reload, socket
        activation) take a completed one-shot as satisfied.

        Raises:
            ProtocolError: ``disabled`` or ``start-failed``.
        """
        self._check_running()
        service = self.lookup(name)
        started: list[str] = []
        outcome = await self._start(service, started, as_requirement=False, chain=(), operator=operator,
                                    runs={} if operator else None)
        if not outcome.ok:
            raise ProtocolError(outcome.code or "start-failed", outcome.message)
        if not started:
            say(f"Service {service.name} is already running." if service.state is State.RUNNING
                else f"Service {service.name} has already completed.")
        return {"service": service.name, "started": started, "state": service.state.value,
                "pid": service.child.pid if service.child is not None else None}

    async def _start(self, service: Service, started: list[str], *, as_requirement: bool,
                     chain: tuple[str, ...], operator: bool = False,
                     runs: dict[str, _OneShotRun] | None = None) -> Outcome:
        """`runs`: the one-shots this explicit request runs (None: not explicit)."""
        if service.spec.one_shot and as_requirement and runs is not None:
            run = runs.get(service.name)
            if run is not None:  # run (or running) for this request already: its outcome
                await run.done.wait()
                return run.outcome
            run = runs[service.name] = _OneShotRun()
            try:
                run.outcome = await self._start(service, started, as_requirement=False, chain=chain, runs=runs)
            finally:
                run.done.set()
            return run.outcome
        if service.is_up and (as_requirement or service.state is State.RUNNING):
            return Outcome(True)  # (a running service's requirements are not started again)
        failures: list[Outcome] = []
        requirements = [self.services[r] for r in self.graph.requirements(service.name)]
        if requirements:
            async def one(req: Service) -> None:
                outcome = await self._start(req, started, as_requirement=True, chain=(*chain, service.name),
                                            runs=runs)
                if not outcome.ok:
                    failures.append(Outcome(False, code="start-failed", message=(
                        f"{service.name}: requirement {req.name} failed to start: {outcome.message}")))

            async with trio.open_nursery() as nursery:
                for req in requirements:
                    nursery.start_soon(one, req)
        if failures:
            return failures[0]
        not_up = [r.name for r in requirements if not r.is_up]
        if not_up:  # stopped again meanwhile by a concurrent request
            return Outcome(False, code="start-failed",
                           message=f"{service.name}: requirement {', '.join(not_up)} is not running")
        await self._pacer.turn()  # a mass start goes one service per loop pass (see _pacer)
        if self.shutting_down:
            return Outcome(False, code="shutting-down", message="the supervisor is shutting down")
        outcome = await service.start(as_requirement=as_requirement, operator=operator)
        if outcome.ok and outcome.initiated:
            started.append(service.name)
            say(f"Service {service.name} has been started." if not service.spec.one_shot
                else f"Service {service.name} has run (one-shot).")
        elif not outcome.ok and not as_requirement:
            say(f"Service {service.name} could not be started.")
        return outcome

    async def stop(self, name: str) -> dict[str, Any]:
        """Stop a service, its running dependents first."""
        service = self.lookup(name)
        stopped: list[str] = []
        await self._stop(service, stopped, operator=True)
        if not stopped:
            say(f"Service {service.name} is not running.")
        return {"service": service.name, "stopped": stopped}

    async def _stop(self, service: Service, stopped: list[str], *, operator: bool = False) -> None:
        dependents = [self.services[d] for d in self.graph.dependents(service.name)]
        active = [d for d in dependents if d.state is not State.STOPPED or d.one_shot_done
                  or d.respawn_at is not None]  # a pending respawn would start this one again
        if active:
            async with trio.open_nursery() as nursery:
                for dep in active:
                    nursery.start_soon(self._stop, dep, stopped)
        await self._pacer.turn()
        outcome = await service.stop(operator=operator)
        if outcome.initiated:
            stopped.append(service.name)
            say(f"Service {service.name} has been stopped.")

    async def restart(self, name: str) -> dict[str, Any]:
        """Stop a service with its dependents, then start all that was stopped."""
        self._check_running()
        service = self.lookup(name)
        stopped: list[str] = []
        await self._stop(service, stopped)
        targets = stopped or [service.name]
        started: list[str] = []
        failures: list[Outcome] = []
        runs: dict[str, _OneShotRun] = {}

        async def one(svc: Service) -> None:
            outcome = await self._start(svc, started, as_requirement=False, chain=(), runs=runs)
            if not outcome.ok:
                failures.append(outcome)

        async with trio.open_nursery() as nursery:
            for target in targets:
                nursery.start_soon(one, self.services[target])
        if failures:
            raise ProtocolError(failures[0].code or "start-failed", failures[0].message)
        return {"service": service.name, "stopped": stopped, "started": started}

    async def set_enabled(self, name: str, enabled: bool) -> dict[str, Any]:
        service = self.lookup(name)
        await service.set_enabled(enabled)
        say(f"Enabled service {service.name}." if enabled else f"Disabled service {service.name}.")
        return {"service": service.name, "enabled": service.enabled}

    def action(self, name: str, action: str) -> ActionSpec:
        """A service's custom action: its service type's, or a timer's `trigger`.

        Raises:
            ProtocolError: ``unknown-service`` or ``unknown-action``.
        """
        service = self.lookup(name)
        # a reload's actions apply at once (they do not touch the running process)
        actions = _actions_of(service.pending_spec or service.spec)
        for spec in actions:
            if spec.name == action:
                return spec
        from herd.suggest import did_you_mean
        from ._actions import ACTIONS

        known = ", ".join(a.name for a in actions) or "none"
        hint = did_you_mean(action, [*(a.name for a in actions), *(a.name for a in ACTIONS if not a.root)])
        raise ProtocolError("unknown-action",
                            f"service {service.name} has no action {action!r}{hint} (its actions: {known})")

    async def custom_action(self, name: str, action: str, args: list[Any]) -> Any:
        """Run a service's custom action (see `action`).

        Raises:
            ProtocolError: as `action`, or ``action-failed`` (or the
                action's own error).
        """
        service = self.lookup(name)
        spec = self.action(name, action)
        ctx = ActionContext(service=service.name, pid=service.child.pid if service.child else None,
                            say=say, engine=self)
        try:
            return await spec.handler(ctx, args)
        except ProtocolError:
            raise
        except Exception as exc:
            log.exception("action failed", action=action, service=service.name)
            raise ProtocolError("action-failed", f"{service.name} {action}: {exc}") from None
        finally:
            if service.spec.type_state is not None:  # the action may have changed it
                service.save()

    async def autostart(self) -> None:
        """Start every auto-start service (in parallel, requirements first)."""
        async def one(svc: Service) -> None:
            try:
                await self.start(svc.name, operator=False)
            except ProtocolError as exc:
                log.warning("auto-start failed", service=svc.name, error=exc.message)

        held_down = self._held_down()
        async with trio.open_nursery() as nursery:
            for svc in self.services.values():
                # lazy socket-activated services start on their first connection;
                # an operator's stop (persisted) holds a service and its dependents down
                if (svc.spec.auto_start and svc.enabled and svc.spec.activation != "lazy"
                        and svc.name not in held_down and not self._settled(svc)):
                    nursery.start_soon(one, svc)

    def _settled(self, svc: Service) -> bool:
        """Taken over in a state autostart must not change: after a re-exec,
        every service with a record is exactly as it was; after a crash, a
        completed one-shot is not run again, nor a service that exited with
        'not needed here', nor one waiting out a backoff delay (its actor respawns it)."""
        if not svc.restored:
            return False
        if self.resumed_by_reexec:
            return True
        return svc.is_up or svc.stayed_down is not None or svc.respawn_at is not None

    def _held_down(self) -> set[str]:
        """Services stopped by an operator, and everything that requires them."""
        down = {n for n, s in self.services.items() if s.intent == "down"}
        for name in self.graph.order():  # requirements come first
            if any(r in down for r in self.graph.requirements(name)):
                down.add(name)
        return down

    async def shutdown(self) -> list[str]:
        """Stop every service, dependents first; return the stop order."""
        self.shutting_down = True
        stopped: list[str] = []
        async with trio.open_nursery() as nursery:
            for svc in self.services.values():
                if not self.graph.requirements(svc.name):
                    nursery.start_soon(self._stop, svc, stopped)
        # Anything left (not reachable from a root, e.g. inside a cycle): stop directly.
        for svc in list(self.services.values()):  # (an ended transient leaves meanwhile)
            if svc.state is not State.STOPPED or svc.respawn_at is not None:
                await self._stop(svc, stopped)
        if self.cgroups is not None:
            self.cgroups.remove()
        self.flush_records()
        return stopped

    def flush_records(self) -> None:
        """Write every service record that changed (before a re-exec, at shutdown)."""
        if self.store is not None:
            self.store.flush()

    def _check_running(self) -> None:
        if self.shutting_down:
            raise ProtocolError("shutting-down", "the supervisor is shutting down")

    # -- reads ---------------------------------------------------------------------------

    async def status(self, name: str | None = None, *, log_lines: int = 10) -> Encoded:
        """The `status` result, encoded (see `_status_cache`).

        Raises:
            ProtocolError: ``unknown-service``.
        """
        if name is not None:
            return self.status_cache.one(self.lookup(name), log_lines)
        return await self.status_cache.full()

    async def summary(self) -> Encoded:
        """The `summary` result (``herd status``'s sections), encoded."""
        return await self.status_cache.summary()

    async def stats(self) -> Encoded:
        """Every service's live figures (`stats`), read at most once a second."""
        return await self.status_cache.stats()

    def detailed_status(self, log_lines: int = 10) -> dict[str, Any]:
        return {"services": [snapshot(self.services[n], log_lines=log_lines) for n in sorted(self.services)]}

    def doc(self, name: str, args: list[Any]) -> dict[str, Any]:
        if name == "root" and self.graph.resolve(name) is None:
            from ._actions import root_doc

            return root_doc(args)
        service = self.lookup(name)
        spec = service.spec
        if args:
            if len(args) != 2 or args[0] != "action" or not isinstance(args[1], str):
                raise ProtocolError("bad-arguments", "usage: doc SERVICE [action NAME]")
            action = self.action(name, args[1])
            return {"service": spec.name, "action": action.name, "documentation": action.documentation}
        return {
            "service": spec.name,
            "documentation": spec.documentation or _default_doc(spec),
            "actions": [{"name": a.name, "documentation": a.documentation}
                        for a in _actions_of(service.pending_spec or spec)],
        }

    def graph_dot(self) -> dict[str, str]:
        return {"dot": self.graph.to_dot()}

    def ping(self) -> dict[str, Any]:
        return {"pong": True, "version": __version__, "pid": os.getpid(), "since": self.started_at,
                "containment": self.containment()}

    def containment(self) -> dict[str, Any]:
        """How services' processes are tracked: cgroups, or the fallback (and why)."""
        if self.cgroups is not None:
            return {"mode": "cgroup", "cgroup": self.cgroups.rel, "mount": str(self.cgroups.mount)}
        return {"mode": "process-tree", "reason": self.no_cgroups_reason}


class _OneShotRun:
    """A one-shot run by one explicit start request, shared by its dependents."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.outcome = Outcome(False, code="start-failed", message="cancelled")


def _actions_of(spec: Any) -> tuple[ActionSpec, ...]:
    if spec.schedule is not None and spec.action("trigger") is None:
        return (*spec.actions, TRIGGER)
    return spec.actions


def _default_doc(spec: Any) -> str:
    if spec.command:
        return f"Runs {' '.join(spec.command)}."
    return "A service with no process."
