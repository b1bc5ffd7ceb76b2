"""The control sockets: newline-delimited JSON, one task per connection.

A `ControlServer` serves one socket (read-write or read-only): it accepts
clients up to `MAX_CLIENTS`, and for a re-exec pauses the dispatch of
requests and hands each connection over to the next image, which resumes
them.  Each connection (`_connection.py`) has a reader, a writer and one
task per request.  When the replies waiting for all clients together pass
`MAX_TOTAL_QUEUED_BYTES`, the client with the most unread output is dropped
(`ReplyBudget`).
"""

from __future__ import annotations

import os
import socket
from functools import partial
from pathlib import Path
from typing import Any, Final

import trio

from herd.protocol import MAX_CLIENTS, MAX_TOTAL_QUEUED_BYTES, encode

from ._accept import serve_clients
from ._connection import _Connection
from .engine import Engine

__all__ = ["ControlServer"]


class ReplyBudget:
    """Reply bytes waiting for all clients, of every socket, bounded together."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self.connections: set[_Connection] = set()

    def charge(self, conn: _Connection, size: int) -> None:
        """`conn` queued `size` more bytes; past the limit, drop the clients
        (other than `conn`, whose reply is the one being queued) with the most
        unread output until the total fits."""
        self.total += size
        if self.total <= self.limit:
            return
        for victim in sorted(self.connections, key=lambda c: c.queued, reverse=True):
            if self.total <= self.limit or victim.queued == 0:
                break
            if victim is not conn:
                victim.abort("the replies waiting for all clients exceed "
                             f"{self.limit // (1024 * 1024)} MiB; this client has the most unread")

    def release(self, size: int) -> None:
        self.total -= size


#: One budget for every connection of every socket in this process.
BUDGET: Final = ReplyBudget(MAX_TOTAL_QUEUED_BYTES)


class ControlServer:
    """Serves one socket (read-write or read-only) for an engine."""

    def __init__(self, engine: Engine, sock: trio.socket.SocketType, *, read_only: bool,
                 path: Path, on_reexec: Any = None, budget: ReplyBudget = BUDGET) -> None:
        self.engine = engine
        self.sock = sock
        self.read_only = read_only
        self.path = path
        self.clients = 0
        self.reexec = on_reexec  # supervisor.reexec.Reexec or None
        self.budget = budget
        self.connections: set[_Connection] = set()
        self.paused = False  # a re-exec is near: requests wait in the connections' buffers
        self._nursery: trio.Nursery | None = None

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                    resumed: list[dict[str, Any]] = ()) -> None:
        """Serve the socket; `resumed` are connections a previous image handed over."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for state in resumed:  # their streams subscribe now, before any event
                    nursery.start_soon(self._resume, self._adopt(state))
                await nursery.start(partial(serve_clients, self._handle, self.sock))
                task_status.started()
        finally:
            try:
                os.unlink(self.path)
            except OSError:
                pass

    async def _handle(self, stream: trio.SocketStream) -> None:
        if self.clients >= MAX_CLIENTS:
            with trio.move_on_after(1):
                await stream.send_all(encode({"id": None, "ok": False, "error": {
                    "code": "too-many-clients",
                    "message": f"more than {MAX_CLIENTS} connections; try again later"}}))
            await trio.aclose_forcefully(stream)
            return
        await self._serve_connection(_Connection(self, stream))

    async def _serve_connection(self, conn: _Connection) -> None:
        self.clients += 1
        self.connections.add(conn)
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)
            self.clients -= 1
            await trio.aclose_forcefully(conn.stream)

    # -- re-exec: connections are handed over, not closed ------------------------------

    def pause(self, paused: bool = True) -> None:
        """Stop (or go on) dispatching requests: what arrives waits in the buffers."""
        self.paused = paused
        if not paused:
            for conn in self.connections:
                conn.dispatch_buffered()

    def busy(self, requester: Any = None) -> int:
        """Requests being served (not counting event streams, nor `requester`'s own).

        Per connection, never below 0: one connection's count cannot hide
        another's request in flight."""
        return sum(max(0, conn.in_flight - len(conn.stream_info) - (conn is requester))
                   for conn in self.connections)

    def handover(self) -> list[dict[str, Any]]:
        """Each connection's descriptor and state, for the next image (made inheritable)."""
        out = []
        for conn in self.connections:
            if not conn.closing and conn.stream.socket.fileno() >= 0:
                state = conn.handover()
                os.set_inheritable(state["fd"], True)
                out.append(state)
        return out

    def _adopt(self, state: dict[str, Any]) -> _Connection:
        fd = state["fd"]
        os.set_inheritable(fd, False)
        sock = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
        return _Connection(self, trio.SocketStream(sock), resumed=state)

    async def _resume(self, conn: _Connection) -> None:
        await self._serve_connection(conn)
