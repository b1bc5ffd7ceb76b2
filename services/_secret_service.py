"""The host side of Guix's secret-service protocol (``gnu/build/secret-service.scm``).

The guest listens on TCP port 1004 (forwarded by QEMU to a host port).  The
host connects, the guest says hello, the host sends every file under a
directory, with its mode, and closes.  Byte by byte (``docs/service-hurd-vm.md``):

* guest → host, right after accepting: ``(secret-service-server (version 0))``
  (Guile ``write``: no length prefix, no newline);
* host → guest: ``(secrets (version 0) (files (("/NAME" SIZE MODE) ...)))``,
  NAME relative to the secret root (so it starts with ``/``), SIZE in bytes,
  MODE the whole ``st_mode`` in decimal, files sorted by path; then, with no
  separator, the raw contents of each file in the same order; then close.

Connecting is retried (Guix: 60 retries, 1 s apart) while it is refused;
the hello must come within the handshake timeout (Guix: 180 s).  One
deviation, documented: QEMU's user-mode network accepts a connection on the
host at once, then retries reaching the guest with a growing back-off (or
closes it when the guest refuses).  So while no hello has come, the host opens
one more connection now and then; the guest accepts one of them and says
hello on it, and the others are closed unused.  The bytes on the wire of the
connection used are exactly Guix's.  Anything that is not the hello fails.

The secrets go only to the process that should get them (QEMU, whose pid the
caller gives): any local user could listen on the forward port first.  Before
each connection, whatever listens on the port must be that process's socket;
before the files are sent, the socket that accepted the connection used must
be one of its descriptors (``services/_socket_owner.py``).  Otherwise nothing
is sent and the error names the holder.

Everything here is async (Trio) and never blocks the event loop: file reads
run in a worker thread.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from supervisor import run_in_thread

from . import _socket_owner as owner

__all__ = [
    "GUEST_PORT",
    "HELLO",
    "SecretFile",
    "SecretServiceError",
    "SexpError",
    "Symbol",
    "collect",
    "guile_string",
    "payload_header",
    "read_datum",
    "send_secrets",
    "valid_hello",
]

#: The guest's port (``secret-service-operating-system`` default).
GUEST_PORT = 1004
#: What a Guix guest writes first (``(write '(secret-service-server (version 0)))``).
HELLO = b"(secret-service-server (version 0))"
#: A hello longer than this is not a hello.
MAX_HELLO = 64 * 1024


class SecretServiceError(Exception):
    """Sending failed; the message says where and why."""


class SexpError(ValueError):
    """Bytes that are not one S-expression (as far as this small reader goes)."""


class Symbol(str):
    """A Scheme symbol (a `str` subclass, to tell it from a string)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Symbol({str(self)!r})"


class _Incomplete(Exception):
    pass


_DELIMITERS = b" \t\n\r\f\v()\";"


def read_datum(data: bytes, *, eof: bool = False) -> tuple[Any, int]:
    """Read one S-expression from the start of `data`: (datum, bytes consumed).

    Lists → Python lists, strings → `str`, integers → `int`, ``#t``/``#f`` →
    bools, anything else → `Symbol`.  Leading whitespace and ``;`` comments
    are skipped.

    Raises:
        _Incomplete: more bytes are needed (only when not `eof`).
        SexpError: not an S-expression (or end of stream inside one).
    """
    pos, value = _read(data, 0, eof)
    return value, pos


def _skip(data: bytes, pos: int) -> int:
    while pos < len(data):
        c = data[pos]
        if c in b" \t\n\r\f\v":
            pos += 1
        elif c == ord(";"):
            end = data.find(b"\n", pos)
            if end < 0:
                return len(data)
            pos = end + 1
        else:
            break
    return pos


def _need_more(eof: bool, what: str) -> None:
    if eof:
        raise SexpError(f"end of stream inside {what}")
    raise _Incomplete


def _read(data: bytes, pos: int, eof: bool) -> tuple[int, Any]:
    pos = _skip(data, pos)
    if pos >= len(data):
        _need_more(eof, "a datum")
    c = data[pos]
    if c == ord("("):
        items: list[Any] = []
        pos += 1
        while True:
            pos = _skip(data, pos)
            if pos >= len(data):
                _need_more(eof, "a list")
            if data[pos] == ord(")"):
                return pos + 1, items
            pos, item = _read(data, pos, eof)
            items.append(item)
    if c == ord(")"):
        raise SexpError(f"unexpected ')' at byte {pos}")
    if c == ord('"'):
        return _read_string(data, pos + 1, eof)
    end = pos
    while end < len(data) and data[end] not in _DELIMITERS:
        end += 1
    if end >= len(data) and not eof:
        raise _Incomplete  # the token may go on
    token = data[pos:end].decode("utf-8", "surrogateescape")
    if token == "#t" or token == "#true":
        return end, True
    if token == "#f" or token == "#false":
        return end, False
    try:
        return end, int(token, 10)
    except ValueError:
        return end, Symbol(token)


_ESCAPES = {ord("n"): "\n", ord("t"): "\t", ord("r"): "\r", ord("a"): "\a", ord("b"): "\b",
            ord("f"): "\f", ord("v"): "\v", ord("0"): "\0", ord("\\"): "\\", ord('"'): '"'}


def _read_string(data: bytes, pos: int, eof: bool) -> tuple[int, str]:
    out = bytearray()
    while True:
        if pos >= len(data):
            _need_more(eof, "a string")
        c = data[pos]
        if c == ord('"'):
            return pos + 1, out.decode("utf-8", "surrogateescape")
        if c != ord("\\"):
            out.append(c)
            pos += 1
            continue
        if pos + 1 >= len(data):
            _need_more(eof, "a string")
        e = data[pos + 1]
        if e in _ESCAPES:
            out += _ESCAPES[e].encode()
            pos += 2
        elif e == ord("x"):  # R7RS/Guile: \xHH; (a code point in hex, ';'-terminated)
            end = data.find(b";", pos + 2)
            if end < 0:
                _need_more(eof, "a string escape")
            try:
                out += chr(int(data[pos + 2:end], 16)).encode("utf-8", "surrogateescape")
            except ValueError:
                raise SexpError(f"bad string escape {data[pos:end + 1]!r}") from None
            pos = end + 1
        else:
            raise SexpError(f"unknown string escape {data[pos:pos + 2]!r}")


def guile_string(text: str) -> str:
    r"""`text` as Guile's ``write`` prints a string: ``\\`` and ``\"`` escaped,
    ``\n``, ``\t``, ``\r`` by name, other control characters as ``\xHH;``."""
    out = ['"']
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):x};")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def valid_hello(datum: Any) -> bool:
    """Guix's match: ``('secret-service-server ('version version ...))``."""
    return (isinstance(datum, list) and len(datum) == 2
            and isinstance(datum[0], Symbol) and datum[0] == "secret-service-server"
            and isinstance(datum[1], list) and len(datum[1]) >= 1
            and isinstance(datum[1][0], Symbol) and datum[1][0] == "version")


def _write_datum(value: Any) -> str:
    if isinstance(value, Symbol):
        return str(value)
    if isinstance(value, bool):
        return "#t" if value else "#f"
    if isinstance(value, str):
        return guile_string(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "(" + " ".join(_write_datum(v) for v in value) + ")"
    raise TypeError(f"cannot write {value!r}")


@dataclass(frozen=True, slots=True)
class SecretFile:
    """One file to send: NAME (relative to the root, leading ``/``), its mode and bytes."""

    name: str
    path: str
    mode: int
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)


def payload_header(files: list[SecretFile]) -> bytes:
    """``(secrets (version 0) (files ((NAME SIZE MODE) ...)))`` as Guile writes it."""
    datum = [Symbol("secrets"), [Symbol("version"), 0],
             [Symbol("files"), [[f.name, f.size, f.mode] for f in files]]]
    return _write_datum(datum).encode("utf-8", "surrogateescape")


def collect(root: str) -> list[SecretFile]:
    """Every non-directory under `root`, recursively, symlinks not followed while
    walking, sorted by path (Guix's ``find-files``); mode (``stat``, following
    symlinks, like the size) and contents read now.  A missing `root` gives no
    files (Guix prints an error and sends an empty list).

    Raises:
        SecretServiceError: a file could not be read (named).
    """
    root = root.rstrip("/") or "/"
    if not os.path.isdir(root):
        return []
    paths: list[str] = []

    def walk(d: str) -> None:
        try:
            entries = list(os.scandir(d))
        except OSError as exc:
            raise SecretServiceError(f"cannot list {d}: {exc.strerror}") from None
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                walk(e.path)
            else:
                paths.append(e.path)

    walk(root)
    paths.sort()
    out = []
    for path in paths:
        try:
            st = os.stat(path)
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise SecretServiceError(f"cannot read secret {path}: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise SecretServiceError(f"secret {path} is not a regular file")
        name = path[len(root):] if root != "/" else path
        out.append(SecretFile(name=name, path=path, mode=st.st_mode, data=data))
    return out


Log = Callable[[str], None]


async def _verified(check: Callable[..., None], *args: Any) -> None:
    """Run one of `owner`'s checks in a worker thread.

    Raises:
        SecretServiceError: the check failed (its message says why).
    """
    try:
        await run_in_thread(check, *args)
    except owner.RecipientError as exc:
        raise SecretServiceError(str(exc)) from None


async def _open(host: str, port: int, pid: int) -> trio.SocketStream:
    """Connect, after checking who listens.

    Raises:
        SecretServiceError: the listener is not `pid`'s.
        OSError: connecting failed.
    """
    await _verified(owner.check_listener, host, port, pid)
    return await trio.open_tcp_stream(host, port)


async def _connect(host: str, port: int, pid: int, retries: int, delay: float, log: Log,
                   attempt: list[int]) -> trio.SocketStream:
    while True:
        attempt[0] += 1
        try:
            return await _open(host, port, pid)
        except OSError as exc:
            left = retries + 1 - attempt[0]
            if left <= 0:
                raise SecretServiceError(
                    f"cannot connect to {host}:{port} after {retries + 1} attempts: "
                    f"{exc.strerror or exc}") from None
            log(f"retrying connection [{left} attempts left]")
            await trio.sleep(delay)


async def _read_hello(stream: trio.SocketStream) -> tuple[str, bytes, Any]:
    """("eof", b"", None): closed before any byte; ("hello", buf, datum): one datum
    read (valid or not); raises SexpError/SecretServiceError for garbage."""
    buf = b""
    while True:
        try:
            chunk = await stream.receive_some(4096)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            chunk = b""
        if not chunk and not buf:
            return "eof", b"", None
        buf += chunk
        try:
            datum, _ = read_datum(buf, eof=not chunk)
            return "hello", buf, datum
        except _Incomplete:
            if len(buf) > MAX_HELLO:
                raise SexpError(f"{len(buf)} bytes and no complete datum") from None


async def send_secrets(host: str, port: int, root: str, *, recipient_pid: int, retries: int = 60,
                       retry_delay: float = 1.0, handshake_timeout: float = 180.0,
                       reconnect_interval: float = 1.0, log: Log | None = None) -> list[SecretFile]:
    """Send the files under `root` to the secret service at `host`:`port`,
    served by process `recipient_pid` (QEMU, which forwards the port).

    Connecting is retried `retries` times, `retry_delay` apart, while refused.
    Then the hello must come within `handshake_timeout`.  While it has not
    come, one more connection is opened now and then (`reconnect_interval`,
    growing to 10 s): QEMU's user network accepts on the host at once but
    retries the connection to the guest with a growing back-off, so a guest
    that starts listening later would be reached late; a fresh connection
    reaches it at once.  The guest accepts one of them and says hello on it;
    the others are closed.  Before each connection, whatever listens on the
    port must be `recipient_pid`'s; before the files are sent, the accepting
    end of the connection used must be too (``_socket_owner.check_*``).
    Returns the files sent.  Cancellation (a stop) closes every connection.

    Raises:
        SecretServiceError: no connection, another process on the port (named;
            nothing is sent), no hello in time, a wrong hello, or an I/O
            error while sending.
    """
    say = log or (lambda _msg: None)
    where = f"{host}:{port}"
    say(f"sending secrets to {where}")
    attempt = [0]
    first = await _connect(host, port, recipient_pid, retries, retry_delay, say, attempt)
    say("connected; waiting for handshake...")
    streams = [first]
    winner: tuple[trio.SocketStream, Any] | None = None
    failure: str | None = None
    dropped = 0
    try:
        with trio.move_on_after(handshake_timeout):
            async with trio.open_nursery() as nursery:

                async def watch(stream: trio.SocketStream) -> None:
                    nonlocal winner, failure, dropped
                    try:
                        kind, buf, datum = await _read_hello(stream)
                    except SexpError as exc:
                        failure = f"invalid handshake from {where}: {exc}"
                        nursery.cancel_scope.cancel()
                        return
                    if kind == "eof":
                        dropped += 1  # nothing listened in the guest yet
                        return
                    if not valid_hello(datum):
                        failure = f"invalid handshake from {where}: {buf[:200]!r}"
                    elif winner is None:
                        winner = (stream, datum)
                    nursery.cancel_scope.cancel()

                async def reconnect() -> None:
                    nonlocal failure
                    interval = reconnect_interval
                    while True:
                        await trio.sleep(interval)
                        interval = min(interval * 1.5, 10.0)
                        try:
                            stream = await _open(host, port, recipient_pid)
                        except SecretServiceError as exc:
                            failure = str(exc)
                            nursery.cancel_scope.cancel()
                            return
                        except OSError:
                            continue
                        streams.append(stream)
                        nursery.start_soon(watch, stream)

                nursery.start_soon(watch, first)
                nursery.start_soon(reconnect)
        if failure is not None:
            raise SecretServiceError(failure)
        if winner is None:
            raise SecretServiceError(
                f"timeout while waiting for the handshake from {where} ({handshake_timeout:g} s; the guest's "
                f"secret service never answered; {len(streams)} connections, {dropped} closed by the other end)")
        stream = winner[0]
        for other in streams:
            if other is not stream:
                await other.aclose()
        await _verified(owner.check_peer, stream.socket, recipient_pid)
        say(f"sending files from {root!r}...")
        files = await run_in_thread(collect, root)
        try:
            await stream.send_all(payload_header(files) + b"".join(f.data for f in files))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise SecretServiceError(f"sending files to {where} failed: {exc}") from None
        say(f"done sending files to {where}")
        return files
    finally:
        with trio.CancelScope(shield=True):
            for stream in streams:
                await stream.aclose()
