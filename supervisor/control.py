"""The control sockets: newline-delimited JSON, one task per connection.

Each connection has a reader (bounded line size; a line once begun must be
completed in `LINE_TIMEOUT`), a writer draining a bounded queue (a client
that does not read its replies is dropped once `MAX_QUEUED_BYTES` wait for
it), and one task per request, so several requests are in flight at once and
a slow `stop` never delays a `status`.  The read-only socket refuses every
action that changes something, whoever asks.
"""

from __future__ import annotations

import errno
import grp
import math
import os
import socket
import stat
from pathlib import Path
from typing import Any, Final

import structlog
import trio

from herd.protocol import (
    LINE_TIMEOUT,
    MAX_CLIENTS,
    MAX_IN_FLIGHT,
    MAX_LINE_BYTES,
    MAX_LOG_LINES,
    MAX_QUEUED_BYTES,
    PROTOCOL_VERSION,
    READ_ACTIONS,
    WRITE_ACTIONS,
    ProtocolError,
    Request,
    decode_request,
    encode,
)

from . import __version__
from ._accept import serve_clients
from .engine import MESSAGES, Engine, say

__all__ = ["ControlServer", "bind_unix_socket", "prepare_socket_dir", "SocketInUse"]

log = structlog.get_logger("supervisor.control")



class SocketInUse(Exception):
    """Another supervisor already answers on this socket path."""


def _gid(group: str | int) -> int:
    if isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"group {group!r} does not exist") from None


def bind_unix_socket(path: Path, *, group: str | int | None) -> trio.socket.SocketType:
    """Create a listening Unix socket: mode 0600, or 0660 owned by `group`.

    A stale socket file is replaced; a live one is not.

    Raises:
        SocketInUse: another process accepts connections there.
        ValueError: `group` does not exist.
        OSError: the path cannot be created.
    """
    gid = _gid(group) if group is not None else None
    prepare_socket_dir(path.parent)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(0.5)
        try:
            probe.connect(str(path))
        except OSError:
            os.unlink(path)  # stale: nobody listens
        else:
            raise SocketInUse(f"another supervisor is listening on {path}")
        finally:
            probe.close()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock._sock.bind(str(path))  # bind is instant for AF_UNIX; keep the umask window tiny
    finally:
        os.umask(old)
    if gid is not None:
        os.chown(path, -1, gid)
        os.chmod(path, 0o660)
    else:
        os.chmod(path, 0o600)
    sock.listen(128)
    return sock


def prepare_socket_dir(directory: Path) -> None:
    """Create a socket directory (0755 as root, else 0700), or check the one there.

    Raises:
        OSError: see `check_socket_dir`.
    """
    directory.mkdir(parents=True, exist_ok=True, mode=0o755 if os.getuid() == 0 else 0o700)
    check_socket_dir(directory)


def check_socket_dir(directory: Path) -> None:
    """Refuse a socket directory someone else could tamper with.

    It must be a real directory owned by us or root, and not writable by
    group or others unless it has the sticky bit (like /tmp).

    Raises:
        OSError: naming the directory and what is wrong with it.
    """
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(errno.ENOTDIR, f"socket directory {directory} is not a directory (a symlink?)")
    if st.st_uid not in (0, os.getuid()):
        raise OSError(errno.EPERM, f"socket directory {directory} belongs to uid {st.st_uid}, not to us")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise OSError(errno.EPERM, f"socket directory {directory} is writable by others "
                                   f"(mode {stat.S_IMODE(st.st_mode):04o}); refusing")


class ControlServer:
    """Serves one socket (read-write or read-only) for an engine."""

    def __init__(self, engine: Engine, sock: trio.socket.SocketType, *, read_only: bool,
                 path: Path, on_reexec: Any = None) -> None:
        self.engine = engine
        self.sock = sock
        self.read_only = read_only
        self.path = path
        self.clients = 0
        self.reexec = on_reexec  # supervisor.cli.Reexec or None

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await serve_clients(self._handle, self.sock, task_status=task_status)
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
        self.clients += 1
        try:
            await _Connection(self, stream).run()
        finally:
            self.clients -= 1
            await trio.aclose_forcefully(stream)


class _Connection:
    def __init__(self, server: ControlServer, stream: trio.SocketStream) -> None:
        self.server = server
        self.engine = server.engine
        self.stream = stream
        self.queued = 0
        self.in_flight = 0
        self._out_send, self._out_recv = trio.open_memory_channel[bytes](math.inf)
        self._streams: set[trio.CancelScope] = set()  # subscriptions, log follows
        self._closing = False

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self._writer)
            self.send({"hello": "supervisor", "protocol": PROTOCOL_VERSION, "version": __version__,
                       "read-only": self.server.read_only})
            async with trio.open_nursery() as requests:
                self.requests = requests
                await self._reader()
                for scope in list(self._streams):  # the client is gone: end its streams
                    scope.cancel()
            self._out_send.close()  # the writer flushes what is queued, then ends

    # -- output --------------------------------------------------------------------------

    def send(self, obj: Any) -> None:
        if self._closing:
            return
        data = encode(obj)
        # One reply may be large (a long log); what is bounded is what waits
        # behind it for a client that does not read.
        if self.queued > MAX_QUEUED_BYTES:
            log.warning("client does not read its replies; disconnecting", queued=self.queued)
            self._abort()
            return
        self.queued += len(data)
        self._out_send.send_nowait(data)

    def _abort(self) -> None:
        self._closing = True
        self.nursery.cancel_scope.cancel()

    async def _writer(self) -> None:
        try:
            async for data in self._out_recv:
                await self.stream.send_all(data)
                self.queued -= len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._abort()

    def _error(self, req_id: Any, code: str, message: str) -> None:
        self.send({"id": req_id, "ok": False, "error": {"code": code, "message": message}, "messages": []})

    # -- input ---------------------------------------------------------------------------

    async def _reader(self) -> None:
        buf = bytearray()
        line_started: float | None = None
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
            while (i := buf.find(b"\n")) >= 0:
                line = bytes(buf[:i])
                del buf[:i + 1]
                if len(line) + 1 > MAX_LINE_BYTES:
                    self._error(None, "line-too-long", f"request line longer than {MAX_LINE_BYTES} bytes")
                    return
                if line.strip():
                    self._dispatch(line)
            if len(buf) >= MAX_LINE_BYTES:
                self._error(None, "line-too-long",
                            f"request line longer than {MAX_LINE_BYTES} bytes; closing")
                return
            line_started = (line_started or trio.current_time()) if buf else None

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
        if reply.get("result") is not _STREAMED:
            self.send(reply)

    # -- actions -------------------------------------------------------------------------

    async def _perform(self, req: Request) -> Any:
        action, name, args = req.action, req.service, req.args
        engine = self.engine
        if self.server.read_only and action not in READ_ACTIONS:
            custom = engine.lookup(name).spec.action(action) if name and engine.graph.resolve(name) else None
            if action in WRITE_ACTIONS or (custom is not None and not custom.read_only):
                raise ProtocolError("read-only", f"{action!r} is not allowed on the read-only socket")
        if action == "ping":
            return engine.ping()
        if action == "status":
            if name is None or name == "root":
                _no_args(req)
                return engine.status()
            return engine.status(name, log_lines=_count_arg(req, 10))
        if action == "detailed-status":
            return engine.detailed_status(_count_arg(req, 10))
        if action == "doc":
            return engine.doc(name, args)  # type: ignore[arg-type]
        if action == "graph":
            _no_args(req)
            return engine.graph_dot()
        if action == "log":
            return await self._log(req)
        if action == "subscribe":
            _no_args(req)
            return await self._subscribe(req)
        if name == "root" and action in ("stop", "power-off", "reboot", "halt"):
            _no_args(req)
            if self.server.reexec is None:
                raise ProtocolError("unsupported", f"{action!r} root is not available here")
            how = "exit" if action == "stop" else action
            if how != "exit" and os.getpid() != 1:
                raise ProtocolError("action-failed", f"{action!r} needs the supervisor to be PID 1")
            self.server.reexec.request_shutdown(how)
            say("Stopping every service; the supervisor then exits."
                if how == "exit" else f"Stopping every service, then {action}.")
            return {"shutdown": how}
        if action in ("start", "stop", "restart", "enable", "disable"):
            _no_args(req)
            if action == "start":
                return await engine.start(name)  # type: ignore[arg-type]
            if action == "stop":
                return await engine.stop(name)  # type: ignore[arg-type]
            if action == "restart":
                return await engine.restart(name)  # type: ignore[arg-type]
            return await engine.set_enabled(name, action == "enable")  # type: ignore[arg-type]
        if action == "reload" and (name is None or name == "root"):
            if len(args) > 1 or (args and not (isinstance(args[0], str) and args[0].startswith("/"))):
                raise ProtocolError("bad-arguments", "usage: reload root [ABSOLUTE-FILE]")
            return await engine.reload(Path(args[0]) if args else None)
        if action == "reexec" and (name is None or name == "root"):
            _no_args(req)
            if self.server.reexec is None:
                raise ProtocolError("unsupported", "re-exec is not available here")
            await self.server.reexec.prepare()
            say_ = "Re-executing the supervisor; every service keeps running."
            self.send({"id": req.id, "ok": True, "result": {"reexec": True}, "messages": [say_]})
            with trio.move_on_after(1):  # let the reply reach the client first
                while self.queued:
                    await trio.sleep(0.005)
            self.server.reexec.execute()
            return _STREAMED
        if name is None:
            raise ProtocolError("unknown-action", f"unknown action {action!r}")
        return await engine.custom_action(name, action, args)

    async def _log(self, req: Request) -> Any:
        args = list(req.args)
        follow = False
        if args and args[-1] == "follow":
            follow = True
            args.pop()
        n = _count_arg(Request(req.id, req.action, req.service, args), 10)
        if req.service:
            service = self.engine.lookup(req.service)
            lines = service.recent_log(n)
            name: str | None = service.name
        else:
            lines = self.engine.hub.recent(n)
            name = None
        result = {"lines": [line.to_json() for line in lines]}
        if not follow:
            return result
        with self.engine.hub.follow(name) as recv, trio.CancelScope() as scope:
            self._streams.add(scope)
            self.send({"id": req.id, "ok": True, "result": result, "messages": []})
            async for line in recv:
                self.send({"event": "log", **line.to_json()})
        self._streams.discard(scope)
        return _STREAMED

    async def _subscribe(self, req: Request) -> object:
        with self.engine.subscribe() as recv, trio.CancelScope() as scope:
            self._streams.add(scope)
            self.send({"id": req.id, "ok": True, "result": {"subscribed": True}, "messages": []})
            async for event in recv:
                self.send(event)
        self._streams.discard(scope)
        return _STREAMED


#: Returned by actions whose reply was sent before their event stream began.
_STREAMED: Final = object()


def _no_args(req: Request) -> None:
    if req.args:
        raise ProtocolError("bad-arguments", f"{req.action!r} takes no arguments, got {req.args!r}")


def _count_arg(req: Request, default: int) -> int:
    if not req.args:
        return default
    if len(req.args) == 1:
        value = req.args[0]
        if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 9:
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_LOG_LINES:
            return value
    raise ProtocolError("bad-arguments",
                        f"{req.action!r} takes at most one argument, a line count 0-{MAX_LOG_LINES}; "
                        f"got {req.args!r}")
