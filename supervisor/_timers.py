"""Timers: a service with a `schedule` runs its command at each cron event.

`TimerMixin` is part of the `Service` actor (its methods run in the actor's
tasks and touch only its state).  Armed while the service is `running`;
runs never overlap; `max-duration` stops an overrun; `trigger` runs now.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import trio
from cronsim import CronSim

from . import _proc
from ._actor import Outcome, State, _Reply, _Trigger
from ._output import OutputError
from ._stopping import terminate

__all__ = ["TimerMixin", "timer_details"]


class TimerMixin:
    """Timer behaviour of `supervisor.service.Service`."""

    async def _timer_loop(self, scope: trio.CancelScope) -> None:
        """While armed: sleep until each event of the schedule, then trigger."""
        assert self.spec.schedule is not None
        with scope:
            while True:
                now = datetime.now().astimezone()
                self.next_run = next(CronSim(self.spec.schedule, now)).timestamp()
                # Sleep in slices: the wall clock may be set while we sleep.
                while (delay := self.next_run - time.time()) > 0:
                    await trio.sleep(min(delay, 30.0))
                self._post(_Trigger(None, scheduled=True))
                await trio.sleep(0.001)  # the next event is strictly after this one

    def _on_trigger(self, reply: _Reply | None, scheduled: bool) -> None:
        def answer(outcome: Outcome) -> None:
            if reply is not None:
                reply.set(outcome)

        if self.spec.schedule is None:
            answer(Outcome(False, code="unknown-action", message=f"{self.name} is not a timer"))
        elif self.state is not State.RUNNING:
            answer(Outcome(False, code="action-failed",
                           message=f"timer {self.name} is {self.state.value}; start it first"))
        elif self.child is not None and self.child.alive:
            what = f"a run of {self.name} (PID {self.child.pid}) is still in progress"
            if scheduled:
                self.output.note(f"Skipped this event: {what}.")
            answer(Outcome(False, code="action-failed", message=what))
        else:
            self._start_run()
            ok = self.child is not None
            answer(Outcome(ok, initiated=ok, code=None if ok else "action-failed",
                           message="" if ok else f"{self.name}: {(self.last_run or {}).get('error')}"))

    def _start_run(self) -> None:
        assert self._nursery is not None
        started = time.time()
        try:
            with self.output.writers(self._nursery) as (out, err):
                child = _proc.spawn(self.spec, stdout=out, stderr=err)
        except (_proc.SpawnError, OutputError) as exc:
            self.last_run = {"start": started, "end": started, "error": str(exc)}
            self.output.note(f"Run of {self.name} failed to start: {exc}")
            return
        self.child = child
        self.last_run = {"start": started, "pid": child.pid}
        self.output.note(f"Run of {self.name} started (PID {child.pid}).")
        self._nursery.start_soon(self._monitor, child)
        if self.spec.max_duration is not None:
            self._nursery.start_soon(self._run_deadline, child)
        self._publish(self, self.state, self.state, "run started")

    async def _run_deadline(self, child: _proc.Child) -> None:
        assert self.spec.max_duration is not None
        with trio.move_on_after(self.spec.max_duration):
            await child.exited.wait()
            return
        self.output.note(f"Run of {self.name} exceeded max-duration "
                         f"({self.spec.max_duration:g} s); stopping it.")
        if self.last_run is not None and self.last_run.get("pid") == child.pid:
            self.last_run["overrun"] = True
        with trio.CancelScope(shield=True):
            await terminate(child, self.spec, self.output.note)

    def _on_run_finished(self, child: _proc.Child) -> None:
        assert child.status is not None
        self.child = None
        self.last_exit = child.status
        run = self.last_run if self.last_run is not None and self.last_run.get("pid") == child.pid else {}
        run.update(end=child.status.time, **child.status.to_json())
        run.pop("time", None)
        self.last_run = run
        self.output.note(f"Run of {self.name} {child.status.describe()}.")
        self.save()
        self._publish(self, self.state, self.state, f"run {child.status.describe()}")

    def _timer_json(self) -> dict[str, Any]:
        return {"schedule": self.spec.schedule, "next-run": self.next_run, "last-run": self.last_run,
                "max-duration": self.spec.max_duration}


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

