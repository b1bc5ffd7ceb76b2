"""Connections to supervisors: a local Unix socket, or a remote one through ssh.

A remote supervisor is reached exactly as ``herd --host`` reaches it
(:mod:`herd._remote`): ``ssh -- HOST`` runs a constant bridge that copies
bytes between the ssh channel and the remote socket, whose path it reads from
the channel's first line.
"""

from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import dataclass
from typing import Any, Final

import trio

from herd._client import next_object
from herd._remote import Host, bridge_error, ssh_argv
from herd.protocol import MAX_LINE_BYTES, PROTOCOL_VERSION, encode

__all__ = ["SourceError", "Target", "Link", "open_link"]

#: Seconds allowed to connect (and log in, through ssh) and read the hello.
CONNECT_TIMEOUT: Final = 20.0


class SourceError(Exception):
    """The supervisor cannot be reached, or broke the protocol; the message says which."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where a supervisor listens: ``path`` here, or ``path`` on ``host`` through ssh."""

    label: str
    path: str
    host: Host | None = None


class Link:
    """One newline-JSON connection to a supervisor."""

    def __init__(self, target: Target, stream: trio.abc.Stream, process: trio.Process | None = None,
                 stderr: Any = None) -> None:
        self.target = target
        self.stream = stream
        self.hello: dict[str, Any] = {}
        self._process = process
        self._stderr = stderr
        self._buf = bytearray()
        self._next_id = 0

    def next_id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def send(self, action: str, service: str | None = None, args: list[Any] | None = None) -> int:
        """Send one request; its id.

        Raises:
            SourceError: the connection is gone.
        """
        req_id = self.next_id()
        try:
            await self.stream.send_all(encode({"id": req_id, "action": action, "service": service,
                                               "args": args or []}))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise SourceError(f"{self.target.label}: lost the connection ({exc})") from None
        return req_id

    async def read(self) -> dict[str, Any]:
        """The next JSON object from the supervisor.

        Raises:
            SourceError: the connection closed or broke, or a line is not a JSON object.
        """
        while True:
            try:
                obj = next_object(self._buf)
            except ValueError as exc:
                raise SourceError(f"{self.target.label}: garbled line {exc}") from None
            if obj is not None:
                return obj
            if len(self._buf) > 64 * MAX_LINE_BYTES:
                raise SourceError(f"{self.target.label}: a line longer than {64 * MAX_LINE_BYTES} bytes")
            try:
                chunk = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise SourceError(await self._closed_reason(f"lost the connection ({exc})")) from None
            if not chunk:
                raise SourceError(await self._closed_reason(f"the supervisor at {self.target.path} "
                                                            "closed the connection"))
            self._buf += chunk

    async def _closed_reason(self, local: str) -> str:
        """Why the connection ended: ``local`` here; for ssh, what ssh or the bridge said."""
        if self._process is None or self.target.host is None:
            return f"{self.target.label}: {local}"
        with trio.move_on_after(5):
            await self._process.wait()
        self._stderr.seek(0)
        text = self._stderr.read(65536).decode("utf-8", "replace")
        return bridge_error(self.target.host, self.target.path, self._process.returncode, text,
                            f"{self.target.label}: {local}")

    async def greet(self) -> dict[str, Any]:
        """Read and check the hello.

        Raises:
            SourceError: no hello, an error instead (``too-many-clients``), another protocol.
        """
        hello = await self.read()
        if "hello" not in hello:
            error = hello.get("error") if isinstance(hello.get("error"), dict) else {}
            raise SourceError(f"{self.target.label}: refused: {error.get('message') or hello}")
        if hello.get("protocol") != PROTOCOL_VERSION:
            raise SourceError(f"{self.target.label}: speaks protocol {hello.get('protocol')!r}, "
                              f"not {PROTOCOL_VERSION}")
        self.hello = hello
        return hello

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.stream.aclose()
            if self._process is not None:
                if self._process.returncode is None:
                    self._process.terminate()
                    with trio.move_on_after(5):
                        await self._process.wait()
                    if self._process.returncode is None:
                        self._process.kill()
                        await self._process.wait()
                self._stderr.close()

    async def __aenter__(self) -> Link:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def _open_stream(target: Target) -> Link:
    if target.host is None:
        try:
            stream = await trio.open_unix_socket(target.path)
        except OSError as exc:
            raise SourceError(f"{target.label}: cannot connect to {target.path}: {exc.strerror or exc}; "
                              "is the supervisor running?") from None
        return Link(target, stream)
    mine, theirs = socket.socketpair()
    stderr = tempfile.TemporaryFile()
    try:
        process = await trio.lowlevel.open_process(ssh_argv(target.host), stdin=theirs.fileno(),
                                                   stdout=theirs.fileno(), stderr=stderr.fileno())
    except OSError as exc:
        mine.close()
        stderr.close()
        raise SourceError(f"{target.label}: cannot run ssh: {exc.strerror or exc}") from None
    finally:
        theirs.close()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(mine))
    link = Link(target, stream, process, stderr)
    try:
        await stream.send_all(os.fsencode(target.path) + b"\n")
    except (trio.BrokenResourceError, OSError):
        reason = await link._closed_reason("ssh ended at once")
        await link.aclose()
        raise SourceError(reason) from None
    return link


async def open_link(target: Target) -> Link:
    """Connect to ``target`` and read its hello.

    Raises:
        SourceError: it cannot be reached in :data:`CONNECT_TIMEOUT` seconds, or is no supervisor.
    """
    with trio.move_on_after(CONNECT_TIMEOUT) as scope:
        link = await _open_stream(target)
        try:
            await link.greet()
        except BaseException:
            await link.aclose()
            raise
        return link
    assert scope.cancelled_caught
    raise SourceError(f"{target.label}: no greeting within {CONNECT_TIMEOUT:g} s")
