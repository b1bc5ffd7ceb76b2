"""Files the supervisor writes as root, safe from paths a service user controls.

A service user may own a directory on the way to a file the supervisor
writes (a log directory, a pid-file directory).  Such a user can swap an
entry for a symlink between two writes, and a plain ``open()`` as root then
writes into whatever the link names (``/root/.bashrc``, ``/etc/shadow``).
So every path is resolved here one component at a time, each one opened
relative to its parent's descriptor with ``O_NOFOLLOW``:

* a symlink on the way is followed only when no other user could have put
  it there: its directory belongs to root (or to us) and is not writable by
  group or others (in a sticky directory such as ``/tmp``, the link must
  belong to root or to us).  ``/var/run -> /run`` is followed; a link in a
  service user's directory is refused;
* the last component is never followed (``O_NOFOLLOW``) and must be a
  regular file with a single link;
* renames and unlinks happen relative to the directory's descriptor, so they
  act on the directory that was checked.

Refusals raise `UnsafePath` (an `OSError` whose message names the path and
the reason), so callers that already handle `OSError` stay correct.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

__all__ = ["UnsafePath", "chown_file", "opened_dir", "open_append", "open_in", "replace_file", "replace_in",
           "read_small", "unlink_file", "writable_by_others", "write_all"]

_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_LINKS: Final = 40  # as the kernel's own limit (MAXSYMLINKS)


class UnsafePath(OSError):
    """A path that a user other than root (or us) could redirect."""

    def __init__(self, path: str | os.PathLike[str], why: str) -> None:
        super().__init__(errno.ELOOP, why, os.fspath(path))

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


def writable_by_others(dir_st: os.stat_result) -> str | None:
    """Why a user other than root or us could change this directory's entries (None: nobody can)."""
    if dir_st.st_uid not in (0, os.geteuid()):
        return f"the directory belongs to uid {dir_st.st_uid}"
    if dir_st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return "the directory is writable by other users"
    return None


def _untrusted(dir_st: os.stat_result, entry_st: os.stat_result) -> str | None:
    """Who, other than root or us, could replace this entry of the directory (None: nobody)."""
    why = writable_by_others(dir_st)
    if why is not None and dir_st.st_uid in (0, os.geteuid()) and dir_st.st_mode & stat.S_ISVTX \
            and entry_st.st_uid in (0, os.geteuid()):
        return None  # sticky (/tmp): only the entry's owner, root or us can replace it
    return why


def _components(path: str) -> list[str]:
    """The names of `path`, last first (a stack)."""
    return [c for c in reversed(path.split("/")) if c and c != "."]


def _open_dir(path: str, create: bool, mode: int) -> int:
    todo = _components(path)
    where = "/"
    fd = os.open("/", _DIR_FLAGS)
    links = retries = 0
    try:
        while todo:
            name = todo.pop()
            try:
                nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise FileNotFoundError(errno.ENOENT, "no such directory", os.path.join(where, name)) from None
                try:
                    os.mkdir(name, mode, dir_fd=fd)
                except FileExistsError:  # made meanwhile (or a dangling link): look again
                    retries += 1
                    if retries > 3:
                        raise
                todo.append(name)
                continue
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                entry = os.stat(name, dir_fd=fd, follow_symlinks=False)
                link = os.path.join(where, name)
                if not stat.S_ISLNK(entry.st_mode):
                    raise NotADirectoryError(errno.ENOTDIR, "not a directory", link) from None
                why = _untrusted(os.fstat(fd), entry)
                if why is not None:
                    raise UnsafePath(link, f"refusing to follow this symlink: {why}") from None
                links += 1
                if links > _MAX_LINKS:
                    raise OSError(errno.ELOOP, "too many levels of symbolic links", path)
                target = os.readlink(name, dir_fd=fd)
                if target.startswith("/"):
                    os.close(fd)
                    fd, where = -1, "/"
                    fd = os.open("/", _DIR_FLAGS)
                todo.extend(_components(target))
                continue
            os.close(fd)
            fd = nfd
            where = os.path.dirname(where) if name == ".." else os.path.join(where, name)
        return fd
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise


@contextmanager
def opened_dir(path: str | os.PathLike[str], *, create: bool = False, mode: int = 0o755) -> Iterator[int]:
    """A descriptor of the directory `path`, resolved safely (see the module).

    With `create`, missing directories are made (`mode`), like ``mkdir -p``.

    Raises:
        UnsafePath: a symlink on the way could have been put there by another user.
        OSError: a component is missing (without `create`) or not a directory.
    """
    fd = _open_dir(os.path.abspath(path), create, mode)
    try:
        yield fd
    finally:
        os.close(fd)


def _check_regular(fd: int, path: str | os.PathLike[str]) -> None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnsafePath(path, "not a regular file")
    if st.st_nlink > 1:
        os.close(fd)
        raise UnsafePath(path, f"the file has {st.st_nlink} hard links (one may be another user's file)")


def _open_file(dir_fd: int, name: str, flags: int, mode: int, path: str | os.PathLike[str]) -> int:
    """Open `name` in `dir_fd`, never through a symlink, only if a regular file."""
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, mode,
                     dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePath(path, "the file is a symlink: refused") from None
        if exc.errno == errno.ENXIO:  # a FIFO nobody reads (O_NONBLOCK)
            raise UnsafePath(path, "not a regular file") from None
        raise
    _check_regular(fd, path)
    return fd


def open_in(dir_fd: int, name: str, flags: int, path: str | os.PathLike[str]) -> int:
    """Open the existing regular file `name` in the directory `dir_fd` with
    `flags` (``O_RDONLY``, say), never through a symlink; `path` is for messages.

    Raises:
        UnsafePath: `name` is a symlink, not a regular file, or hard-linked.
        OSError: it cannot be opened.
    """
    return _open_file(dir_fd, name, flags, 0, path)


def open_append(dir_fd: int, name: str, path: str | os.PathLike[str], mode: int = 0o640, *,
                read: bool = False) -> int:
    """Open (create) `name` in the directory `dir_fd` for appending (and, with
    `read`, reading: ``pread``); `path` is for messages.

    Raises:
        UnsafePath: `name` is a symlink, not a regular file, or hard-linked.
        OSError: it cannot be opened.
    """
    access = os.O_RDWR if read else os.O_WRONLY
    return _open_file(dir_fd, name, access | os.O_APPEND | os.O_CREAT, mode, path)


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to `fd`.

    Raises:
        OSError: a write failed (part of `data` may be written).
    """
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def replace_file(path: str | os.PathLike[str], data: bytes, mode: int = 0o600, *, sync: bool = True,
                 dir_mode: int = 0o755) -> None:
    """Replace `path` atomically: a new temporary file (``O_EXCL``, never
    through a symlink) in the same directory, written, fsynced (with `sync`),
    then renamed over `path`.  Readers see the old file or the new one.
    Missing directories are created with `dir_mode`.

    Raises:
        UnsafePath: the directory could be redirected by another user.
        OSError: the directory or the file cannot be written.
    """
    path = Path(path)
    with opened_dir(path.parent, create=True, mode=dir_mode) as dfd:
        replace_in(dfd, path.name, data, mode, path, sync=sync)


def replace_in(dir_fd: int, name: str, data: bytes, mode: int, path: str | os.PathLike[str], *,
               sync: bool = False) -> None:
    """`replace_file` in the directory `dir_fd`, already resolved safely
    (`opened_dir`); `path` is for messages.

    Raises:
        OSError: the file cannot be written.
    """
    tmp = f".{name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    try:
        try:
            os.fchmod(fd, mode)  # whatever the umask
            write_all(fd, data)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise
    if sync:
        os.fsync(dir_fd)


def read_small(path: str | os.PathLike[str], limit: int = 65536) -> bytes:
    """The first `limit` bytes of the regular file `path`, never read through a symlink.

    Raises:
        UnsafePath: the path could be redirected, or names no regular file.
        OSError: it cannot be read.
    """
    return _read(path, limit, tail=False)


def read_tail(path: str | os.PathLike[str], limit: int) -> bytes:
    """The last `limit` bytes of the regular file `path`, never read through a symlink.

    Raises:
        UnsafePath: the path could be redirected, or names no regular file.
        OSError: it cannot be read.
    """
    return _read(path, limit, tail=True)


def _read(path: str | os.PathLike[str], limit: int, *, tail: bool) -> bytes:
    path = Path(path)
    with opened_dir(path.parent) as dfd:
        fd = _open_file(dfd, path.name, os.O_RDONLY, 0, path)
    try:
        start = max(0, os.fstat(fd).st_size - limit) if tail else 0
        return os.pread(fd, limit, start)
    finally:
        os.close(fd)


def chown_file(path: str | os.PathLike[str], uid: int, gid: int, mode: int) -> None:
    """Give the regular file `path` to `uid`:`gid` with `mode`, never through a symlink.

    Raises:
        UnsafePath: the path could be redirected, or names no regular file
            (or one with several hard links).
        OSError: it cannot be changed.
    """
    path = Path(path)
    with opened_dir(path.parent) as dfd:
        fd = _open_file(dfd, path.name, os.O_RDONLY, 0, path)
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def unlink_file(path: str | os.PathLike[str]) -> bool:
    """Remove the entry `path` (a file or a symlink itself, never what a
    symlink names), through a safely resolved directory.  Returns False when
    there was nothing to remove.

    Raises:
        UnsafePath: the directory could be redirected by another user.
        OSError: it cannot be removed (a directory, say).
    """
    path = Path(path)
    try:
        with opened_dir(path.parent) as dfd:
            os.unlink(path.name, dir_fd=dfd)
    except FileNotFoundError:
        return False
    return True
