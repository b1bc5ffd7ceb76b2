"""Worker threads that never take the supervisor's signals.

Signals that act on the supervisor (`HELD_SIGNALS`) are blocked in the main
thread across a re-exec; a signal the kernel hands to another thread then
would be lost with the old image.  So every worker thread blocks them before
it runs anything: `run_sync` is `trio.to_thread.run_sync` with that rule.
Service types use it through the public API (`supervisor.run_in_thread`).
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Final, TypeVar

import trio

__all__ = ["HELD_SIGNALS", "run_sync"]

HELD_SIGNALS: Final = {signal.SIGUSR1, signal.SIGHUP, signal.SIGTERM, signal.SIGINT}

T = TypeVar("T")


def _blocking(fn: Callable[..., T]) -> Callable[..., T]:
    def run(*args: object) -> T:
        signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)  # stays so for the thread's next jobs
        return fn(*args)

    return run


async def run_sync(fn: Callable[..., T], *args: object) -> T:
    """Run `fn(*args)` in a worker thread that cannot take the held signals."""
    return await trio.to_thread.run_sync(_blocking(fn), *args)
