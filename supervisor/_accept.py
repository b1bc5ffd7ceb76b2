"""Accepting clients, even when the descriptor table is full.

A few descriptors (`RESERVE`, shared by both control sockets) are held open
on ``/dev/null`` from the start.  When ``accept`` fails for lack of
descriptors (EMFILE: services and idle connections took them all), one of
them is closed and the accept retried: the new client gets that slot, and is
served as usual.  The reserve is filled up again as clients leave.  Other
capacity errors (ENFILE, ENOMEM, ENOBUFS, or an empty reserve) are retried
every 100 ms, logged once per streak.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Awaitable, Callable
from typing import Final

import structlog
import trio

__all__ = ["RESERVE", "serve_clients"]

log = structlog.get_logger("supervisor.control")

RESERVE: Final = 8
_CAPACITY: Final = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_RETRY: Final = 0.1

_spares: list[int] = []


def _refill() -> None:
    while len(_spares) < RESERVE:
        try:
            _spares.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
        except OSError:
            return


def _release_one() -> bool:
    if not _spares:
        return False
    os.close(_spares.pop())
    return True


async def serve_clients(handler: Callable[[trio.SocketStream], Awaitable[object]],
                        sock: trio.socket.SocketType, *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Accept connections on `sock` forever; each runs `handler` in its own task
    and is closed after it.  A handler's exception ends the server."""
    _refill()
    listener = trio.SocketListener(sock)
    async with trio.open_nursery() as handlers, listener:
        task_status.started()
        failing = False
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno == errno.EMFILE and _release_one():
                    continue  # the next accept takes the freed slot
                if exc.errno not in _CAPACITY:
                    raise
                if not failing:
                    log.error("cannot accept a client; retrying every 100 ms", error=os.strerror(exc.errno))
                    failing = True
                await trio.sleep(_RETRY)
                continue
            failing = False
            handlers.start_soon(_run, handler, stream)


async def _run(handler: Callable[[trio.SocketStream], Awaitable[object]], stream: trio.SocketStream) -> None:
    try:
        await handler(stream)
    finally:
        await trio.aclose_forcefully(stream)
        _refill()
