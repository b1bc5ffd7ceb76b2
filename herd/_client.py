"""A blocking client for the control socket (standard library only).

:class:`Connection` connects, checks the server's hello line and reads
newline-delimited JSON objects.  :func:`exchange` pipelines requests on one
connection and yields the replies in request order, matched by ``id``.
"""

from __future__ import annotations

# `_socket` and `herd._json`, not `socket` and `json`: those two modules
# import `re`, `enum` and `selectors`, as long as the interpreter's own start.
from _socket import AF_UNIX, SOCK_STREAM
from _socket import socket as _Socket

from herd._json import dumps, loads
from herd.protocol import (
    ERROR_CODES,
    EXIT_FAILED,
    EXIT_UNREACHABLE,
    PROTOCOL_VERSION,
    MAX_IN_FLIGHT,
    exit_code_for,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from typing import Any, Final

__all__ = [
    "CONNECT_TIMEOUT",
    "MAX_IN_FLIGHT",
    "HerdError",
    "Unreachable",
    "ServerError",
    "Connection",
    "exchange",
    "next_object",
]

#: Seconds allowed for connecting and receiving the hello line.  Replies
#: have no timeout: a ``stop`` may wait for a stop-timeout, a ``start`` for
#: readiness.
CONNECT_TIMEOUT: Final = 10.0

_RECV_SIZE: Final = 65536


class HerdError(Exception):
    """An error that ends ``herd``: the message goes to stderr."""

    def __init__(self, message: str, exit_status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.exit_status = exit_status


class Unreachable(HerdError):
    """No daemon answers on the socket (exit status 3)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_UNREACHABLE)


class ServerError(HerdError):
    """An error object the server sent outside any reply (e.g. ``too-many-clients``)."""

    def __init__(self, error: dict[str, Any]) -> None:
        code = str(error.get("code", "internal"))
        message = str(error.get("message") or ERROR_CODES.get(code, (0, code))[1])
        super().__init__(message, exit_code_for(code))
        self.error = error


def next_object(buf: bytearray) -> dict[str, Any] | None:
    """Take the first complete line off ``buf`` and decode it; None until a line is complete.

    Blank lines are skipped.

    Raises:
        ValueError: the line is not a JSON object (the message shows its start).
    """
    while True:
        nl = buf.find(b"\n")
        if nl < 0:
            return None
        line = bytes(buf[:nl])
        del buf[: nl + 1]
        if not line.strip():
            continue
        try:
            obj = loads(line)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            raise ValueError(f"{line[:80]!r}")
        return obj


def _error_object(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The ``error`` of an error reply, or None."""
    error = obj.get("error")
    if obj.get("ok") is False and isinstance(error, dict):
        return error
    return None


class Connection:
    """One connection to the control socket.

    Use :meth:`open`; the server's hello object is in :attr:`hello`.
    """

    def __init__(self, path: str, sock: _Socket) -> None:
        self.path = path
        self.hello: dict[str, Any] = {}
        self._sock = sock
        self._buf = bytearray()

    @classmethod
    def open(cls, path: str, *, timeout: float = CONNECT_TIMEOUT) -> Connection:
        """Connect to ``path`` and read the hello line.

        Raises:
            Unreachable: nothing listens there, or it is not a supervisor.
            ServerError: the server refused the connection (``too-many-clients``).
            HerdError: the server speaks another protocol version.
        """
        sock = _Socket(AF_UNIX, SOCK_STREAM)
        conn = cls(path, sock)
        try:
            sock.settimeout(timeout)
            try:
                sock.connect(path)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise Unreachable(f"cannot connect to {path}: {exc.strerror}; is the supervisor running?") from None
            except PermissionError as exc:
                raise Unreachable(
                    f"cannot connect to {path}: {exc.strerror}; the control socket is for root and the "
                    "members of the group named by 'socket-group' in the [supervisor] table "
                    "(the status socket serves read actions to the group 'status-socket-group')") from None
            except TimeoutError:
                raise Unreachable(f"cannot connect to {path}: timed out") from None
            except OSError as exc:
                raise Unreachable(f"cannot connect to {path}: {exc.strerror or exc}") from None
            conn.hello = conn._read_hello()
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        return conn

    def _read_hello(self) -> dict[str, Any]:
        try:
            obj = self.read()
        except TimeoutError:
            raise Unreachable(f"no greeting from {self.path}: timed out") from None
        except Unreachable as exc:
            raise Unreachable(f"no greeting from {self.path}: {exc.message}") from None
        except HerdError:
            raise Unreachable(f"{self.path} does not speak the supervisor protocol") from None
        if "hello" not in obj:
            error = _error_object(obj)
            if error is not None:
                raise ServerError(error)
            raise Unreachable(f"{self.path} does not speak the supervisor protocol")
        if obj.get("protocol") != PROTOCOL_VERSION:
            raise HerdError(
                f"the supervisor at {self.path} speaks protocol {obj.get('protocol')!r}; "
                f"this herd speaks protocol {PROTOCOL_VERSION}"
            )
        return obj

    def close(self) -> None:
        """Close the connection."""
        self._sock.close()

    def settimeout(self, seconds: float | None) -> None:
        """Bound every later read (None: wait as long as it takes)."""
        self._sock.settimeout(seconds)

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def send(self, requests: Sequence[dict[str, Any]]) -> None:
        """Send request objects, all in one write.

        Raises:
            Unreachable: the connection is gone.
        """
        data = "".join(dumps(r) + "\n" for r in requests).encode("utf-8", "backslashreplace")
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise Unreachable(f"lost the connection to {self.path}: {exc.strerror or exc}") from None

    def read(self) -> dict[str, Any]:
        """The next JSON object from the server (blocking).

        Raises:
            Unreachable: the server closed the connection or it broke.
            HerdError: the server sent something that is not a JSON object.
        """
        while True:
            try:
                obj = next_object(self._buf)
            except ValueError as exc:
                raise HerdError(f"garbled line from {self.path}: {exc}") from None
            if obj is not None:
                return obj
            try:
                chunk = self._sock.recv(_RECV_SIZE)
            except TimeoutError:
                raise
            except OSError as exc:
                raise Unreachable(f"lost the connection to {self.path}: {exc.strerror or exc}") from None
            if not chunk:
                raise Unreachable(f"the supervisor at {self.path} closed the connection")
            self._buf += chunk

    def salvage_error(self, timeout: float = 1.0) -> dict[str, Any] | None:
        """After a failed send: an error object the server sent before closing, if any."""
        try:
            self._sock.settimeout(timeout)
            while True:
                error = _error_object(self.read())
                if error is not None:
                    return error
        except (HerdError, OSError):
            return None


def exchange(
    conn: Connection,
    requests: Sequence[dict[str, Any]],
    *,
    window: int = MAX_IN_FLIGHT,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Send ``requests`` pipelined and yield their replies in request order.

    Each request must carry a distinct ``id``.  At most ``window`` requests
    are in flight at once; the first batch goes out in one write.  Event
    objects (with an ``"event"`` key) are passed to ``on_event`` or dropped.

    Raises:
        Unreachable: the connection dropped before every reply arrived.
        ServerError: the server sent an error that answers no request
            (e.g. ``line-too-long`` before closing).
    """
    index_of = {req["id"]: i for i, req in enumerate(requests)}
    replies: dict[int, dict[str, Any]] = {}
    sent = received = yielded = 0
    while yielded < len(requests):
        room = window - (sent - received)
        if sent < len(requests) and room > 0:
            batch = requests[sent : sent + room]
            try:
                conn.send(batch)
            except Unreachable:
                error = conn.salvage_error()
                if error is not None:
                    raise ServerError(error) from None
                raise
            sent += len(batch)
        while yielded in replies:
            yield replies.pop(yielded)
            yielded += 1
        if yielded >= len(requests):
            break
        try:
            obj = conn.read()
        except Unreachable:
            raise Unreachable(f"the supervisor at {conn.path} closed the connection before replying") from None
        if "event" in obj:
            if on_event is not None:
                on_event(obj)
            continue
        index = index_of.get(obj.get("id"))
        if index is None or index in replies or index < yielded:
            error = _error_object(obj)
            if error is not None and obj.get("id") is None:
                raise ServerError(error)
            continue
        replies[index] = obj
        received += 1
