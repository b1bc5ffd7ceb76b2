"""Timers: a service with a `schedule` runs its command at each cron event.

`Timer` is an object its `supervisor.service.Service` owns and drives.  Its
methods run in the service's actor, which alone changes the timer's state
(`next_run`, `last_run`); its tasks (the schedule, a run's `max-duration`)
only post messages to the actor (`_TimerArmed`, `_Trigger`, `_Overran`),
which hands them back to it.  Armed while the service is `running`; runs
never overlap; `max-duration` stops an overrun; `trigger` runs now.
`last_run` is part of the service's record (a re-exec and crash recovery
keep it); `next_run` is computed again when the timer is armed.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

import trio
from cronsim import CronSim

from herd.protocol import ProtocolError

from . import _proc
from ._actor import Outcome, State, _Overran, _Reply, _TimerArmed, _Trigger
from ._messages import say
from ._stopping import terminate
from .spawn import spawn_process
from .spec import ActionContext, ActionSpec

if TYPE_CHECKING:
    from .service import Service

__all__ = ["TRIGGER", "Timer", "timer_details"]


class Timer:
    """The schedule and the runs of one service; its methods run in the service's actor."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.next_run: float | None = None  # the next event (epoch)
        self.last_run: dict[str, Any] | None = None  # start, end, code, signal, error
        self._scope: trio.CancelScope | None = None  # the schedule's task, while armed

    def arm(self, nursery: trio.Nursery) -> None:
        """The service is running: follow the schedule."""
        self._scope = trio.CancelScope()
        nursery.start_soon(self._loop, self._scope)

    def disarm(self) -> None:
        """The service leaves `running`: no next event."""
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None
            self.next_run = None

    def armed(self, next_run: float) -> None:
        """The schedule's task computed the next event (`_TimerArmed`)."""
        self.next_run = next_run if self.service.state is State.RUNNING else None

    def overran(self, pid: int) -> None:
        """The run with this PID exceeded max-duration (`_Overran`)."""
        if self.last_run is not None and self.last_run.get("pid") == pid:
            self.last_run["overrun"] = True

    async def _loop(self, scope: trio.CancelScope) -> None:
        """While armed: sleep until each event of the schedule, then trigger."""
        svc = self.service
        assert svc.spec.schedule is not None
        with scope:
            while True:
                now = datetime.now().astimezone()
                next_run = next(CronSim(svc.spec.schedule, now)).timestamp()
                svc._post(_TimerArmed(next_run))
                # Sleep in slices: the wall clock may be set while we sleep.
                while (delay := next_run - time.time()) > 0:
                    await trio.sleep(min(delay, 30.0))
                svc._post(_Trigger(None, scheduled=True))
                await trio.sleep(0.001)  # the next event is strictly after this one

    def trigger(self, reply: _Reply | None, scheduled: bool) -> None:
        """Run the command now (`_Trigger`: the schedule, or `herd trigger`)."""
        svc = self.service

        def answer(outcome: Outcome) -> None:
            if reply is not None:
                reply.set(outcome)

        if svc.spec.schedule is None:
            answer(Outcome(False, code="unknown-action", message=f"{svc.name} is not a timer"))
        elif svc.state is not State.RUNNING:
            answer(Outcome(False, code="action-failed",
                           message=f"timer {svc.name} is {svc.state.value}; start it first"))
        elif svc.child is not None and svc.child.alive:
            what = f"a run of {svc.name} (PID {svc.child.pid}) is still in progress"
            if scheduled:
                svc.output.note(f"Skipped this event: {what}.")
            answer(Outcome(False, code="action-failed", message=what))
        else:
            self._start_run()
            ok = svc.child is not None
            answer(Outcome(ok, initiated=ok, code=None if ok else "action-failed",
                           message="" if ok else f"{svc.name}: {(self.last_run or {}).get('error')}"))

    def _start_run(self) -> None:
        svc = self.service
        assert svc._nursery is not None
        started = time.time()
        try:
            with svc.output.writers(svc._nursery) as (out, err):
                child, svc.guards = spawn_process(svc, svc.spec, out, err)
        except _proc.SpawnError as exc:
            self.last_run = {"start": started, "end": started, "error": str(exc)}
            svc.output.note(f"Run of {svc.name} failed to start: {exc}")
            return
        svc.child = child
        self.last_run = {"start": started, "pid": child.pid}
        svc.output.note(f"Run of {svc.name} started (PID {child.pid}).")
        svc._nursery.start_soon(svc._monitor, child)
        if svc.spec.max_duration is not None:
            svc._nursery.start_soon(self._run_deadline, child)
        svc._publish(svc, svc.state, svc.state, "run started")

    async def _run_deadline(self, child: _proc.Child) -> None:
        svc = self.service
        assert svc.spec.max_duration is not None
        with trio.move_on_after(svc.spec.max_duration):
            await child.exited.wait()
            return
        svc.output.note(f"Run of {svc.name} exceeded max-duration "
                        f"({svc.spec.max_duration:g} s); stopping it.")
        svc._post(_Overran(child.pid))
        with trio.CancelScope(shield=True):
            await terminate(child, svc.spec, svc.output.note, svc.containment)

    def run_finished(self, child: _proc.Child) -> None:
        """The process of a run exited (the service stays `running`)."""
        svc = self.service
        assert child.status is not None
        svc.child = None
        svc.last_exit = child.status
        run = self.last_run if self.last_run is not None and self.last_run.get("pid") == child.pid else {}
        run.update(end=child.status.time, **child.status.to_json())
        run.pop("time", None)
        self.last_run = {k: v for k, v in run.items() if v is not None}  # as its record keeps it
        svc.output.note(f"Run of {svc.name} {child.status.describe()}.")
        if svc.containment.populated() and svc._nursery is not None:  # what the run left
            svc._nursery.start_soon(svc.containment.sweep, svc.spec.stop_signal,
                                    svc.spec.stop_timeout, svc.output.note)
        svc.save()
        svc._publish(svc, svc.state, svc.state, f"run {child.status.describe()}")

    def to_json(self) -> dict[str, Any]:
        """The timer's facts, for `status`."""
        spec = self.service.spec
        return {"schedule": spec.schedule, "next-run": self.next_run, "last-run": self.last_run,
                "max-duration": spec.max_duration}


async def _trigger(ctx: ActionContext, args: list[Any]) -> dict[str, Any]:
    if args:
        raise ProtocolError("bad-arguments", "trigger takes no arguments")
    service = ctx.engine.lookup(ctx.service)
    outcome = await service.trigger()
    if not outcome.ok:
        raise ProtocolError(outcome.code or "action-failed", outcome.message)
    say(f"Timer {service.name} triggered (PID {service.child.pid if service.child else '?'}).")
    return {"service": service.name, "pid": service.child.pid if service.child else None}


#: Every timer's action (a service with a `schedule`), unless its type has its own `trigger`.
TRIGGER = ActionSpec("trigger", "Run the timer's command now (not while a run is in progress).", _trigger)


def timer_details(timer: dict[str, Any]) -> dict[str, Any]:
    """A timer's facts in words, for `herd status NAME`."""
    def when(t: float | None) -> str | None:
        return datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds") if t else None

    run = timer.get("last-run") or {}
    if not run:
        last = "never"
    elif run.get("error"):
        last = f"{when(run.get('start'))}: failed to start: {run['error']}"
    elif "end" not in run:
        last = f"{when(run.get('start'))}: running (PID {run.get('pid')})"
    else:
        how = f"signal {run['signal']}" if run.get("signal") else f"exit code {run.get('code')}"
        took = float(run["end"]) - float(run.get("start", run["end"]))
        last = f"{when(run.get('start'))}: {how} after {took:.1f} s" + (" (overran)" if run.get("overrun") else "")
    return {"schedule": timer["schedule"], "next-run": when(timer.get("next-run")) or "not armed",
            "last-run": last}

