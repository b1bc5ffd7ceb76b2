"""One service: an actor that owns its state and its processes.

The `Service.run` task reads an inbox of messages and is the only code that
changes the service's state.  It never waits on work itself: starting,
stopping, readiness probes and respawn delays run as its worker tasks, which
report back through the same inbox with private message types carrying a
generation number (a stale report from an abandoned attempt is ignored).
So `status` is answered during a slow start, and a second `start` joins the
first one's outcome.

The states and every edge between them are a table in `lifecycle.py`
(docs/lifecycle.md is generated from it); `_set_state` checks each change
against it.  What happens after a crash is `respawn.py`'s decision.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import structlog
import trio

from . import _proc, _service_record, _sockets, health, lifecycle, respawn
from ._containment import Containment
from ._actor import (
    Inbox,
    Outcome,
    State,
    _Exited,
    _History,
    _Notify,
    _Replace,
    _Reply,
    _SetEnabled,
    _Start,
    _StartDone,
    _Stop,
    _StopDone,
    _Trigger,
    _Spawned,
    _Adopted,
    _HookStarted,
    _WatchdogExpired,
    _TimerArmed,
    _Overran,
    _RespawnDue,
    _HealthResult,
    _HealthCheckRunning,
)
from ._output import CURRENT as output_token
from ._output import LogHub, LogLine, ServiceOutput
from ._probes import (
    drain,
    event_then_cancel,
    has_pending,
    probe_connect,
    readable_then_cancel,
    remove_stale,
    wait_pid_file,
)
from ._state import StateStore
from ._stopping import Strays, terminate
from .spawn import spawn_process
from ._inetd import Inetd
from .timer import Timer
from .spec import ServiceSpec

__all__ = ["State", "Outcome", "Service", "respawn_policy"]

log = structlog.get_logger("supervisor.service")

StatePublisher = Callable[["Service", State, State, "str | None"], None]


def respawn_policy(spec: ServiceSpec) -> respawn.Policy:
    """The respawn policy a spec configures."""
    return respawn.Policy(respawn=spec.respawn, limit_count=spec.respawn_limit.count,
                          limit_seconds=spec.respawn_limit.seconds, delay=spec.respawn_delay,
                          stay_down=dict(spec.stay_down_exits), backoff=spec.respawn_backoff)


class Service:
    """The actor for one service.  Create, then run `run` in a nursery."""

    # slots: a service's object without a __dict__ (60 fields) is 1.7 KiB smaller
    __slots__ = (
        "child", "containment", "disabled_reason", "enabled", "guards", "health", "hear_notify", "history",
        "inetd", "intent", "last_exit", "last_failure", "listeners", "notify_socket", "on_change", "on_listeners",
        "one_shot_done", "output", "pending_spec", "respawn_at", "respawn_history", "respawn_wait",
        "restored", "run_scope", "since", "spec", "state", "status_text", "store", "timer",
        "_activate", "_changed", "_crashed", "_failing", "_gen", "_health_restart", "_health_run",
        "_health_scope", "_hook_ran", "_inbox", "_initiator", "_nursery",
        "_pending_start", "_publish", "_ready", "_respawn_scope", "_respawn_token", "_saved_pid",
        "_socket_error", "_start_waiters", "_stay_down", "_stayed_down", "_stop_initiator",
        "_stop_waiters", "_watchdog_deadline", "_watchdog_scope", "_work_scope",
    )

    def __init__(self, spec: ServiceSpec, *, log_path: Path, hub: LogHub, publish: StatePublisher,
                 notify_socket: Path | None = None,
                 activate: Callable[[Service], Awaitable[bool]] | None = None,
                 containment: Containment | None = None) -> None:
        self.spec = spec
        self.containment = containment or Containment(spec.name, None, None, lambda pid: None)
        self.pending_spec: ServiceSpec | None = None  # a reload's new definition, applied when stopped
        self.intent: str | None = None  # "up"/"down": what an operator last asked for (persisted)
        self.store: StateStore | None = None
        self.run_scope: trio.CancelScope | None = None  # cancelled to unregister the service
        self._activate = activate
        self.listeners: list[socket.socket] = []
        self._socket_error: str | None = None
        #: told whenever `listeners` changes (the keeper: see engine)
        self.on_listeners: Callable[[Service], None] | None = None
        self._changed: trio.Event | None = None  # set at the next state change (see _next_change)
        self.notify_socket = notify_socket
        self.state = State.STOPPED
        self.since = time.time()
        self.enabled = True
        self.disabled_reason: str | None = None
        self.child: _proc.Child | None = None
        self.last_exit: _proc.ExitStatus | None = None
        self.last_failure: str | None = None
        self.status_text: str | None = None
        self.one_shot_done = False
        self.history = _History()
        self.respawn_history = respawn.History()  # what the respawn policy decides from
        self.output = ServiceOutput(spec.name, log_path, hub, max_size=spec.log_max_size,
                                    max_backups=spec.log_max_backups)
        self._ready: trio.Event | None = None  # set by READY=1 during the current start attempt
        self.hear_notify: Callable[[], None] | None = None  # the engine's: read the notify messages now
        self._stay_down: str | None = None  # the attempt ended with a stay-down exit
        self._watchdog_deadline = math.inf
        self._watchdog_scope: trio.CancelScope | None = None
        self.timer = Timer(self)  # a service with a `schedule`: its events and runs
        self.inetd = Inetd(self)  # sockets with accept = true: an instance per connection
        self._publish = publish
        #: told after each message the actor handled (its fields may have changed)
        self.on_change: Callable[[str], None] | None = None
        self._gen = 0
        self._start_waiters: list[_Reply] = []
        self._stop_waiters: list[_Reply] = []
        self._pending_start = False
        self._failing: str | None = None  # why we are stopping after a failed start
        self._work_scope: trio.CancelScope | None = None
        self._initiator: _Reply | None = None  # the start request that began this attempt
        self._stop_initiator: _Reply | None = None
        self._hook_ran = False
        self._crashed: _proc.ExitStatus | None = None  # stopping what a crashed process left
        self._stayed_down: str | None = None  # the last exit meant "not needed here"
        self.restored = False  # its record was taken over (re-exec, crash recovery)
        self._saved_pid: int | None = None  # the main PID in the record last written
        #: stream → where the service holds its pipe's read end (`_guard.record`)
        self.guards: dict[str, dict[str, int]] = {}
        #: a backoff delay being waited out (stopped): when the next attempt
        #: comes (epoch) and how long the delay is; kept in the record
        self.respawn_at: float | None = None
        self.respawn_wait: float | None = None
        self._respawn_token = 0
        self._respawn_scope: trio.CancelScope | None = None
        self.health = health.HealthState()  # the checks' results (the actor writes them)
        self._health_run = 0  # numbers the check loops: a result from an old one is stale
        self._health_scope: trio.CancelScope | None = None
        self._health_restart: str | None = None  # stopping because the checks failed: why
        self._nursery: trio.Nursery | None = None
        self._inbox = Inbox()

    @property
    def name(self) -> str:
        return self.spec.name

    # -- the public, thin helpers (called from other tasks) -------------------------

    async def start(self, *, as_requirement: bool = False, operator: bool = False) -> Outcome:
        reply = _Reply()
        self._inbox.send_nowait(_Start(reply, as_requirement, operator))
        return await reply.wait()

    async def stop(self, *, operator: bool = False) -> Outcome:
        reply = _Reply()
        self._inbox.send_nowait(_Stop(reply, operator))
        return await reply.wait()

    async def replace(self, spec: ServiceSpec) -> Outcome:
        """Install a new definition: now if stopped, else at the next (re)start."""
        reply = _Reply()
        self._inbox.send_nowait(_Replace(reply, spec))
        return await reply.wait()

    async def trigger(self) -> Outcome:
        """Timers: run the command now (unless a run is in progress)."""
        reply = _Reply()
        self._inbox.send_nowait(_Trigger(reply, scheduled=False))
        return await reply.wait()

    async def set_enabled(self, enabled: bool) -> Outcome:
        reply = _Reply()
        self._inbox.send_nowait(_SetEnabled(reply, enabled))
        return await reply.wait()

    def spawned_unheard(self) -> _proc.Child | None:
        """A main process the start worker spawned that the actor has not heard
        of yet (its `_Spawned` still in the inbox): without cgroups, its
        READY=1 can come before the actor records it, and must not be taken
        for a stranger's."""
        for msg in self._inbox.pending():
            if isinstance(msg, _Spawned) and msg.child.alive:
                return msg.child
        return None

    def notify(self, pid: int, fields: dict[str, str]) -> None:
        """Deliver an sd_notify message (already checked to come from our processes)."""
        self._inbox.send_nowait(_Notify(pid, fields))

    @property
    def stayed_down(self) -> str | None:
        """Why the last run ended with "not needed here" (None: it did not)."""
        return self._stayed_down

    @property
    def is_up(self) -> bool:
        """Running, or a one-shot that completed: requirements are satisfied."""
        return self.state is State.RUNNING or (self.spec.one_shot and self.one_shot_done
                                                 and self.state is State.STOPPED)

    # -- the actor loop --------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        structlog.contextvars.bind_contextvars(service=self.name)
        output_token.set(self.output)  # inherited by this actor's tasks: supervisor.note()
        try:
            self._bind_sockets()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.listeners and self.spec.activation == "lazy" and self._activate is not None:
                    nursery.start_soon(self._activation_watch)
                if self.child is not None:  # adopted at start-up (crash recovery, re-exec)
                    nursery.start_soon(self._monitor, self.child)
                if self.state is State.RUNNING:  # restored: re-arm its timer or watchdog
                    self._arm()
                if self.respawn_at is not None:  # restored: a backoff delay still to wait out
                    self._wait_respawn(self.respawn_at - time.time())
                # pipes handed over by a re-exec are read again, running or not
                self.output.resume(nursery)
                if self.state is State.STOPPED:
                    self.output.rest()
                task_status.started()
                if self.child is None:
                    await self._sweep_unrecorded()
                self._sync_listeners()
                async for msg in self._inbox:
                    self._handle(msg)
                    self._sync_listeners()
                    if self.on_change is not None:
                        self.on_change(self.name)
        finally:
            self.output.close()
            for spec, sock in zip(self.spec.sockets, self.listeners):
                _sockets.close(spec, sock)
            self.listeners = []
            self._listeners_changed()

    async def _sweep_unrecorded(self) -> None:
        """At start-up, with no process adopted: what is in the service's cgroup
        was spawned by a supervisor killed before it could record the PID.
        It is stopped before any request is handled, so that "stopped" means
        an empty cgroup (and a start never runs a second process beside it).
        Not under kill-mode "process", whose cgroup may hold guests."""
        if self.spec.kill_mode == "process" or not self.containment.populated():
            return
        log.warning("processes found in the cgroup of a service with no recorded process; stopping them",
                    pids=sorted(self.containment.pids()))
        await self.containment.sweep(self.spec.stop_signal, self.spec.stop_timeout, self.output.note)

    def take_over_listeners(self, fds: list[int]) -> None:
        """Listening sockets handed over by a previous image (re-exec)."""
        for fd in fds:
            os.set_inheritable(fd, False)
            self.listeners.append(socket.socket(fileno=fd))

    def _bind_sockets(self) -> None:
        if self.listeners:  # taken over from a previous image
            self._listeners_changed()
            return
        if not self.spec.sockets:
            # Nothing to put in the keeper (what it still held for this service
            # is dropped by Engine.keep_all); telling it costs a scan of all it
            # holds per service, quadratic at start and after a re-exec.
            return
        for spec in self.spec.sockets:
            try:
                self.listeners.append(_sockets.bind(spec))
            except OSError as exc:
                self._socket_error = exc.strerror or str(exc)
                log.error("cannot bind socket", error=self._socket_error)
                for sock_spec, sock in zip(self.spec.sockets, self.listeners):
                    _sockets.close(sock_spec, sock)
                self.listeners = []
                break
        self._listeners_changed()

    def _sync_listeners(self) -> None:
        """A lazy service listens only while a connection may start it: while
        it is disabled, or stopped by an operator, its sockets are closed, so
        that a client's connect is refused instead of hanging."""
        if self.spec.activation != "lazy" or not self.spec.sockets:
            return
        refuse = self.state is State.STOPPED and (not self.enabled or self.intent == "down")
        if refuse and self.listeners:
            for spec, sock in zip(self.spec.sockets, self.listeners):
                trio.lowlevel.notify_closing(sock)  # the activation watch waits on it
                _sockets.close(spec, sock)
            self.listeners = []
            self._listeners_changed()
            log.info("lazy service's sockets closed", enabled=self.enabled, intent=self.intent)
        elif not refuse and not self.listeners:
            self._bind_sockets()
            self._announce_change()  # the activation watch listens on them

    def _next_change(self) -> trio.Event:
        """The event set at the next state change: made when a task waits for
        one (few services ever do: 0.9 KiB each saved)."""
        if self._changed is None:
            self._changed = trio.Event()
        return self._changed

    def _announce_change(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def _listeners_changed(self) -> None:
        if self.on_listeners is not None:
            self.on_listeners(self)

    async def _activation_watch(self) -> None:
        """Lazy activation: start on the first connection while stopped."""
        while True:
            while not (self.state is State.STOPPED and self.enabled and self.listeners):
                await self._next_change().wait()
            async with trio.open_nursery() as race:
                for sock in self.listeners:
                    race.start_soon(readable_then_cancel, sock, race.cancel_scope)
                race.start_soon(event_then_cancel, self._next_change(), race.cancel_scope)
            if self.state is not State.STOPPED or not self.enabled:
                continue
            if not any(has_pending(sock) for sock in self.listeners):
                continue
            self.output.note(f"Connection on a socket of {self.name}: starting it.")
            assert self._activate is not None
            if not await self._activate(self):  # failed: refuse what waits, don't spin
                for sock in self.listeners:
                    drain(sock)

    def _post(self, msg: object) -> None:
        self._inbox.send_nowait(msg)

    def _handle(self, msg: object) -> None:
        match msg:
            case _Start(reply, as_requirement, operator):
                # An operator's start is remembered; any other start (a dependent
                # pulling it up, a connection) lifts an earlier operator's stop.
                intent = "up" if operator else (None if self.intent == "down" else self.intent)
                if intent != self.intent:
                    self.intent = intent
                    self.save()
                self._on_start(reply, as_requirement)
            case _Stop(reply, operator):
                if operator and self.intent != "down":
                    self.intent = "down"
                    self.save()
                self._on_stop(reply)
            case _SetEnabled(reply, enabled):
                self.enabled = enabled
                if enabled:
                    self.disabled_reason = None
                    self.respawn_history.clear()
                else:
                    self.disabled_reason = "disabled by the operator"
                    self._cancel_respawn("the service was disabled")
                self.save()
                self._publish(self, self.state, self.state, "enabled" if enabled else "disabled")
                reply.set(Outcome(True, initiated=True))
            case _Replace(reply, spec):
                self.pending_spec = spec if spec != self.spec else None
                if self.state is State.STOPPED:
                    self._apply_pending_spec()
                reply.set(Outcome(True, initiated=self.pending_spec is None))
            case _Trigger(reply, scheduled):
                self.timer.trigger(reply, scheduled)
            case _Exited(child):
                self._on_exited(child)
            case _Notify(pid, fields):
                self._on_notify(pid, fields)
            case _StartDone(gen, ok, reason):
                if gen == self._gen and self.state is State.STARTING:
                    self._on_start_done(ok, reason)
            case _StopDone(gen):
                if gen == self._gen and self.state is State.STOPPING:
                    self._on_stop_done()
            case _Spawned(gen, child, guards):
                self._on_main_process(gen, child)
                if self.child is child:
                    self.guards = guards
                self.save()
            case _Adopted(gen, child):
                self._on_main_process(gen, child)
                self.save()
            case _HookStarted(gen):
                if gen == self._gen:
                    self._hook_ran = True
            case _WatchdogExpired(why):
                if self.state is State.RUNNING:
                    self._watchdog_fire(why)
            case _TimerArmed(next_run):
                self.timer.armed(next_run)
            case _Overran(pid):
                self.timer.overran(pid)
            case _RespawnDue(token):
                if token == self._respawn_token:
                    self._on_respawn_due()
            case _HealthResult(run, ok, detail):
                if run == self._health_run and self.state is State.RUNNING:
                    self._on_health(ok, detail)
            case _HealthCheckRunning(run, pid, start):
                if run == self._health_run and self.state is State.RUNNING:
                    self.health.check_pid, self.health.check_start = pid, start
                    self.save()
            case _:
                raise AssertionError(f"unexpected message {msg!r}")

    def _set_state(self, new: State, reason: str | None = None) -> None:
        """The only writer of `state`: every change is an edge of the lifecycle table."""
        old = self.state
        lifecycle.check(old, new)
        if new is State.STOPPED:
            self._apply_pending_spec()
        if new is not State.RUNNING:
            self.timer.disarm()
            self.inetd.disarm()
        if new is not State.RUNNING and self._watchdog_scope is not None:
            self._watchdog_scope.cancel()
            self._watchdog_scope = None
        if new is not State.RUNNING and self._health_scope is not None:
            self._health_scope.cancel()
            self._health_scope = None
            self._health_run += 1
            self.health.check_pid = self.health.check_start = None
        if new is not State.STOPPED:
            self._cancel_respawn(None)
        self.state = new
        self._announce_change()
        self.since = time.time()
        if new is State.STOPPED:
            self.output.rest()  # a stopped service's log file is not held open
        self.save()
        self._publish(self, old, new, reason)

    # -- start -------------------------------------------------------------------------

    def _on_start(self, reply: _Reply, as_requirement: bool) -> None:
        if not self.enabled:
            reply.set(Outcome(False, code="disabled",
                              message=f"service {self.name} is disabled ({self.disabled_reason})"))
        elif self.state is State.RUNNING:
            reply.set(Outcome(True))
        elif self.state is State.STARTING:
            self._start_waiters.append(reply)
        elif self.state is State.STOPPING:
            self._start_waiters.append(reply)
            self._pending_start = True
        elif as_requirement and self.is_up:  # a completed one-shot satisfies dependents
            reply.set(Outcome(True))
        else:  # STOPPED  -> STARTING
            self._start_waiters.append(reply)
            pending = self.respawn_at is not None
            self._begin_start(reply, delay=0.0, reason="start requested" + (
                " (the pending respawn, at once)" if pending else ""))

    def _apply_pending_spec(self) -> None:
        """Switch to a reload's definition (only between runs: no process is up)."""
        new = self.pending_spec
        if new is None:
            return
        self.pending_spec = None
        old, self.spec = self.spec, new
        self.output.max_size, self.output.max_backups = new.log_max_size, new.log_max_backups
        if new.sockets != old.sockets:
            for sock_spec, sock in zip(old.sockets, self.listeners):
                _sockets.close(sock_spec, sock)
            self.listeners, self._socket_error = [], None
            self._listeners_changed()  # the keeper lets go of the old ones first
            self._bind_sockets()
        self.output.note(f"Service {self.name}: new definition in effect.")
        log.info("replacement applied")

    def _begin_start(self, initiator: _Reply | None, *, delay: float, reason: str) -> None:
        self._apply_pending_spec()
        self._gen += 1
        self._initiator = initiator
        self._failing = None
        self.one_shot_done = False
        self._stayed_down = None
        self._ready = trio.Event()
        self.status_text = None
        self._set_state(State.STARTING, reason)
        assert self._nursery is not None
        # The scope exists before the worker first runs, so a stop that comes
        # in between cancels the worker on entry (it never spawns).
        self._work_scope = trio.CancelScope()
        if initiator is None:  # a respawn
            self.history.respawns.append(time.time() + delay)
        self._nursery.start_soon(self._start_worker, self._gen, delay, initiator is None, self._work_scope)

    # The start worker (and every other worker task) changes nothing of the
    # service: it reports what happened with messages (_Spawned, _Adopted,
    # _HookStarted, _StartDone), which the actor alone acts on.

    async def _start_worker(self, gen: int, delay: float, respawn: bool, scope: trio.CancelScope) -> None:
        with scope:
            if delay > 0:
                await trio.sleep(delay)
            if respawn:
                self.output.note(f"Respawning {self.name}.")
            ok, reason = await self._attempt_start(gen)
            self._post(_StartDone(gen, ok, reason))

    async def _attempt_start(self, gen: int) -> tuple[bool, str | None]:
        spec = self.spec
        strays: Strays | None = None
        before: set[int] = set()
        mine: list[_proc.Child] = []  # what this attempt spawned or adopted
        try:
            with trio.fail_after(spec.start_timeout):
                if spec.schedule is not None:  # a timer: being up means being armed
                    await trio.lowlevel.checkpoint_if_cancelled()
                    return True, None
                if spec.accepts:  # inetd-style: being up means listening
                    await trio.lowlevel.checkpoint_if_cancelled()
                    return (False, self._socket_error) if self._socket_error is not None else (True, None)
                if spec.command is None:
                    await trio.lowlevel.checkpoint_if_cancelled()
                    self._post(_HookStarted(gen))
                    if spec.start_hook is not None:
                        await spec.start_hook(spec)
                    return True, None
                assert self._nursery is not None
                # A stop may have cancelled this attempt before it ever ran: a
                # cancelled scope only acts at a checkpoint, so take one now.
                await trio.lowlevel.checkpoint_if_cancelled()
                if spec.prepare_hook is not None:
                    await spec.prepare_hook(spec)
                    await trio.lowlevel.checkpoint_if_cancelled()
                if spec.ready.type == "pid-file":
                    if (problem := remove_stale(spec.ready.path)) is not None:
                        return False, problem
                    if self.containment.cgroup is None:
                        strays = Strays()
                if self._socket_error is not None:
                    return False, self._socket_error
                if spec.kill_mode != "process" and self.containment.populated():
                    # a previous run's processes (a crash of ours, say): a fresh
                    # start must not find its port taken
                    await self.containment.sweep(spec.stop_signal, spec.stop_timeout, self.output.note)
                before = self.containment.pids()
                with self.output.writers(self._nursery) as (out, err):
                    child, guards = spawn_process(self, spec, out, err)
                mine.append(child)
                self._post(_Spawned(gen, child, guards))
                log.debug("spawned", pid=child.pid, command=list(spec.command))
                if spec.one_shot:
                    await child.exited.wait()
                    assert child.status is not None
                    # whatever the one-shot left behind is stopped with it
                    await self.containment.sweep(spec.stop_signal, spec.stop_timeout, self.output.note)
                    if child.status.code == 0:
                        return True, None
                    return False, child.status.describe()
                if strays is not None:
                    strays.launcher = child
                verdict = await self._wait_ready(gen, child, strays, mine)
        except trio.TooSlowError:
            verdict = False, f"not ready within {spec.start_timeout:g} s (start-timeout)"
        except _proc.SpawnError as exc:
            return False, str(exc)
        except Exception as exc:  # a start hook's own failure
            log.exception("start hook failed")
            return False, f"start failed: {exc}"
        if strays is not None:
            if not verdict[0]:  # a daemon that forked away must not outlive its failed start
                await strays.kill()
            strays.close()
        if not verdict[0] and not any(c.alive for c in mine):
            # nothing for a stop to wait on, but what the start forked must go
            # (under kill-mode "process" only that: older processes stay)
            only = self.containment.pids() - before if spec.kill_mode == "process" else None
            await self.containment.sweep(signal.SIGKILL, 0, self.output.note, only=only)
        return verdict

    def _on_main_process(self, gen: int, child: _proc.Child) -> None:
        """The start worker spawned (or found, through a pid file) the main process."""
        assert self._nursery is not None
        if child is not self.child and not child.exited.is_set():
            self._nursery.start_soon(self._monitor, child)
        if gen == self._gen and self.state is State.STARTING:
            self.child = child
        else:  # the attempt was abandoned (stopped) before it heard of its process
            self._nursery.start_soon(self._discard, child)

    async def _discard(self, child: _proc.Child) -> None:
        with trio.CancelScope(shield=True):
            await terminate(child, self.spec, self.output.note, self.containment)

    async def _monitor(self, child: _proc.Child) -> None:
        with trio.CancelScope(shield=True):
            await child.wait()
        self._post(_Exited(child))

    async def _wait_ready(self, gen: int, child: _proc.Child, strays: Strays | None,
                          mine: list[_proc.Child]) -> tuple[bool, str | None]:
        """Race the service's readiness against its main process exiting."""
        ready = self.spec.ready
        hook = self.spec.ready_hook
        if ready.type == "started" and hook is None:
            return True, None
        result: list[tuple[bool, str | None]] = []

        async def probe(cancel: trio.CancelScope) -> None:
            if hook is not None:
                try:
                    await hook(self.spec, child.pid)
                except Exception as exc:  # the hook's failure is the start's
                    log.warning("readiness step failed", error=str(exc))
                    result.append((False, str(exc) or type(exc).__name__))
                    cancel.cancel()
                    return
            elif ready.type == "started":
                pass
            elif ready.type == "notify":
                if self._ready is None:  # made by _begin_start, dropped at its verdict
                    self._ready = trio.Event()
                await self._ready.wait()
            elif ready.type == "pid-file":
                assert ready.path is not None
                pid = await wait_pid_file(ready.path, strays.scan if strays is not None else None)
                if pid != child.pid:  # a daemon that forked: supervise the real process
                    why = self.containment.why_untrusted(pid, child.pid, strays.fds if strays is not None else ())
                    if why is not None:
                        self._refuse(f"PID {pid} from {ready.path}", why)
                        result.append((False, f"PID {pid} from {ready.path} is not the service's: {why}"))
                        cancel.cancel()
                        return
                    try:
                        adopted = _proc.Child.adopt(pid)
                    except ProcessLookupError:
                        result.append((False, f"PID {pid} from {ready.path} is not running"))
                        cancel.cancel()
                        return
                    mine.append(adopted)
                    self._post(_Adopted(gen, adopted))
            else:
                await probe_connect(ready.type, ready.address, ready.path)
            result.append((True, None))
            cancel.cancel()

        async def died(cancel: trio.CancelScope) -> None:
            main = child
            while True:
                await main.exited.wait()
                if ready.type != "notify":
                    break
                # A wrapper's `systemd-notify --ready --pid=$!` then `exit 0`: READY=1
                # (and MAINPID=) was sent before the exit, but may still wait in the
                # kernel, or in this actor's inbox: hear it before judging the exit.
                if self.hear_notify is not None:
                    self.hear_notify()
                for _ in range(100):  # (the actor takes one message per pass, in order)
                    if not any(isinstance(m, _Notify) for m in self._inbox.pending()):
                        break
                    await trio.lowlevel.checkpoint()
                if self._ready is not None and self._ready.is_set():
                    return
                if self.child is None or self.child is main or self.child.exited.is_set():
                    break
                main = self.child  # MAINPID= handed the service over: its exit is what counts now
            assert main.status is not None
            if ready.type == "pid-file" and main.status.code == 0:
                if strays is not None:
                    strays.scan()  # its orphans were just re-parented to us
                return  # the usual daemon fork: the parent exits 0, the pid file tells the rest
            stay_down = dict(self.spec.stay_down_exits).get(main.status.code)  # type: ignore[arg-type]
            if stay_down is not None:  # "not needed here" is an answer, not a failure
                self._stay_down = stay_down
                result.append((False, stay_down))
            else:
                result.append((False, f"{main.status.describe()} before it was ready"))
            cancel.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(probe, nursery.cancel_scope)
            nursery.start_soon(died, nursery.cancel_scope)
        return result[0]

    def _on_start_done(self, ok: bool, reason: str | None) -> None:
        self._work_scope = None
        self._ready = None  # the attempt's worker is done with it
        if ok:
            self.history.startup_failures.clear()  # a good start clears the mark (Shepherd)
            if self.spec.one_shot:
                self.one_shot_done = True
                self.output.note(f"One-shot service {self.name} completed.")
                self._set_state(State.STOPPED, "one-shot completed")
            else:
                pid = self.child.pid if self.child else None
                self.output.note(f"Service {self.name} started" + (f" (PID {pid})." if pid else "."))
                self.respawn_history.started = time.monotonic()
                self.health.failures = 0
                self._set_state(State.RUNNING, "started")
                self._arm()
            self._reply_starts(Outcome(True))
            if (self.spec.command is not None and not self.spec.one_shot and self.spec.schedule is None
                    and not self.spec.accepts and self.child is None):
                assert self.last_exit is not None  # exited between readiness and now
                self._on_crash(self.last_exit)
            return
        stay_down, self._stay_down = self._stay_down, None
        if stay_down is not None:  # not needed here: no startup failure recorded
            self.status_text = self._stayed_down = stay_down
            self.output.note(f"Service {self.name} stays down: {stay_down}.")
            self._set_state(State.STOPPED, stay_down)
            self._reply_starts(Outcome(False, code="start-failed", message=f"{self.name}: {stay_down}"))
            return
        self.last_failure = reason
        self.history.startup_failures.append(time.time())
        self.output.note(f"Service {self.name} failed to start: {reason}")
        log.warning("start failed", reason=reason)
        if self.child is not None and self.child.alive:
            self._failing = reason
            self._begin_stop(f"failed to start: {reason}")
        else:
            self._set_state(State.STOPPED, f"failed to start: {reason}")
            self._reply_starts(Outcome(False, code="start-failed", message=f"{self.name}: {reason}"))

    def _arm(self) -> None:
        """What runs while the service is up: a timer's schedule, the watchdog."""
        if self._nursery is None:
            return
        if self.spec.schedule is not None:
            self.timer.arm(self._nursery)
        if self.spec.accepts:
            self.inetd.arm(self._nursery)
        if self.spec.watchdog_sec:
            self._nursery.start_soon(self._watchdog)
        if self.spec.health is not None and self.spec.command is not None:
            self._health_run += 1
            self._health_scope = trio.CancelScope()
            self._nursery.start_soon(self._health_checks, self._health_run, self._health_scope)

    async def _health_checks(self, run: int, scope: trio.CancelScope) -> None:
        with scope:
            await health.run_checks(self, run)

    def _reply_starts(self, outcome: Outcome) -> None:
        waiters, self._start_waiters = self._start_waiters, []
        initiator, self._initiator = self._initiator, None
        for reply in waiters:
            if outcome.ok and reply is initiator:
                reply.set(Outcome(True, initiated=True))
            else:
                reply.set(outcome)

    # -- stop ----------------------------------------------------------------------------

    def _on_stop(self, reply: _Reply) -> None:
        if self._pending_start:
            self._pending_start = False
        if self.state is State.STOPPED:
            self.one_shot_done = False
            reply.set(Outcome(True, initiated=self._cancel_respawn("stop requested")))
            return
        if self.state is State.STOPPING:
            self._stop_waiters.append(reply)
            self._fail_pending_starts("a stop was requested")
            return
        if self.state is State.STARTING:
            if self._work_scope is not None:
                self._work_scope.cancel()
                self._work_scope = None
            self._fail_pending_starts("stopped while starting")
            if self.child is None and not (self._hook_ran and self.spec.stop_hook):
                self._gen += 1  # any report from the abandoned attempt is stale
                self._set_state(State.STOPPED, "stopped while starting")
                reply.set(Outcome(True, initiated=True))
                return
        self._stop_waiters.append(reply)
        self._stop_initiator = reply
        self._begin_stop("stop requested")

    def _fail_pending_starts(self, why: str) -> None:
        waiters, self._start_waiters = self._start_waiters, []
        self._initiator = None
        for r in waiters:
            r.set(Outcome(False, code="start-failed", message=f"{self.name}: {why}"))

    def _begin_stop(self, reason: str) -> None:
        self._gen += 1
        self._set_state(State.STOPPING, reason)
        assert self._nursery is not None
        self._nursery.start_soon(self._stop_worker, self._gen, self.child)

    async def _stop_worker(self, gen: int, child: _proc.Child | None) -> None:
        with trio.CancelScope(shield=True):
            if child is not None and child.alive and self.spec.stop_hook is not None:
                try:  # ask first (e.g. ACPI power-down); signal only if it does not go
                    with trio.fail_after(self.spec.stop_timeout):
                        await self.spec.stop_hook(self.spec)
                        await child.exited.wait()
                except trio.TooSlowError:
                    self.output.note(f"{self.name} did not stop by itself within "
                                     f"{self.spec.stop_timeout:g} s; sending {signal.Signals(self.spec.stop_signal).name}.")
                except Exception as exc:
                    log.warning("stop hook failed", error=str(exc))
                    self.output.note(f"Stop hook of {self.name} failed: {exc}")
            # with the main process gone, what is left in the cgroup (one read)
            if (child is not None and child.alive) or (
                    self.spec.kill_mode != "process" and self.containment.populated()):
                await terminate(child, self.spec, self.output.note, self.containment)
            if self.spec.command is None and self._hook_ran and self.spec.stop_hook is not None:
                try:
                    with trio.fail_after(self.spec.stop_timeout):
                        await self.spec.stop_hook(self.spec)
                except Exception as exc:
                    log.exception("stop hook failed")
                    self.output.note(f"Stop of {self.name} failed: {exc}")
        self._post(_StopDone(gen))

    def _on_stop_done(self) -> None:
        self._hook_ran = False
        crashed, self._crashed = self._crashed, None
        unhealthy, self._health_restart = self._health_restart, None
        if unhealthy is not None and not self._stop_waiters and not self._failing:
            self._on_crash(None, cause=unhealthy)  # stopped for its health: respawn or not
            if self.state is State.STARTING:
                self._pending_start = False
            else:
                self._resume_pending_start()
            return
        if crashed is not None and not self._stop_waiters and not self._failing:
            self._on_crash(crashed)  # what the crashed process left is gone: respawn or not
            if self.state is State.STARTING:
                self._pending_start = False  # the respawn answers who asked meanwhile
            else:
                self._resume_pending_start()
            return
        failing, self._failing = self._failing, None
        self._set_state(State.STOPPED, f"failed to start: {failing}" if failing else "stopped")
        if not failing:
            self.output.note(f"Service {self.name} stopped.")
        initiator, self._stop_initiator = self._stop_initiator, None
        waiters, self._stop_waiters = self._stop_waiters, []
        for reply in waiters:
            reply.set(Outcome(True, initiated=reply is initiator))
        if failing:
            self._reply_starts(Outcome(False, code="start-failed", message=f"{self.name}: {failing}"))
        else:
            self._resume_pending_start()

    def _resume_pending_start(self) -> None:
        """A start asked for while stopping begins now."""
        if self._pending_start and self._start_waiters:
            self._pending_start = False
            if self.enabled:
                self._begin_start(self._start_waiters[0], delay=0.0, reason="start requested")
            else:
                self._fail_pending_starts(f"disabled ({self.disabled_reason})")

    # -- exits and respawn -------------------------------------------------------------

    def _on_exited(self, child: _proc.Child) -> None:
        if child is not self.child:
            return  # a stale child (already replaced)
        assert child.status is not None
        if self.spec.schedule is not None and self.state is State.RUNNING:
            self.timer.run_finished(child)
            return
        if not (self.state is State.STARTING and self.spec.ready.type == "pid-file"
                and child.status.code == 0):  # a forking launcher's exit is no news
            self.last_exit = child.status
        self.child = None
        if self.state is State.RUNNING:
            if self.spec.kill_mode != "process" and self.containment.populated():
                # stop what it left (a server's workers keep its port) first
                self._crashed = child.status
                self.output.note(f"Service {self.name} {child.status.describe()}; "
                                 "stopping the processes it left in its cgroup.")
                self._begin_stop(f"{child.status.describe()}; stopping what it left")
                return
            self._on_crash(child.status)
        # STARTING: the start worker sees it; STOPPING: the stop worker waits for it.

    def _on_crash(self, status: _proc.ExitStatus | None, *, cause: str | None = None) -> None:
        """The main process exited while the service ran (or was stopped for
        its health, `cause`): ask the respawn policy."""
        exit_ = respawn.Exit(time.monotonic(), status.code if status else None,
                             status.signal if status else None, cause)
        what = exit_.describe()
        if cause is None:
            self.output.note(f"Service {self.name} {what}.")
            log.info("process exited", status=what)
        decision = respawn.decide(respawn_policy(self.spec), self.respawn_history, exit_, enabled=self.enabled)
        match decision.verdict:
            case respawn.Verdict.STAY_DOWN:
                self.status_text = self._stayed_down = decision.reason
                self.output.note(f"Service {self.name} stays down: {decision.reason}.")
                self._set_state(State.STOPPED, decision.reason)
            case respawn.Verdict.STOP:
                self._set_state(State.STOPPED, decision.reason)
            case respawn.Verdict.DISABLE:
                self.enabled = False
                self.disabled_reason = decision.reason
                self.output.note(f"Service {self.name} has been disabled. ({decision.reason})")
                log.warning("respawning too fast; disabled", limit=self.spec.respawn_limit.count,
                            seconds=self.spec.respawn_limit.seconds)
                self._set_state(State.STOPPED, decision.reason)
            case respawn.Verdict.RESPAWN if self.spec.respawn_backoff is not None:
                # waited out stopped, where status shows it and a stop cancels it
                self.respawn_at, self.respawn_wait = time.time() + decision.delay, decision.delay
                self.output.note(f"Service {self.name}: respawning in {decision.delay:g} s (backoff).")
                self._set_state(State.STOPPED, decision.reason)
                self._wait_respawn(decision.delay)
            case respawn.Verdict.RESPAWN:
                self._begin_start(None, delay=decision.delay, reason=decision.reason)

    # -- backoff: the delay before a respawn, waited out stopped --------------------------

    def _wait_respawn(self, delay: float) -> None:
        assert self._nursery is not None
        self._respawn_token += 1
        self._respawn_scope = trio.CancelScope()
        self._nursery.start_soon(self._respawn_timer, self._respawn_token, max(0.0, delay), self._respawn_scope)

    async def _respawn_timer(self, token: int, delay: float, scope: trio.CancelScope) -> None:
        with scope:
            await trio.sleep(delay)
            self._post(_RespawnDue(token))

    def _on_respawn_due(self) -> None:
        wait = self.respawn_wait
        if self.respawn_at is None or self.state is not State.STOPPED:
            return
        self._cancel_respawn(None)
        if self.enabled:
            self._begin_start(None, delay=0.0, reason=f"respawn after a backoff delay of {wait:g} s")

    def _cancel_respawn(self, why: str | None) -> bool:
        """Drop the pending respawn, if any (saying `why`, with an event); True if there was one."""
        if self.respawn_at is None:
            return False
        self.respawn_at = self.respawn_wait = None
        self._respawn_token += 1
        if self._respawn_scope is not None:
            self._respawn_scope.cancel()
            self._respawn_scope = None
        if why is not None:
            self.output.note(f"Service {self.name}: pending respawn cancelled ({why}).")
            self.save()
            self._publish(self, self.state, self.state, f"pending respawn cancelled: {why}")
        return True

    # -- health checks (supervisor/health.py runs them) -----------------------------------

    def _on_health(self, ok: bool, detail: str) -> None:
        h, spec = self.health, self.spec.health
        assert spec is not None
        # the record is rewritten when something but the times changed (not at each passed check)
        news = h.check_pid is not None or h.failures > 0 or h.last_result != ("passed" if ok else "failed")
        h.check_pid = h.check_start = None
        h.last_check, h.last_detail = time.time(), detail
        h.last_result = "passed" if ok else "failed"
        if ok:
            if h.failures:
                self.output.note(f"Health check of {self.name} passes again: {detail}.")
                self._publish(self, self.state, self.state, f"health check passed: {detail}")
            h.failures, h.last_success = 0, h.last_check
            if news:
                self.save()
            return
        if h.last_check - self.since < spec.start_period:
            self.output.note(f"Health check of {self.name} failed (forgiven: start period): {detail}.")
            self.save()
            return
        h.failures += 1
        self.output.note(f"Health check of {self.name} failed ({h.failures} of {spec.failures}): {detail}.")
        self._publish(self, self.state, self.state,
                      f"health check failed ({h.failures} of {spec.failures}): {detail}")
        if h.failures >= spec.failures:
            times = f"{h.failures} time{'s' if h.failures > 1 else ''}"
            reason = f"health check failed {times} in a row: {detail}"
            self.last_failure = reason
            self._health_restart = reason
            self.output.note(f"Restarting {self.name}: {reason}.")
            log.warning("health check failed; restarting", reason=detail)
            self._begin_stop(reason)
        self.save()

    def _on_notify(self, pid: int, fields: dict[str, str]) -> None:
        if "STATUS" in fields:
            self.status_text = fields["STATUS"] or None
            self._publish(self, self.state, self.state, "status")
        if "ERRNO" in fields and fields["ERRNO"].isdigit():
            err = int(fields["ERRNO"])
            self.last_failure = f"errno {err}: {os.strerror(err)}"
        if fields.get("RELOADING") == "1":
            self.output.note(f"Service {self.name} is reloading.")
        if fields.get("STOPPING") == "1":
            self.output.note(f"Service {self.name} is stopping on its own.")
        if "MAINPID" in fields and fields["MAINPID"].isdigit():
            self._adopt_main(int(fields["MAINPID"]), sender=pid)
        if fields.get("READY") == "1" and self.state is State.STARTING and self._ready is not None:
            self._ready.set()
        if fields.get("WATCHDOG") == "1":
            if self.spec.watchdog_sec:
                self._watchdog_deadline = trio.current_time() + self.spec.watchdog_sec
        elif fields.get("WATCHDOG") == "trigger" and self.child is not None:
            self._watchdog_fire("the service asked for it (WATCHDOG=trigger)")

    def _adopt_main(self, new_pid: int, *, sender: int) -> None:
        """MAINPID=: follow the hand-off, if the named process is the service's.

        The sender is one of the service's processes already (the notify
        router checked); the new main process must be one too.
        """
        if self.child is not None and self.child.pid == new_pid:
            return
        why = self.containment.why_untrusted(new_pid, self.child.pid if self.child is not None else None)
        if why is not None:
            self._refuse(f"MAINPID={new_pid} (sent by PID {sender})", why)
            return
        try:
            adopted = _proc.Child.adopt(new_pid)
        except (ProcessLookupError, OSError):
            log.warning("MAINPID= names no running process", pid=new_pid)
            return
        self.child = adopted
        assert self._nursery is not None
        self._nursery.start_soon(self._monitor, adopted)

    def _refuse(self, what: str, why: str) -> None:
        """A PID the service named is not its own: ignored, said once per reason."""
        if self.containment.refused_once(why):
            log.warning("ignored a PID the service named", what=what, reason=why)
            self.output.note(f"Service {self.name}: ignored {what}: {why}.")

    async def _watchdog(self) -> None:
        assert self.spec.watchdog_sec
        with trio.CancelScope() as scope:
            self._watchdog_scope = scope
            self._watchdog_deadline = trio.current_time() + self.spec.watchdog_sec
            while True:
                await trio.sleep_until(self._watchdog_deadline)
                if trio.current_time() >= self._watchdog_deadline:
                    self._post(_WatchdogExpired(f"no WATCHDOG=1 within {self.spec.watchdog_sec:g} s"))
                    return

    def _watchdog_fire(self, why: str) -> None:
        self.last_failure = f"watchdog: {why}"
        self.output.note(f"Watchdog timeout for {self.name}: {why}; sending SIGABRT.")
        if self.child is not None:
            self.child.signal(signal.SIGABRT)

    # -- persistence (the record is built in _service_record.py) --------------------

    def save(self) -> None:
        """The record changed: have the store write it, soon and off this path;
        at once when a new main process runs (crash recovery adopts by it).
        A process gone is written off the path too: until then the record
        names a PID whose start time no longer matches, which recovery
        never adopts."""
        if self.store is None:
            return
        pid = self.child.pid if self.child is not None and self.child.alive else None
        if pid is not None and pid != self._saved_pid:
            self._saved_pid = pid
            self.store.write_now(self.name, _service_record.record(self))
        else:
            if pid is None:
                self._saved_pid = None  # a reused PID is a new process: written at once
            self.store.mark(self.name, partial(_service_record.record, self))

    def recent_log(self, n: int) -> list[LogLine]:
        return self.output.recent(n)
