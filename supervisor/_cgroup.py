"""Per-service cgroups on the cgroup v2 hierarchy: membership is the truth.

Each process service runs in a cgroup of its own, ``<subtree>/<name>.service``,
in a subtree that this supervisor owns (one per state directory, so several
supervisors share a host and a supervisor that restarts on the same state
directory finds its subtree again).  What this module uses needs no
controller at all: ``cgroup.procs`` (membership, and moving a child into its
cgroup before it executes), ``cgroup.events`` (``populated``, watched with
inotify: the file signals changes with POLLPRI, which poll-based waiting
would spin on), ``cgroup.kill`` (kernel 5.14; a SIGKILL loop before that) and
``cpu.stat``.  ``memory.current`` is read where the memory controller is
enabled for the subtree, else memory is summed from /proc.

Processes are never moved in the v1 hierarchies.  Where no writable v2
hierarchy exists, `Hierarchy.open` says why and the caller falls back to
tracking by process group, session and ancestry.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import signal
import struct
from pathlib import Path
from typing import Final

import structlog
import trio

__all__ = ["Hierarchy", "ServiceCgroup", "CgroupUnavailable", "cgroup_of", "Watcher"]

log = structlog.get_logger("supervisor.cgroup")

#: What the subtree's own processes leaf is called on a pure v2 host (the
#: supervisor moves itself there: no processes in inner cgroups).
SELF_LEAF: Final = "supervisor"
_SUBTREE_PREFIX: Final = "supervisor-"


class CgroupUnavailable(Exception):
    """No usable cgroup v2 hierarchy here; the message says why."""


def _v2_mount() -> Path | None:
    """The cgroup2 mount point: /sys/fs/cgroup (pure v2) before any other."""
    found: list[Path] = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    found.append(Path(left.split()[4].replace("\\040", " ")))
    except OSError:
        return None
    for preferred in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        if preferred in found:
            return preferred
    return found[0] if found else None


def cgroup_of(pid: int) -> str | None:
    """The v2 cgroup of `pid`, as a path below the mount ("/a/b"), or None if gone."""
    try:
        with open(f"/proc/{pid}/cgroup", "rb") as f:
            for line in f:
                if line.startswith(b"0::"):
                    return line[3:].rstrip(b"\n").decode(errors="surrogateescape")
    except (OSError, ValueError):
        return None
    return None


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


class ServiceCgroup:
    """One service's cgroup: create it, put children in, read it, empty it."""

    __slots__ = ("path", "rel", "wd")

    def __init__(self, path: Path, rel: str) -> None:
        self.path = path
        self.rel = rel  # as /proc/PID/cgroup names it
        self.wd: int | None = None  # the inotify watch on cgroup.events

    def ensure(self) -> None:
        """Create the cgroup (once).

        Raises:
            OSError: it cannot be created.
        """
        try:
            os.mkdir(self.path, 0o755)
        except FileExistsError:
            pass

    def open_procs(self) -> int:
        """A descriptor on cgroup.procs: a child writes "0" to it to join."""
        return os.open(self.path / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)

    def pids(self) -> list[int]:
        try:
            return [int(x) for x in (self.path / "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            return []

    def contains(self, pid: int) -> bool:
        """`pid` is in this cgroup (or one below it)."""
        where = cgroup_of(pid)
        return where is not None and (where == self.rel or where.startswith(self.rel + "/"))

    def populated(self) -> bool:
        try:
            for line in (self.path / "cgroup.events").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "populated":
                    return value.strip() == "1"
        except OSError:
            return False
        return False

    def signal(self, sig: int, *, spare: int | None = None, cont: bool = False) -> int:
        """Send `sig` to every process in the cgroup (but `spare`), then with
        `cont` SIGCONT (a stopped process must run to act on `sig`), in one
        reading of cgroup.procs; how many were signalled."""
        n = 0
        for pid in self.pids():
            if pid == spare:
                continue
            try:
                os.kill(pid, sig)
                if cont:
                    os.kill(pid, signal.SIGCONT)
                n += 1
            except ProcessLookupError:
                pass
        return n

    def kill(self) -> None:
        """SIGKILL every process in the cgroup, those forking meanwhile too."""
        try:
            _write(self.path / "cgroup.kill", b"1")
            return
        except FileNotFoundError:  # before Linux 5.14
            pass
        except OSError as exc:
            log.warning("cgroup.kill failed", cgroup=self.rel, error=exc.strerror)
        for _ in range(16):  # a fork bomb could outrun one pass
            if not self.signal(signal.SIGKILL):
                return

    def stats(self) -> dict[str, int | None]:
        """Process count, CPU time (µs) and memory (bytes) of the cgroup."""
        pids = self.pids()
        cpu: int | None = None
        try:
            for line in (self.path / "cpu.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    cpu = int(value)
                    break
        except (OSError, ValueError):
            pass
        memory: int | None
        try:
            memory = int((self.path / "memory.current").read_text())
        except (OSError, ValueError):
            memory = _rss_sum(pids)
        return {"processes": len(pids), "cpu-usec": cpu, "memory-bytes": memory}

    def remove(self) -> bool:
        """Remove the (empty) cgroup; False if processes are still in it."""
        try:
            os.rmdir(self.path)
            return True
        except FileNotFoundError:
            return True
        except OSError:
            return False


def _rss_sum(pids: list[int]) -> int | None:
    total, page = 0, os.sysconf("SC_PAGE_SIZE")
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                total += int(f.read().split()[1]) * page
        except (OSError, ValueError, IndexError):
            continue
    return total


class Hierarchy:
    """This supervisor's subtree of the v2 hierarchy."""

    def __init__(self, mount: Path, rel: str) -> None:
        self.mount = mount
        self.rel = rel  # the subtree, as /proc/PID/cgroup names it
        self.path = mount / rel.lstrip("/")
        self._groups: dict[str, ServiceCgroup] = {}

    @classmethod
    def open(cls, state_dir: Path) -> Hierarchy:
        """Find or create the subtree for `state_dir`.

        The subtree is ``supervisor-<hash of state_dir>`` beside the cgroup the
        supervisor runs in (or the one it ran in: a restarted supervisor that
        finds itself in its own subtree's leaf uses that subtree).

        Raises:
            CgroupUnavailable: no writable cgroup v2 hierarchy.
        """
        mount = _v2_mount()
        if mount is None:
            raise CgroupUnavailable("no cgroup v2 hierarchy is mounted")
        own = cgroup_of(os.getpid())
        if own is None:
            raise CgroupUnavailable("/proc/self/cgroup names no v2 cgroup")
        name = _SUBTREE_PREFIX + hashlib.sha256(os.fsencode(os.path.realpath(state_dir))).hexdigest()[:12]
        parent = own.rstrip("/")
        if parent.endswith(f"/{name}/{SELF_LEAF}"):  # re-exec, or a restart in place
            parent = parent[: -len(f"/{name}/{SELF_LEAF}")]
        rel = f"{parent}/{name}"
        path = mount / rel.lstrip("/")
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            pass
        except OSError as exc:
            raise CgroupUnavailable(f"cannot create {path}: {exc.strerror}") from None
        try:  # can we really put processes there? (a read-only or undelegated tree)
            fd = os.open(path / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
            os.close(fd)
        except OSError as exc:
            raise CgroupUnavailable(f"cannot write {path}/cgroup.procs: {exc.strerror}") from None
        self = cls(mount, rel)
        if mount == Path("/sys/fs/cgroup") and own != "/":
            self._move_self()
        self._enable_controllers(parent)
        return self

    def _move_self(self) -> None:
        """Pure v2: no processes in inner cgroups, so the supervisor lives in a leaf."""
        leaf = self.path / SELF_LEAF
        try:
            os.mkdir(leaf, 0o755)
        except FileExistsError:
            pass
        try:
            _write(leaf / "cgroup.procs", b"0")
        except OSError as exc:
            log.warning("could not move the supervisor into its leaf cgroup", error=exc.strerror)

    def _enable_controllers(self, parent: str) -> None:
        """Best effort: memory, pids and cpu accounting for the services."""
        for where in (self.mount / parent.lstrip("/"), self.path):
            try:
                available = set((where / "cgroup.controllers").read_text().split())
            except OSError:
                return
            for ctl in ("memory", "pids", "cpu"):
                if ctl in available:
                    try:
                        _write(where / "cgroup.subtree_control", f"+{ctl}".encode())
                    except OSError:
                        pass

    def service(self, name: str) -> ServiceCgroup:
        group = self._groups.get(name)
        if group is None:
            group = ServiceCgroup(self.path / f"{name}.service", f"{self.rel}/{name}.service")
            self._groups[name] = group
        return group

    def owner_of(self, pid: int) -> str | None:
        """The service whose cgroup holds `pid`, or None."""
        where = cgroup_of(pid)
        if where is None or not where.startswith(self.rel + "/"):
            return None
        top = where[len(self.rel) + 1:].split("/", 1)[0]
        return top[: -len(".service")] if top.endswith(".service") else None

    def leftover_groups(self) -> list[str]:
        """Service cgroups in the subtree (names), e.g. after a crash."""
        try:
            return [e.name[: -len(".service")] for e in os.scandir(self.path)
                    if e.is_dir(follow_symlinks=False) and e.name.endswith(".service")]
        except OSError:
            return []

    def remove(self) -> None:
        """At an orderly shutdown: remove the empty service cgroups and the subtree."""
        for name in self.leftover_groups():
            self.service(name).remove()
        if cgroup_of(os.getpid()) == f"{self.rel}/{SELF_LEAF}":
            return  # we live in its leaf (pure v2): the subtree stays
        try:
            os.rmdir(self.path)
        except OSError:
            pass


# -- watching cgroup.events ------------------------------------------------------------

_IN_MODIFY: Final = 0x2
_IN_IGNORED: Final = 0x8000
_IN_NONBLOCK: Final = os.O_NONBLOCK
_IN_CLOEXEC: Final = os.O_CLOEXEC
_EVENT: Final = struct.Struct("iIII")  # wd, mask, cookie, len


class Watcher:
    """One inotify descriptor for every service cgroup's ``cgroup.events``.

    `changed(group)` is an event set (and replaced) whenever the file
    changes; `wait_empty` waits on it, never polling.
    """

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = self._libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self.fd: int = fd
        self._events: dict[int, trio.Event] = {}

    def watch(self, group: ServiceCgroup) -> None:
        if group.wd is not None and group.wd in self._events:
            return
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(group.path / "cgroup.events"), _IN_MODIFY)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(group.path))
        group.wd = wd
        self._events.setdefault(wd, trio.Event())

    def _changed(self, group: ServiceCgroup) -> trio.Event:
        self.watch(group)
        assert group.wd is not None
        return self._events[group.wd]

    async def wait_empty(self, group: ServiceCgroup) -> None:
        """Return once no process is left in `group`."""
        while True:
            event = self._changed(group)
            if not group.populated():
                return
            await event.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                await trio.lowlevel.wait_readable(self.fd)
                try:
                    data = os.read(self.fd, 64 * 1024)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    if exc.errno == errno.EINTR:
                        continue
                    raise
                offset = 0
                while offset + _EVENT.size <= len(data):
                    wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                    offset += _EVENT.size + length
                    event = self._events.pop(wd, None) if mask & _IN_IGNORED else self._events.get(wd)
                    if event is not None:
                        event.set()
                        if not mask & _IN_IGNORED:
                            self._events[wd] = trio.Event()
        finally:
            os.close(self.fd)
