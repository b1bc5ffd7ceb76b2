"""Pacing mass starts and stops, so the sockets are answered throughout.

Trio runs, in one pass of its loop, every task that is ready, and only then
looks at the sockets again.  When 5000 services are started at once they
move in lockstep: every one of them writes its state file in the same pass,
then every one forks in the next, and a `ping` waits for the whole pass
(64 s were measured at 5000 services).

A `Pacer` lets starts (and stops) through one per pass, in the order they
came: the others wait, parked, costing nothing, while each pass also serves
the sockets.  Per pass there is then about one service's worth of work at
each step of a start (state file, fork, readiness), a few milliseconds.
"""

from __future__ import annotations

import trio

__all__ = ["Pacer"]


class Pacer:
    """One admission per pass of the event loop, first come first served."""

    def __init__(self) -> None:
        self._lock = trio.Lock()  # FIFO; waiters are woken one per pass

    async def turn(self) -> None:
        """Wait for this task's turn (a checkpoint, even when nobody waits)."""
        async with self._lock:
            pass
