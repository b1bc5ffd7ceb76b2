"""The control sockets' files: where they are bound, with which modes.

A control socket is 0600, or 0660 owned by its configured group; its
directory is created if needed and refused if someone else could tamper
with it; a stale socket file is replaced, a live one never.
"""

from __future__ import annotations

import errno
import grp
import os
import socket
import stat
from pathlib import Path

import trio

__all__ = ["SocketInUse", "bind_unix_socket", "check_socket_dir", "prepare_socket_dir"]


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
