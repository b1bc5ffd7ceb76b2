"""Reading a configuration file for a reload, safely (in a worker thread).

`reload root FILE` makes the daemon, usually root, read a file a client
names.  Whatever the file is, the read must not block (a FIFO, a device),
must stay bounded in size, and must not let a non-root client feed root a
file that someone other than root can write.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Final

from herd.protocol import ProtocolError

__all__ = ["MAX_CONFIG_BYTES", "read_config_file", "trusted_requester"]

#: Largest configuration file a reload reads (5000 services take about 1 MiB).
MAX_CONFIG_BYTES: Final = 16 * 1024 * 1024


def trusted_requester(uid: int | None) -> bool:
    """Whether a client with this uid may make the daemon load any file:
    root, or the user the daemon runs as.  None means the daemon itself
    (SIGHUP); -1 that the client's uid is unknown."""
    return uid is None or uid in (0, os.getuid())


def read_config_file(path: Path, *, requester: int | None = None) -> bytes:
    """The bytes of the configuration file at `path`.

    The file is opened without blocking and checked on its descriptor, so
    what is checked is what is read.  For an untrusted `requester` (see
    `trusted_requester`) the file must belong to root or to the daemon's user
    and be writable by no one else.

    Raises:
        ProtocolError: ``config-error`` when the file is missing, unreadable,
            not a regular file or too large; ``permission-denied`` when the
            requester may not make the daemon load it.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ProtocolError("config-error", f"{path}: no such file") from None
    except OSError as exc:
        raise ProtocolError("config-error", f"{path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ProtocolError("config-error", f"{path}: not a regular file ({_kind(st.st_mode)}); "
                                                "a configuration must be a regular file")
        if not trusted_requester(requester):
            _check_owner(path, st)
        if st.st_size > MAX_CONFIG_BYTES:
            raise ProtocolError("config-error", f"{path}: {st.st_size} bytes; a configuration may have "
                                                f"at most {MAX_CONFIG_BYTES}")
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, 1 << 20):
            size += len(chunk)
            if size > MAX_CONFIG_BYTES:  # it grew while being read
                raise ProtocolError("config-error", f"{path}: more than {MAX_CONFIG_BYTES} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise ProtocolError("config-error", f"{path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def _check_owner(path: Path, st: os.stat_result) -> None:
    owners = {0, os.getuid()}
    if st.st_uid not in owners:
        raise ProtocolError("permission-denied", (
            f"{path} belongs to uid {st.st_uid}: only root may make the supervisor load a file that "
            f"is not owned by {'root' if owners == {0} else 'root or uid ' + str(os.getuid())}"))
    writers = [who for bit, who in ((stat.S_IWGRP, "its group"), (stat.S_IWOTH, "others")) if st.st_mode & bit]
    if writers:
        raise ProtocolError("permission-denied", (
            f"{path} is writable by {' and '.join(writers)} (mode {stat.S_IMODE(st.st_mode):04o}): "
            "only root may make the supervisor load it"))


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a file"
