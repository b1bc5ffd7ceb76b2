"""The guard: each service holds the read ends of its own output pipes.

A service is spawned with a duplicate of the read end of its stdout pipe and
of its stderr pipe (its *guards*, which it never uses; see `_proc.spawn` for
where they land).  So a pipe keeps a reader as long as the service lives,
whoever else dies: when the supervisor and the keeper are SIGKILLed
together, a service that prints gets neither EPIPE nor SIGPIPE; once the
pipe is full (64 KiB) it blocks until a reader is back, and loses nothing.

The service's record says where its guards are (`record`).  A supervisor
started after such a crash, finding no keeper, takes each pipe back from the
service itself (`reclaim`): ``pidfd_getfd(2)`` on the service's pidfd, the
guard's number, checked to be the same pipe (its inode) before it is used;
only a read end is kept (the next spawn opens write ends of its own,
`reopen`).
A service that closed its guards (a daemon that closes every descriptor
above 2) may still have the pipe as its stdout or stderr: that is tried
next.  See docs/keeper.md, "The guard".
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import stat
from typing import Any, Final

__all__ = ["pidfd_getfd", "record", "reclaim", "reopen", "STREAM_FDS"]

#: pidfd_getfd(2): the same number on every architecture with the generic table (alpha aside).
_SYS_PIDFD_GETFD: Final = 438
#: The descriptor each stream is on in the service.
STREAM_FDS: Final = {"stdout": 1, "stderr": 2}

_libc: Any = None


def pidfd_getfd(pidfd: int, fd: int) -> int:
    """A duplicate (close-on-exec) of descriptor `fd` of the process behind `pidfd`.

    Raises:
        OSError: EBADF (no such descriptor), EPERM (not allowed to ptrace
            it), ENOSYS (a kernel before 5.6), ESRCH (it is gone) ….
    """
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    got = _libc.syscall(ctypes.c_long(_SYS_PIDFD_GETFD), ctypes.c_int(pidfd), ctypes.c_int(fd), ctypes.c_uint(0))
    if got < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(got)


def record(read_fd: int, number: int) -> dict[str, int]:
    """What a service's record keeps of one guard: its number in the service
    and the pipe's inode (which names the pipe: never take another one)."""
    return {"fd": number, "inode": os.fstat(read_fd).st_ino}


def reclaim(pidfd: int, stream: str, guard: Any) -> int:
    """A read end of the pipe `stream` of the service behind `pidfd` writes
    to, taken from the service: its guard, else its own `stream`.

    Raises:
        OSError: neither is that pipe any more (the reason of the guard's failure).
    """
    if not isinstance(guard, dict) or not isinstance(inode := guard.get("inode"), int):
        raise OSError(0, "no guard recorded")
    first: OSError | None = None
    for number in (guard.get("fd"), STREAM_FDS[stream]):
        if not isinstance(number, int) or isinstance(number, bool):
            continue
        try:
            return _pipe_from(pidfd, number, inode)
        except OSError as exc:
            first = first or exc
    assert first is not None
    raise first


def _pipe_from(pidfd: int, number: int, inode: int) -> int:
    """Raises:
        OSError: descriptor `number` of the service is not an end of pipe `inode`.
    """
    fd = pidfd_getfd(pidfd, number)
    try:
        st = os.fstat(fd)
        if not stat.S_ISFIFO(st.st_mode) or st.st_ino != inode:
            raise OSError(0, f"descriptor {number} is not the service's pipe any more")
        mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
        if mode not in (os.O_RDONLY, os.O_WRONLY):
            raise OSError(0, f"descriptor {number} is open for reading and writing")
        if mode == os.O_WRONLY:  # the service's own end: a read end of our own instead
            fd, theirs = reopen(fd, os.O_RDONLY), fd
            os.close(theirs)
        return fd
    except BaseException:
        os.close(fd)
        raise


def reopen(fd: int, mode: int) -> int:
    """The pipe behind `fd` opened again, as a FIFO, through /proc (close-on-
    exec): a new end of the same pipe, with flags of its own.  One end is
    open (ours), so this never blocks.

    Raises:
        OSError: it cannot be opened.
    """
    return os.open(f"/proc/self/fd/{fd}", mode | os.O_CLOEXEC)
