"""Readiness probes (pid file, connect) and socket-activation helpers."""

from __future__ import annotations

import errno
import os
import select
import socket
from collections.abc import Callable
from typing import Any

import trio

from . import _fs

__all__ = ["probe_connect", "wait_pid_file", "remove_stale", "readable_then_cancel",
           "event_then_cancel", "has_pending", "drain"]


async def readable_then_cancel(sock: socket.socket, scope: trio.CancelScope) -> None:
    """Cancel `scope` once `sock` is readable, or closed (`trio.lowlevel.notify_closing`)."""
    try:
        await trio.lowlevel.wait_readable(sock)
    except trio.ClosedResourceError:
        pass
    scope.cancel()


async def event_then_cancel(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def has_pending(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def drain(sock: socket.socket) -> None:
    """Accept and close what queued up (after a failed activation)."""
    sock.setblocking(False)
    try:
        while True:
            conn, _ = sock.accept()
            conn.close()
    except OSError:
        pass
    finally:
        sock.setblocking(True)


def remove_stale(path: str | None) -> str | None:
    """Remove a pid file left from an earlier run (the entry itself, never
    what a symlink names; through a safely resolved directory, see `_fs`).

    Returns why it could not be removed (None when it is gone), for the
    start to fail with: a stale pid file could name any process.
    """
    if not path:
        return None
    try:
        _fs.unlink_file(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        return f"cannot remove the stale pid file: {exc}"
    return None


async def wait_pid_file(path: str, on_poll: Callable[[], None] | None = None) -> int:
    """Poll until `path` holds the PID of a running process; return it."""
    delay = 0.01
    while True:
        if on_poll is not None:
            on_poll()
        try:
            text = _fs.read_small(path, 64).decode("ascii", errors="replace").strip()
            if text.isdigit() and int(text) >= 1 and os.path.exists(f"/proc/{int(text)}"):
                return int(text)
        except OSError:
            pass
        await trio.sleep(delay)
        delay = min(delay * 2, 0.1)


async def probe_connect(kind: str, address: str | None, path: str | None) -> None:
    """Return once a connection to the address succeeds (polls with backoff)."""
    delay = 0.01
    while True:
        if kind == "tcp":
            assert address is not None
            host, _, port = address.rpartition(":")
            family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
            sock = trio.socket.socket(family, socket.SOCK_STREAM)
            target: Any = (host.strip("[]"), int(port))
        else:
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target = path
        with sock:
            try:
                await sock.connect(target)
                return
            except OSError as exc:
                if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.EAGAIN, errno.ECONNRESET,
                                     errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    raise
        await trio.sleep(delay)
        delay = min(delay * 2, 0.25)

