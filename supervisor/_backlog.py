"""A bounded event queue for one client stream that counts what it drops.

A client that follows a log or subscribes to state changes may read more
slowly than events arrive.  Its `Backlog` keeps at most `capacity` events;
newer ones are dropped and counted, and the reader then gets an `Overflow`
with that count at the place of the gap, before the events that came after
it.  Producers never wait and memory stays bounded; the reader is told
exactly how much it missed, never left waiting for events that will not come.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, NamedTuple, TypeVar

import trio

from herd.protocol import MAX_BACKLOG

__all__ = ["Backlog", "Overflow"]

T = TypeVar("T")


class Overflow(NamedTuple):
    """`lost` events were dropped here: the reader was too far behind."""

    lost: int


class Backlog(Generic[T]):
    """Events for one reader; `put` never blocks, `get` waits for the next."""

    def __init__(self, capacity: int = MAX_BACKLOG) -> None:
        self.capacity = capacity
        self._items: deque[T | Overflow] = deque()
        self._count = 0  # events in _items (Overflow markers not counted)
        self._lost = 0  # dropped since the last marker
        self._waiting = trio.lowlevel.ParkingLot()

    def put(self, item: T) -> None:
        """Queue an event, or count it as lost when the reader is too far behind."""
        if self._count >= self.capacity:
            self._lost += 1
            return
        if self._lost:
            self._items.append(Overflow(self._lost))
            self._lost = 0
        self._items.append(item)
        self._count += 1
        self._waiting.unpark_all()

    async def get(self) -> T | Overflow:
        """The next event, or an `Overflow` where events were dropped."""
        while not self._items:
            if self._lost:
                lost, self._lost = self._lost, 0
                return Overflow(lost)
            await self._waiting.park()
        item = self._items.popleft()
        if not isinstance(item, Overflow):
            self._count -= 1
        return item

    def drain_nowait(self) -> list[T | Overflow]:
        """Everything queued, oldest first (an `Overflow` where events were lost)."""
        items = list(self._items)
        if self._lost:
            items.append(Overflow(self._lost))
        self._items.clear()
        self._count = self._lost = 0
        return items

    def take_from(self, source: trio.MemoryReceiveChannel[T]) -> None:
        """Queue what `source` holds now, without waiting."""
        while True:
            try:
                self.put(source.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return

    async def pump(self, source: trio.MemoryReceiveChannel[T]) -> None:
        """Move everything `source` receives into this backlog, at once.

        For producers that hand out an unbounded channel: draining it without
        a checkpoint between items keeps it near empty, so the bound that
        applies is this backlog's.
        """
        async for item in source:
            self.put(item)
            while True:
                try:
                    self.put(source.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
