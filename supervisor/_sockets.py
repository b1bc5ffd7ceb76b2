"""Listening sockets for socket activation: bound once, passed on every start.

The supervisor owns the sockets, so connections queue in the kernel's
backlog while the service restarts instead of being refused.
"""

from __future__ import annotations

import grp
import os
import socket
import stat

from .spec import SocketSpec

__all__ = ["bind", "close", "describe"]


def describe(spec: SocketSpec) -> str:
    return spec.path or spec.address or spec.name


def bind(spec: SocketSpec) -> socket.socket:
    """Create, bind and listen.  A stale Unix socket file is replaced.

    Raises:
        OSError: with a message naming the socket (address in use, bad group, …).
    """
    try:
        if spec.path is not None:
            return _bind_unix(spec)
        return _bind_tcp(spec)
    except KeyError:
        raise OSError(f"socket {describe(spec)}: group {spec.group!r} does not exist") from None
    except OSError as exc:
        raise OSError(exc.errno, f"socket {describe(spec)}: {exc.strerror or exc}") from None


def _bind_unix(spec: SocketSpec) -> socket.socket:
    assert spec.path is not None
    os.makedirs(os.path.dirname(spec.path) or "/", mode=0o755, exist_ok=True)
    try:
        if stat.S_ISSOCK(os.lstat(spec.path).st_mode):
            os.unlink(spec.path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)
        try:
            sock.bind(spec.path)
        finally:
            os.umask(old)
        if spec.group is not None:
            gid = grp.getgrnam(spec.group).gr_gid if isinstance(spec.group, str) else spec.group
            os.chown(spec.path, -1, gid)
        os.chmod(spec.path, spec.mode)
        sock.listen(spec.backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind_tcp(spec: SocketSpec) -> socket.socket:
    assert spec.address is not None
    host, _, port = spec.address.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
        sock.listen(spec.backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def close(spec: SocketSpec, sock: socket.socket) -> None:
    sock.close()
    if spec.path is not None:
        try:
            os.unlink(spec.path)
        except OSError:
            pass
