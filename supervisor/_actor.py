"""The vocabulary of a service actor: states, outcomes, replies, messages.

Messages from other tasks (`_Start`, `_Stop`, …) carry a one-shot `_Reply`;
private ones from the actor's own workers (`_StartDone`, `_StopDone`,
`_Exited`) carry a generation number so a stale report is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import trio

from . import _proc
from .lifecycle import State
from .respawn import Ring
from .spec import ServiceSpec

__all__ = ["Inbox", "State", "Outcome"]




@dataclass(frozen=True, slots=True)
class Outcome:
    """The answer to a start or stop request."""

    ok: bool
    initiated: bool = False  # this request caused the transition
    code: str | None = None  # protocol error code when not ok
    message: str = ""


class Inbox:
    """An actor's mailbox: unbounded, first in first out, one reader (the
    actor's loop, ``async for msg in inbox``), any number of senders in the
    same thread (`send_nowait`).  What a memory channel does here, for 0.2
    KiB instead of 3.4 KiB per service (its state holds a deque, two ordered
    dicts and statistics, and its waiting reader more).  Like a channel's
    receive, each message is a checkpoint."""

    __slots__ = ("_items", "_reader")

    def __init__(self) -> None:
        self._items: list[Any] | None = None
        self._reader: trio.lowlevel.Task | None = None

    def send_nowait(self, msg: Any) -> None:
        if self._items is None:
            self._items = [msg]
        else:
            self._items.append(msg)
        if self._reader is not None:
            reader, self._reader = self._reader, None
            trio.lowlevel.reschedule(reader)

    def pending(self) -> tuple[Any, ...]:
        """The messages not yet read (a look, for lookups; nothing is taken)."""
        return tuple(self._items or ())

    def _abort(self, _raise_cancel: Any) -> trio.lowlevel.Abort:
        self._reader = None
        return trio.lowlevel.Abort.SUCCEEDED

    def __aiter__(self) -> Inbox:
        return self

    async def __anext__(self) -> Any:
        """The next message, waiting for one.

        Raises:
            trio.Cancelled: the reader is cancelled (no message is lost).
        """
        if self._items is None:
            self._reader = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(self._abort)
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
        assert self._items is not None
        msg = self._items.pop(0)
        if not self._items:
            self._items = None
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return msg


class _Reply:
    __slots__ = ("event", "outcome")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.outcome: Outcome | None = None

    def set(self, outcome: Outcome) -> None:
        if not self.event.is_set():
            self.outcome = outcome
            self.event.set()

    async def wait(self) -> Outcome:
        await self.event.wait()
        assert self.outcome is not None
        return self.outcome


# -- messages -------------------------------------------------------------------------


@dataclass(slots=True)
class _Start:
    reply: _Reply
    as_requirement: bool
    operator: bool = False  # an operator asked for this service by name


@dataclass(slots=True)
class _Stop:
    reply: _Reply
    operator: bool = False


@dataclass(slots=True)
class _SetEnabled:
    reply: _Reply
    enabled: bool


@dataclass(slots=True)
class _Replace:
    reply: _Reply
    spec: ServiceSpec


@dataclass(slots=True)
class _Trigger:  # a timer's event, or `herd trigger`
    reply: _Reply | None
    scheduled: bool


@dataclass(slots=True)
class _Exited:  # private: a monitored child exited
    child: _proc.Child


@dataclass(slots=True)
class _Notify:  # an sd_notify datagram from one of this service's processes
    pid: int
    fields: dict[str, str]


@dataclass(slots=True)
class _StartDone:  # private: the start worker's verdict
    gen: int
    ok: bool
    reason: str | None


@dataclass(slots=True)
class _StopDone:  # private: the stop worker is finished
    gen: int


@dataclass(slots=True)
class _Spawned:  # private: the start worker spawned the main process
    gen: int
    child: _proc.Child
    guards: dict[str, dict[str, int]]  # its guard descriptors (`_guard.record`)


@dataclass(slots=True)
class _Adopted:  # private: the start worker found the real main process (pid file)
    gen: int
    child: _proc.Child


@dataclass(slots=True)
class _HookStarted:  # private: a process-less service's start hook is running
    gen: int


@dataclass(slots=True)
class _WatchdogExpired:  # private: no WATCHDOG=1 in time
    why: str


@dataclass(slots=True)
class _TimerArmed:  # private: a timer's next event
    next_run: float


@dataclass(slots=True)
class _Overran:  # private: a timer's run exceeded max-duration
    pid: int


@dataclass(slots=True)
class _RespawnDue:  # private: a backoff delay is over
    token: int


@dataclass(slots=True)
class _HealthResult:  # private: one health check's outcome
    run: int  # the check loop it comes from (a loop of an earlier run is stale)
    ok: bool
    detail: str


@dataclass(slots=True)
class _HealthCheckRunning:  # private: an exec check was spawned (recorded: killed after a crash of ours)
    run: int
    pid: int
    start: int | None




@dataclass(slots=True)
class _History:
    respawns: Ring = field(default_factory=lambda: Ring(20))
    startup_failures: Ring = field(default_factory=lambda: Ring(20))

