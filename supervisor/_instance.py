"""One supervisor per socket directory: its lock, and where its notify socket lives.

Each supervisor instance is named after its control socket's directory
(``control.sock`` in ``/run/supervisor`` → ``supervisor-<hash>``).  Under
that name it keeps two files in a *notify directory* that it creates itself,
owned by its user and writable by nobody else:

* ``NAME.lock``: held with ``flock`` for as long as the supervisor runs (the
  descriptor is inherited across a re-exec, so the lock never lapses).  A
  second supervisor pointed at the same socket directory finds it held and
  refuses to start, before it touches any socket.  The file holds the PID.
  The kernel lets the lock go when the process ends; the next supervisor to
  start removes the files of those that are gone.
* ``NAME.sock``: the sd_notify socket.  The directory is searchable by every
  user (mode 0711), so services running as other users reach it even when the
  control sockets' directory is private; nobody else can plant or replace a
  file there.

The notify directory is ``/run/supervisor-notify`` for root, and
``$XDG_RUNTIME_DIR/supervisor-notify`` (else ``/tmp/supervisor-notify-UID``)
for anyone else.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import stat
from pathlib import Path
from typing import Final

__all__ = ["AlreadyRunning", "InstanceLock", "instance_name", "notify_dir", "prepare_notify_dir"]

#: The notify directory's mode: others may reach a socket by name, not list or write.
NOTIFY_DIR_MODE: Final = 0o711
_SUN_PATH_MAX: Final = 107


class AlreadyRunning(OSError):
    """Another supervisor holds the lock of this socket directory."""


def notify_dir(uid: int | None = None, env: dict[str, str] | None = None) -> Path:
    """Where this user's supervisors keep their notify sockets and locks."""
    uid = os.getuid() if uid is None else uid
    env = dict(os.environ) if env is None else env
    if uid == 0:
        return Path("/run/supervisor-notify")
    runtime = env.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "supervisor-notify" if runtime else Path(f"/tmp/supervisor-notify-{uid}")


def instance_name(socket_dir: Path) -> str:
    """A file name for the supervisor of `socket_dir` (resolved): readable and unique."""
    real = os.path.realpath(socket_dir)
    base = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(real) or "root")[:32]
    digest = hashlib.sha256(os.fsencode(real)).hexdigest()[:12]
    return f"{base}-{digest}"


def prepare_notify_dir(path: Path) -> None:
    """Create the notify directory (mode 0711), or check the one that exists.

    Raises:
        OSError: it is not a real directory, not ours, or writable by others,
            naming the directory and what is wrong.
    """
    try:
        os.mkdir(path, NOTIFY_DIR_MODE)
    except FileExistsError:
        pass
    else:
        os.chmod(path, NOTIFY_DIR_MODE)  # whatever the umask
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(errno.ENOTDIR, f"notify directory {path} is not a directory (a symlink?)")
    if st.st_uid != os.getuid():
        raise OSError(errno.EPERM, f"notify directory {path} belongs to uid {st.st_uid}, not to us; "
                                   f"remove it")
    if st.st_mode & 0o022:
        raise OSError(errno.EPERM, f"notify directory {path} is writable by others "
                                   f"(mode {stat.S_IMODE(st.st_mode):04o}); refusing")
    if len(os.fsencode(path)) + 1 + 64 > _SUN_PATH_MAX:
        raise OSError(errno.ENAMETOOLONG, f"notify directory {path} is too long a path for a socket")


class InstanceLock:
    """The held lock of one socket directory (see the module docstring)."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path

    @classmethod
    def acquire(cls, directory: Path, name: str, socket_dir: Path) -> InstanceLock:
        """Take the lock of `name` in `directory`, then sweep stale entries.

        Raises:
            AlreadyRunning: another supervisor holds it (the message names its PID).
            OSError: the lock file cannot be opened.
        """
        guard = _open_lock(directory / ".guard")
        try:
            fcntl.flock(guard, fcntl.LOCK_EX)  # held for a moment: acquire and sweep, not more
            lock = cls._take(directory / f"{name}.lock", socket_dir)
            _sweep(directory, keep=name)
            return lock
        finally:
            os.close(guard)

    @classmethod
    def _take(cls, path: Path, socket_dir: Path) -> InstanceLock:
        # Under the guard: no other supervisor opens, sweeps or removes lock files meanwhile.
        fd = _open_lock(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"another supervisor (PID {holder})" if holder else "another supervisor"
            raise AlreadyRunning(errno.EBUSY, f"{who} already runs on {socket_dir}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(fd, path)

    @classmethod
    def adopt(cls, fd: int, path: Path) -> InstanceLock:
        """The lock a previous image held (re-exec): the same open file, still locked."""
        os.set_inheritable(fd, False)
        return cls(fd, path)


def _open_lock(path: Path) -> int:
    """Open (or create, mode 0600: nobody else may lock it) a lock file, never through a symlink.

    Raises:
        OSError: naming the file.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise OSError(exc.errno, f"lock file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"lock file {path} is not a regular file")
    return fd


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def _sweep(directory: Path, keep: str) -> None:
    """Remove the lock and socket of supervisors that are gone (killed, crashed)."""
    for entry in os.scandir(directory):
        name, dot, ext = entry.name.rpartition(".")
        if ext != "lock" or not dot or name == keep or not name:
            continue
        try:
            fd = os.open(entry.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # held: that supervisor runs
            continue
        for stale in (directory / f"{name}.sock", Path(entry.path)):
            try:
                os.unlink(stale)
            except OSError:
                pass
        os.close(fd)
