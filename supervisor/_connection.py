"""One control connection: its reader, its writer, and its requests.

Each connection has a reader (bounded line size; each line once begun must
be completed in `LINE_TIMEOUT`), a writer draining a bounded queue, and one
task per request, so several requests are in flight at once and a slow
`stop` never delays a `status`.  A client that does not read its replies is
dropped once `MAX_QUEUED_BYTES` wait for it (and, across all clients, by
the server's `ReplyBudget`).  Event streams (`subscribe`, `log` with
follow) wait for the client instead, and a client too far behind gets an
``overflow`` event counting what it lost (`_backlog`).  Actions are
dispatched through the table in `_actions`; the read-only socket refuses
every action not declared read-only, whoever asks.  For a re-exec, a
connection hands over its socket, its unread input, its unsent output and
its event streams (`handover`), and the next image resumes it.
"""

from __future__ import annotations

import collections
import math
import os
import socket
import struct
import time
from typing import TYPE_CHECKING, Any, Final

import structlog
import trio

from herd.protocol import (
    HEARTBEAT_INTERVAL,
    LINE_TIMEOUT,
    MAX_IN_FLIGHT,
    MAX_LINE_BYTES,
    MAX_QUEUED_BYTES,
    PROTOCOL_VERSION,
    ProtocolError,
    Request,
    decode_request,
    encode,
)

from . import __version__, _memory
from ._actions import STREAMED, find_action
from ._backlog import Backlog, Overflow
from ._messages import MESSAGES
from ._status_cache import Encoded, dumps

if TYPE_CHECKING:
    from .control import ControlServer

__all__ = ["_Connection"]

log = structlog.get_logger("supervisor.control")

#: An event stream waits while more than this many bytes wait for its client
#: (so events never trip `MAX_QUEUED_BYTES`: they fill the stream's backlog).
STREAM_HIGH_WATER: Final = 256 * 1024
#: The writer hands the socket at most this much at once, so that what a
#: client has not read yet is known as it reads a large reply.
_WRITE_CHUNK: Final = 256 * 1024


def _peer_uid(stream: trio.SocketStream) -> int:
    """The uid of the process at the other end (SO_PEERCRED); -1 if unknown."""
    try:
        creds = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return int(struct.unpack("3i", creds)[1])
    except (OSError, struct.error):
        return -1


class _Connection:
    def __init__(self, server: ControlServer, stream: trio.SocketStream,
                 resumed: dict[str, Any] | None = None) -> None:
        self.server = server
        self.engine = server.engine
        self.stream = stream
        self.resumed = resumed  # handed over by the previous image (re-exec)
        self.peer_uid = _peer_uid(stream)
        self.buf = bytearray()  # input not yet dispatched
        self._chunk: memoryview | None = None  # output being sent: what is left of it
        #: event streams: their cancel scope → (kind, request id, service, backlog, render)
        self.stream_info: dict[trio.CancelScope, tuple[str, Any, str | None, Backlog[Any], Any, Any]] = {}
        # a resumed connection's streams, subscribed at once: (stream, context, what it yields)
        self._resumed_streams = [self._subscribe_again(stream) for stream in (resumed or {}).get("streams", [])]
        self.queued = 0  # bytes queued for the client and not yet taken by its socket
        self.in_flight = 0
        # Output waiting for the writer.  A plain deque, not a memory channel:
        # a channel hands an item straight to a parked receiver, where a
        # re-exec's handover could not see it.
        self._out: collections.deque[bytes] = collections.deque()
        self._out_closed = False
        self._out_ready = trio.lowlevel.ParkingLot()  # the writer waits here for output
        self._written = trio.lowlevel.ParkingLot()  # woken as the writer makes progress
        self._streams: set[trio.CancelScope] = set()  # subscriptions, log follows
        self._closing = False

    async def run(self) -> None:
        budget = self.server.budget
        budget.connections.add(self)
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._writer)
                if self.resumed is None:
                    self.send({"hello": "supervisor", "protocol": PROTOCOL_VERSION, "version": __version__,
                               "read-only": self.server.read_only})
                else:
                    self._send_raw(self._take_resumed("output"))
                async with trio.open_nursery() as requests:
                    self.requests = requests
                    if self.resumed is not None:
                        for stream in self._resumed_streams:
                            self.in_flight += 1
                            requests.start_soon(self._resume_stream, *stream)
                        self.buf += self._take_resumed("input")
                        self.dispatch_buffered()
                    await self._reader()
                    for scope in list(self._streams):  # the client is gone: end its streams
                        scope.cancel()
                self._out_closed = True  # the writer flushes what is queued, then ends
                self._out_ready.unpark_all()
        finally:
            budget.connections.discard(self)
            budget.release(self.queued)
            self.queued = 0
            self._drop_output()

    def _take_resumed(self, key: str) -> bytes:
        """The hand-over's `input` or `output`, taken out of it: its hex text
        is freed now (and its memory given back), not kept for the
        connection's life by whoever holds the hand-over."""
        text = self.resumed.pop(key, "") if self.resumed is not None else ""
        size = len(text)
        data = bytes.fromhex(text)
        del text
        _memory.released(size)
        return data

    def _drop_output(self) -> None:
        """The connection is over: free what was still queued for it now
        (an aborted client's replies), and give that memory back."""
        dropped = len(self._chunk or b"") + sum(len(data) for data in self._out)
        self._chunk = None
        self._out.clear()
        _memory.released(dropped)

    # -- output --------------------------------------------------------------------------

    def send(self, obj: Any) -> None:
        if self._closing:
            return
        try:
            data = encode(obj)
        except ValueError as exc:  # a NaN or an infinity in a reply: a daemon bug, never sent
            log.error("reply not encodable as JSON", error=str(exc), kind=obj.get("event", "reply"))
            if "event" in obj:
                return
            data = encode({"id": obj.get("id"), "ok": False, "messages": [], "error": {
                "code": "internal", "message": f"the reply could not be encoded as JSON: {exc}"}})
        self.send_encoded(data)

    def send_encoded(self, *parts: bytes) -> None:
        """Queue one encoded line (newline included), given in parts (a cached
        reply is queued as it is, never copied)."""
        if self._closing:
            return
        # One reply may be large (a long log); what is bounded is what waits
        # behind it for a client that does not read.
        if self.queued > MAX_QUEUED_BYTES:
            self.abort(f"more than {MAX_QUEUED_BYTES} bytes of replies wait for it")
            return
        for data in parts:
            self._send_raw(data)

    def _send_raw(self, data: bytes) -> None:
        if not data:
            return
        self.queued += len(data)
        self._out.append(data)
        self._out_ready.unpark_all()
        self.server.budget.charge(self, len(data))

    @property
    def closing(self) -> bool:
        return self._closing

    def abort(self, reason: str) -> None:
        """Close the connection now; what is queued for it is dropped."""
        if self._closing:
            return
        log.warning("client does not read its replies; disconnecting", reason=reason,
                    queued=self.queued, uid=self.peer_uid, read_only=self.server.read_only)
        self._closing = True
        self.server.budget.release(self.queued)
        self.queued = 0
        self.nursery.cancel_scope.cancel()

    async def _writer(self) -> None:
        # What is left of the reply being sent is always `_chunk`, so that a
        # re-exec hands over exactly the bytes the client has not got.
        # (a plain write, then the bookkeeping, then a checkpoint: trio's own
        # send would checkpoint between the two, and a re-exec there would
        # send those bytes again)
        fd = self.stream.socket.fileno()
        try:
            while True:
                if self._chunk is None:
                    if not self._out:
                        if self._out_closed:
                            return
                        await self._out_ready.park()
                        continue
                    self._chunk = memoryview(self._out.popleft())
                try:
                    n = os.write(fd, self._chunk[:_WRITE_CHUNK])
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(fd)
                    continue
                if self._closing:
                    return
                self._chunk = self._chunk[n:] if n < len(self._chunk) else None
                self.queued -= n
                self.server.budget.release(n)
                self._written.unpark_all()
                await trio.lowlevel.checkpoint()
        except OSError:
            self._closing = True
            self.nursery.cancel_scope.cancel()

    async def flushed(self) -> None:
        """Wait until the client's socket has taken everything queued."""
        while self.queued:
            await self._written.park()

    async def stream_events(self, req: Request, result: Any, kind: str, render: Any, *,
                     backlog: Backlog[Any] | None = None, source: Any = None, service: str | None = None,
                     reply: bool = True, heartbeat: float | None = None) -> None:
        """Reply `result`, then send the events of `backlog` (or of the
        channel `source`, through a backlog of its own) until the client goes.

        The events wait while the client has not read `STREAM_HIGH_WATER`
        bytes; meanwhile they fill the backlog, and what overflows it is sent
        as one ``overflow`` event with the count.  With `heartbeat`, a
        ``heartbeat`` event goes out whenever that many seconds pass with
        nothing sent (unless the client has not read what was sent).
        """
        backlog = backlog if backlog is not None else Backlog()
        with trio.CancelScope() as scope:
            self._streams.add(scope)
            self.stream_info[scope] = (kind, req.id, service, backlog, render, source)
            try:
                await self._stream(req, result, backlog, source, kind, render, heartbeat, reply)
            finally:  # also when the whole connection is cancelled (aborted): a stale entry
                # would make `ControlServer.busy` count one request less than are in flight
                self._streams.discard(scope)
                self.stream_info.pop(scope, None)

    async def _stream(self, req: Request, result: Any, backlog: Backlog[Any], source: Any, kind: str,
                      render: Any, heartbeat: float | None, reply: bool) -> None:
        """The reply, then the events, until cancelled (the client went, or the connection ends)."""
        if reply:
            self.send({"id": req.id, "ok": True, "result": result, "messages": []})
        async with trio.open_nursery() as nursery:
            if source is not None:
                nursery.start_soon(backlog.pump, source)
            while True:
                while self.queued > STREAM_HIGH_WATER:
                    await self._written.park()
                with trio.move_on_after(math.inf if heartbeat is None else heartbeat) as idle:
                    item = await backlog.get()
                if idle.cancelled_caught:
                    if not self.queued:
                        self.send({"event": "heartbeat", "time": time.time()})
                    continue
                if isinstance(item, Overflow):
                    log.debug("client fell behind; events dropped", stream=kind, lost=item.lost,
                              uid=self.peer_uid)
                    self.send({"event": "overflow", "stream": kind, "lost": item.lost})
                else:
                    self.send(render(item))

    def _error(self, req_id: Any, code: str, message: str) -> None:
        self.send({"id": req_id, "ok": False, "error": {"code": code, "message": message}, "messages": []})

    # -- input ---------------------------------------------------------------------------

    def dispatch_buffered(self) -> bool:
        """Dispatch the complete lines in `buf` (unless paused for a re-exec).

        Returns False when the connection must close (a line too long).
        """
        buf = self.buf
        while not self.server.paused and (i := buf.find(b"\n")) >= 0:
            line = bytes(buf[:i])
            del buf[:i + 1]
            if len(line) + 1 > MAX_LINE_BYTES:
                self._error(None, "line-too-long", f"request line longer than {MAX_LINE_BYTES} bytes")
                return False
            if line.strip():
                self._dispatch(line)
        return True

    def handover(self) -> dict[str, Any]:
        """This connection for the next image: its socket, the input not yet
        dispatched, every byte not yet sent (events waiting included), and its
        event streams."""
        pending = bytearray(self._chunk or b"")
        for data in self._out:
            pending += data
        streams = []
        for kind, req_id, service, backlog, render, source in self.stream_info.values():
            if source is not None:
                backlog.take_from(source)
            for item in backlog.drain_nowait():
                event = ({"event": "overflow", "stream": kind, "lost": item.lost}
                         if isinstance(item, Overflow) else render(item))
                pending += encode(event)
            streams.append({"kind": kind, "id": req_id, "service": service})
        return {"fd": self.stream.socket.fileno(), "read-only": self.server.read_only,
                "input": bytes(self.buf).hex(), "output": bytes(pending).hex(), "streams": streams}

    def _subscribe_again(self, stream: dict[str, Any]) -> tuple[dict[str, Any], Any, Any]:
        """Subscribe a handed-over stream again, before any new event is made."""
        context = (self.engine.subscribe() if stream.get("kind") == "state"
                   else self.engine.hub.follow_into(stream.get("service"), Backlog()))
        return stream, context, context.__enter__()

    async def _resume_stream(self, stream: dict[str, Any], context: Any, got: Any) -> None:
        """An event stream handed over by the previous image goes on (no new reply)."""
        req = Request(id=stream.get("id"), action="", service=stream.get("service"))
        try:
            if stream.get("kind") == "state":
                await self.stream_events(req, None, "state", lambda e: e, backlog=got, reply=False,
                                         heartbeat=HEARTBEAT_INTERVAL)
            else:
                await self.stream_events(req, None, "log", lambda line: {"event": "log", **line.to_json()},
                                         backlog=got, service=stream.get("service"), reply=False)
        finally:
            context.__exit__(None, None, None)
            self.in_flight -= 1

    async def _reader(self) -> None:
        buf = self.buf
        line_started: float | None = None  # when the line now in `buf` began
        while True:
            try:
                if line_started is None:
                    data = await self.stream.receive_some(65536)
                else:
                    with trio.move_on_at(line_started + LINE_TIMEOUT) as scope:
                        data = await self.stream.receive_some(65536)
                    if scope.cancelled_caught:
                        self._error(None, "timeout",
                                    f"request line not completed within {LINE_TIMEOUT:g} s; closing")
                        return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            buf += data
            completed = b"\n" in data
            if not self.dispatch_buffered():
                return
            if len(buf) >= MAX_LINE_BYTES and b"\n" not in buf:
                self._error(None, "line-too-long",
                            f"request line longer than {MAX_LINE_BYTES} bytes; closing")
                return
            if not buf or b"\n" in buf:  # nothing, or whole lines waiting out a re-exec
                line_started = None
            elif completed or line_started is None:  # what is left is a new line: its own clock
                line_started = trio.current_time()

    def _dispatch(self, line: bytes) -> None:
        try:
            req = decode_request(line)
        except ProtocolError as exc:
            self._error(getattr(exc, "request_id", None), exc.code, exc.message)
            return
        except Exception as exc:  # never let one bad line take the server down
            log.exception("undecodable request")
            self._error(None, "bad-request", f"cannot decode the request: {type(exc).__name__}")
            return
        if self.in_flight >= MAX_IN_FLIGHT:
            self._error(req.id, "too-many-requests",
                        f"more than {MAX_IN_FLIGHT} requests in flight on this connection")
            return
        self.in_flight += 1
        self.requests.start_soon(self._run_request, req)

    async def _run_request(self, req: Request) -> None:
        messages: list[str] = []
        MESSAGES.set(messages)
        try:
            result = await self._perform(req)
        except ProtocolError as exc:
            reply: dict[str, Any] = {"id": req.id, "ok": False, "error": exc.to_json(), "messages": messages}
        except Exception as exc:  # a bug: answer, log, keep serving
            log.exception("request failed", action=req.action, service=req.service)
            reply = {"id": req.id, "ok": False, "messages": messages,
                     "error": {"code": "internal", "message": f"{type(exc).__name__}: {exc}"}}
        else:
            reply = {"id": req.id, "ok": True, "result": result, "messages": messages}
        finally:
            self.in_flight -= 1
        result = reply.get("result")
        if isinstance(result, Encoded):  # a cached reply: the same bytes for every client
            self.send_encoded(b'{"id":' + dumps(req.id) + b',"ok":true,"result":', result.data,
                              b',"messages":' + dumps(messages) + b"}\n")
        elif result is not STREAMED:
            self.send(reply)

    async def _perform(self, req: Request) -> Any:
        """Run the action through the table (`_actions`), or the service's own.

        Raises:
            ProtocolError: ``read-only`` for an action that is not read-only on
                the read-only socket, ``unknown-action``, or the action's error.
        """
        action = find_action(req.action, req.service)
        if action is not None:
            if self.server.read_only and not action.read_only:
                raise _refused(req)
            return await action.handler(self, req, action.args(req))
        if req.service is None:
            raise ProtocolError("unknown-action", f"unknown action {req.action!r}")
        custom = self.engine.action(req.service, req.action)
        if self.server.read_only and not custom.read_only:
            raise _refused(req)
        return await self.engine.custom_action(req.service, req.action, req.args)


def _refused(req: Request) -> ProtocolError:
    what = f"{req.action!r}" + (f" on {req.service!r}" if req.service else "")
    return ProtocolError("read-only", f"{what} changes something; it is not allowed on the read-only socket")
