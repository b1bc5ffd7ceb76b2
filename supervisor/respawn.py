"""The respawn policy: what happens when a running service's process exits.

Pure: no I/O, no clock, no trio.  The service actor asks `decide` with the
exit, the service's `Policy` and its `History`, and does what the `Decision`
says.  Shepherd's rule is the default: respawn after `delay`, but more than
`limit.count` respawns within `limit.seconds` disable the service until an
operator enables it again.  Exits listed in `stay_down` mean "not needed
here" (s6's permanent failure) and are never respawned.

With `Policy.backoff` (the ``respawn-backoff`` key) the delay grows
instead: `initial` × `factor` per quick crash in a row, capped at `max`,
back to `initial` once a run lasted `reset_after`; and the limit never
disables the service.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Verdict", "Decision", "Exit", "History", "Policy", "Backoff", "Ring", "decide"]


class Verdict(enum.Enum):
    RESPAWN = "respawn"      # start again after `Decision.delay`
    STAY_DOWN = "stay-down"  # an exit that means "not needed here"
    STOP = "stop"            # respawn is off (or the service is disabled)
    DISABLE = "disable"      # respawning too fast: disabled until enabled again


class Ring:
    """The last `maxlen` items, oldest first: a ``deque(maxlen=...)`` that
    allocates nothing until its first item.  (An empty deque holds a block
    of 64 slots, 760 bytes; every service keeps several, mostly empty.)"""

    __slots__ = ("maxlen", "_items")

    def __init__(self, maxlen: int, items: Iterable[Any] = ()) -> None:
        self.maxlen = maxlen
        self._items: list[Any] | None = None
        self.extend(items)

    def append(self, item: Any) -> None:
        if self._items is None:
            self._items = [item]
            return
        self._items.append(item)
        if len(self._items) > self.maxlen:
            del self._items[0]

    def extend(self, items: Iterable[Any]) -> None:
        for item in items:
            self.append(item)

    def clear(self) -> None:
        self._items = None

    def __len__(self) -> int:
        return len(self._items) if self._items is not None else 0

    def __iter__(self) -> Iterator[Any]:
        return iter(self._items or ())

    def __getitem__(self, index: int) -> Any:
        """Raises:
            IndexError: no item at `index`."""
        if self._items is None:
            raise IndexError("ring index out of range")
        return self._items[index]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ring):
            return NotImplemented
        return list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]  # mutable, like a deque

    def __repr__(self) -> str:
        return f"Ring({self.maxlen}, {self._items or []!r})"


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    reason: str
    delay: float = 0.0


@dataclass(frozen=True, slots=True)
class Exit:
    """One exit of a main process: when (monotonic), and how."""

    time: float
    code: int | None
    signal: int | None
    cause: str | None = None  # not an exit of its own: why the supervisor stopped it (health)

    def describe(self) -> str:
        if self.cause is not None:
            return self.cause
        if self.signal is not None:
            import signal as _signal

            try:
                return f"terminated by {_signal.Signals(self.signal).name}"
            except ValueError:
                return f"terminated by signal {self.signal}"
        return "exited (status unknown)" if self.code is None else f"exited with code {self.code}"


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential backoff: the ``respawn-backoff`` key (seconds)."""

    initial: float = 0.1
    factor: float = 2.0
    max: float = 300.0
    reset_after: float = 60.0


@dataclass(frozen=True, slots=True)
class Policy:
    respawn: bool = True
    limit_count: int = 5
    limit_seconds: float = 7.0
    delay: float = 0.1
    stay_down: Mapping[int, str] = field(default_factory=dict)
    backoff: Backoff | None = None


@dataclass(slots=True)
class History:
    """What the policy remembers: recent exits and the respawns it ordered
    (monotonic times), bounded."""

    exits: Ring = field(default_factory=lambda: Ring(64))
    respawns: Ring = field(default_factory=lambda: Ring(64))
    started: float | None = None  # monotonic time the current run began (backoff's reset)

    def clear(self) -> None:
        self.exits.clear()
        self.respawns.clear()

    def to_record(self, now: float, wall: float) -> dict[str, Any]:
        """Serializable form; monotonic times become wall-clock (epoch) times."""
        def epoch(t: float) -> float:
            return wall - (now - t)

        return {"exits": [{"time": epoch(e.time), "code": e.code, "signal": e.signal} for e in self.exits],
                "respawns": [epoch(t) for t in self.respawns],
                "started": epoch(self.started) if self.started is not None else None}

    @classmethod
    def from_record(cls, data: Any, now: float, wall: float) -> History:
        """The inverse of `to_record` (bad entries are skipped)."""
        history = cls()
        if not isinstance(data, Mapping):
            return history
        for e in data.get("exits", []) or []:
            if isinstance(e, Mapping) and isinstance(e.get("time"), (int, float)):
                history.exits.append(Exit(now - (wall - float(e["time"])), e.get("code"), e.get("signal")))
        for t in data.get("respawns", []) or []:
            if isinstance(t, (int, float)):
                history.respawns.append(now - (wall - float(t)))
        if isinstance(data.get("started"), (int, float)) and not isinstance(data["started"], bool):
            history.started = now - (wall - float(data["started"]))
        return history


def decide(policy: Policy, history: History, exit_: Exit, *, enabled: bool) -> Decision:
    """What to do about `exit_` (already appended to `history` or not: it is
    appended here).  Respawns ordered are recorded in `history`."""
    history.exits.append(exit_)
    what = exit_.describe()
    if exit_.code is not None and exit_.code in policy.stay_down:
        return Decision(Verdict.STAY_DOWN, policy.stay_down[exit_.code])
    if not policy.respawn or not enabled:
        return Decision(Verdict.STOP, what)
    now = exit_.time
    if policy.backoff is not None:
        delay, reset = _backoff_delay(policy.backoff, history, now)
        history.respawns.append(now)
        again = f" (up {reset:g} s: backoff reset)" if reset is not None else ""
        return Decision(Verdict.RESPAWN, f"{what}; respawning in {delay:g} s{again}", delay)
    n, window = policy.limit_count, policy.limit_seconds
    recent = history.respawns
    if n == 0 or (len(recent) >= n and now - recent[-n] <= window):
        return Decision(Verdict.DISABLE, f"Respawning too fast: more than {n} respawns within {window:g} s; last {what}")
    history.respawns.append(now)
    return Decision(Verdict.RESPAWN, f"{what}; respawning", policy.delay)


def _backoff_delay(b: Backoff, history: History, now: float) -> tuple[float, float | None]:
    """initial × factor^k, k = quick crashes in a row, capped at `max`; a run
    that lasted `reset_after` resets k.  Also how long that run lasted, when
    it reset k (None otherwise)."""
    reset = None
    if history.started is not None and now - history.started >= b.reset_after:
        if history.respawns:
            reset = round(now - history.started, 1)
        history.respawns.clear()
    k = len(history.respawns)
    try:
        delay = b.initial * (b.factor ** k)
    except OverflowError:
        delay = b.max
    return min(b.max, delay), reset
