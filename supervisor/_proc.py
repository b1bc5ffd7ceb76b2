"""Processes: spawn with credentials and limits, wait on pidfds, kill trees.

Rules this module keeps (see docs/design-brief.md and style.md):

* Every spawned child is a `Child`: pid + pidfd.  Its exit is collected with
  ``waitid(P_PIDFD)`` on that pidfd only; nothing here ever calls
  ``waitpid(-1)``, which would steal exit statuses.
* Orphans that the kernel re-parents to us (we are a child subreaper, or
  PID 1) are reaped by `reap_orphans`, which skips every pid we own.
* `subprocess.Popen` does the fork/exec (it is fast and closes fds); its
  `returncode` is set at once so that it never waits on the pid itself.
* No ``preexec_fn`` where it can be helped (it forks the whole daemon): a
  child for a cgroup or with limits is held in a stub that we move and
  release (`_held`), and another user is taken on by ``setpriv``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import grp
import os
import pwd
import resource
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, final

import trio

from . import _held, _limits
from .spec import RLIMIT_NAMES, ServiceSpec

__all__ = ["Child", "ExitStatus", "SpawnError", "spawn", "guard_numbers", "owned_pids", "reap_orphans",
           "descendants", "own_children", "process_group_members", "set_child_subreaper", "pidfd_or_none",
           "reap_first_orphans", "stat_fields",
           "wait_pidfds_gone"]

#: pid → Child for every process we spawned and have not reaped yet.
_owned: dict[int, "Child"] = {}

_PR_SET_CHILD_SUBREAPER: Final = 36


class SpawnError(Exception):
    """The command could not be started (not found, bad user, …)."""


@dataclass(frozen=True, slots=True)
class ExitStatus:
    code: int | None  # exit code, or None when killed by a signal
    signal: int | None
    time: float  # wall clock (epoch)

    def describe(self) -> str:
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = str(self.signal)
            return f"terminated by {name}"
        if self.code is None:
            return "exited (status unknown)"
        return f"exited with code {self.code}"

    def to_json(self) -> dict[str, object]:
        sig = None
        if self.signal is not None:
            try:
                sig = signal.Signals(self.signal).name
            except ValueError:
                sig = str(self.signal)
        return {"code": self.code, "signal": sig, "time": self.time}


@final
class Child:
    """One process we supervise: its pid, a pidfd, and its exit once known."""

    __slots__ = ("pid", "_pidfd", "exited", "status", "_start_time")

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self._pidfd = pidfd
        self.exited = trio.Event()
        self.status: ExitStatus | None = None
        self._start_time: int | None = None
        _owned[pid] = self

    @property
    def pidfd(self) -> int:
        return self._pidfd

    @property
    def start_time_ticks(self) -> int | None:
        """The kernel's start time of the process, in clock ticks since boot:
        with the pid, it names one process exactly."""
        if self._start_time is None and self.status is None:
            self._start_time = start_ticks(self.pid)
        return self._start_time

    @classmethod
    def adopt(cls, pid: int) -> Child:
        """Watch a process we did not spawn (a daemon's real PID, MAINPID=).

        Raises:
            ProcessLookupError: it is gone already.
        """
        existing = _owned.get(pid)
        if existing is not None:
            return existing
        return cls(pid, os.pidfd_open(pid))

    @property
    def alive(self) -> bool:
        return self.status is None

    def signal(self, sig: int) -> None:
        """Signal this process only (via its pidfd: never a recycled pid)."""
        if self._pidfd < 0:
            return
        try:
            signal.pidfd_send_signal(self._pidfd, sig)
        except ProcessLookupError:
            pass

    def pgid(self) -> int | None:
        """The child's process group, unless it is gone or shares ours."""
        try:
            pgid = os.getpgid(self.pid)
        except ProcessLookupError:
            return None
        return None if pgid in (os.getpgrp(), 0, 1) else pgid

    def signal_group(self, sig: int) -> None:
        """Signal the child's process group (its own session, as we spawn it)."""
        pgid = self.pgid()
        if pgid is None:
            self.signal(sig)
            return
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            self.signal(sig)

    async def wait(self) -> ExitStatus:
        """Wait for the exit, reap the child, and return its status.

        Only one task may call this (the service's monitor); others wait on
        `exited`.
        """
        if self.status is not None:
            return self.status
        await trio.lowlevel.wait_readable(self._pidfd)
        code: int | None = None
        sig: int | None = None
        try:
            res = os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED)
        except ChildProcessError:
            res = None  # not our child (adopted): no status to collect
        if res is not None:
            if res.si_code == os.CLD_EXITED:
                code = res.si_status
            else:
                sig = res.si_status
        self.status = ExitStatus(code, sig, time.time())
        _owned.pop(self.pid, None)
        fd, self._pidfd = self._pidfd, -1
        os.close(fd)
        self.exited.set()
        return self.status


def owned_pids() -> set[int]:
    return set(_owned)


def _lookup_user(user: str | int) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(user) if isinstance(user, str) else pwd.getpwuid(user)
    except KeyError:
        raise SpawnError(f"user {user!r} does not exist") from None


def _lookup_group(group: str | int) -> int:
    try:
        return grp.getgrnam(group).gr_gid if isinstance(group, str) else grp.getgrgid(group).gr_gid
    except KeyError:
        raise SpawnError(f"group {group!r} does not exist") from None


#: Fixed exec wrapper for socket activation: LISTEN_PID must be the pid of the
#: program itself, known only in the child; `exec` keeps the pid.  The command
#: is passed as arguments, never interpolated.
_LISTEN_PID_WRAPPER = ("/bin/sh", "-c", 'LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@"')




def guard_numbers(guard_fds: Sequence[int], listen_count: int) -> list[int]:
    """The numbers a child gets its guard descriptors at (see `spawn`)."""
    if listen_count:
        return [3 + listen_count + i for i in range(len(guard_fds))]
    return list(guard_fds)


def _child_setup(limits: Sequence[tuple[str, int, int]], listen_fds: Sequence[int],
                 cgroup_fd: int | None = None):
    """What must happen in the child between fork and exec (kept minimal).

    `cgroup_fd` is the service's ``cgroup.procs``, open for writing: the child
    joins its cgroup first, so that nothing it ever runs starts outside it.
    `listen_fds` (the sockets, then the guards) are moved to 3, 4, ….
    """
    resolved = _resolve(limits)
    n = len(listen_fds)
    upper = os.sysconf("SC_OPEN_MAX")  # ours: no fd of ours is above it (rlimits may lower the child's)

    def apply() -> None:
        if cgroup_fd is not None:
            os.write(cgroup_fd, b"0")
        if n:
            # Move the descriptors to 3, 4, …: first above that range, then down.
            tmp = [fcntl.fcntl(fd, fcntl.F_DUPFD, 3 + n) for fd in listen_fds]
            for i, fd in enumerate(tmp):
                os.dup2(fd, 3 + i)
            # Popen's close_fds is off for these children (it would close 3…):
            # close everything above the passed range here instead.
            os.closerange(3 + n, upper)
        for res, soft, hard in resolved:  # last: a lower nofile must not fail the moves above
            inf = resource.RLIM_INFINITY
            resource.setrlimit(res, (inf if soft < 0 else soft, inf if hard < 0 else hard))

    return apply


def _resolve(limits: Iterable[tuple[str, int, int]]) -> list[tuple[int, int, int]]:
    """(resource constant, soft, hard) for each (name, soft, hard)."""
    return [(getattr(resource, RLIMIT_NAMES[name]), soft, hard) for name, soft, hard in limits]


def _credentials(spec: ServiceSpec, env: dict[str, str]) -> dict[str, object]:
    """Popen's `user`, `group` and `extra_groups` for the spec (only those it
    sets); a user's HOME, USER and LOGNAME go into `env` unless it is cleared.

    Raises:
        SpawnError: a user or group does not exist.
    """
    ids: dict[str, object] = {}
    if spec.user is not None:
        pw = _lookup_user(spec.user)
        gid = _lookup_group(spec.group) if spec.group is not None else pw.pw_gid
        ids.update(user=pw.pw_uid, group=gid, extra_groups=os.getgrouplist(pw.pw_name, gid))
        if not spec.clear_environment:
            env.update(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name)
    elif spec.group is not None:
        ids["group"] = _lookup_group(spec.group)
    if spec.supplementary_groups is not None:
        ids["extra_groups"] = [_lookup_group(g) for g in spec.supplementary_groups]
    return ids


def _check_found(command: str, env: dict[str, str]) -> None:
    """For a command run through a wrapper, which would fail only after the start.

    Raises:
        SpawnError: it is not found.
    """
    if shutil.which(command, path=env.get("PATH", os.defpath)) is None:
        if os.sep in command and os.path.exists(command):
            raise SpawnError(f"permission denied: {command}")
        raise SpawnError(f"command not found: {command}")


def spawn(spec: ServiceSpec, *, stdout: int, stderr: int, extra_env: dict[str, str] | None = None,
          listen_fds: Sequence[tuple[int, str]] = (), cgroup_fd: int | None = None,
          guard_fds: Sequence[int] = (), stdin: int | None = None) -> Child:
    """Start `spec.command` in a new session, with the spec's credentials.

    The child gets /dev/null as stdin (or `stdin`: an inetd connection), `stdout`/`stderr` as given, and no other
    descriptor but the `listen_fds` (fd, name), which it receives as 3, 4, …
    with LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID set (socket activation),
    and the `guard_fds` (docs/keeper.md, "The guard"): right after the
    sockets, or at their own numbers when there are none (no fork-time step
    needed); `guard_numbers` tells where.  With `cgroup_fd` (the service's
    ``cgroup.procs``) it joins that cgroup before it executes the command.

    Raises:
        SpawnError: naming the reason (command not found, no such user, …).
    """
    assert spec.command, "spawn() needs a command"
    env = {} if spec.clear_environment else dict(os.environ)
    ids = _credentials(spec, env)  # Popen's user, group, extra_groups
    env.update(spec.environment)
    if extra_env:
        env.update(extra_env)
    argv = list(spec.command)
    kwargs: dict[str, object] = {}
    if listen_fds:
        env["LISTEN_FDS"] = str(len(listen_fds))
        env["LISTEN_FDNAMES"] = ":".join(name for _, name in listen_fds)
        env.pop("LISTEN_PID", None)
        _check_found(argv[0], env)
        argv = [*_LISTEN_PID_WRAPPER, *argv]
    nofile = _limits.child_nofile(spec.resource_limits)  # the open-files limit we were given
    limits = [*spec.resource_limits, *filter(None, [nofile])]
    stdin_fd: int = subprocess.DEVNULL if stdin is None else stdin
    # The cgroup is joined before the command runs, never by the command's
    # own wrapper: a process that runs before it joins escapes a stop that
    # races its start.  Born there by the helper, or held in a stub that the
    # supervisor moves (see _held), else moved between fork and exec
    # (preexec_fn: a fork of the daemon).
    born = not listen_fds and cgroup_fd is not None and _held.Birth.available()
    held = (not born and not listen_fds and bool(limits or cgroup_fd is not None) and stdin in (None, stdout)
            and _held.usable(env))
    forks = bool(listen_fds) or (not born and not held and bool(spec.resource_limits or cgroup_fd is not None))
    if ids and not forks and (wrapper := _held.credentials(**ids)) is not None:
        _check_found(argv[0], env)  # Popen would switch them in a fork, not a vfork, of the daemon
        argv, ids = [*wrapper, *argv], {}
    hold: tuple[int, int] | None = None  # the stub's pipe (read, write)
    birth: _held.Birth | None = None
    passed = tuple(guard_fds)
    if born:
        assert cgroup_fd is not None
        try:
            birth = _held.Birth(cgroup_fd)
        except OSError as exc:
            raise SpawnError(f"cannot open the cgroup: {exc.strerror or exc}") from None
        argv, passed = birth.argv(argv, _resolve(limits)), (*passed, birth.dir, birth.write)
    elif held:
        _check_found(argv[0], env)
        argv = _held.stub_argv(argv, env, stdin_is_stdout=stdin is not None)
        hold = os.pipe2(os.O_CLOEXEC)
        stdin_fd = hold[0]
    elif forks:
        kwargs["preexec_fn"] = _child_setup(limits,
                                            [*(fd for fd, _ in listen_fds), *guard_fds] if listen_fds else [],
                                            cgroup_fd)
    elif nofile is not None:  # a wrapper, not a preexec_fn: that would cost a full fork
        if (wrapper := _limits.restore_wrapper(nofile)) is None:
            kwargs["preexec_fn"] = _child_setup([nofile], [])
        else:
            _check_found(argv[0], env)
            argv = [*wrapper, *argv]
    try:
        popen = _popen(argv, hold, birth, stdin=stdin_fd, stdout=stdout, stderr=stderr, close_fds=not listen_fds,
                       pass_fds=() if listen_fds else passed, cwd=spec.directory, env=env,
                       start_new_session=True, umask=spec.umask, **ids, **kwargs)
    except FileNotFoundError as exc:
        missing = exc.filename or spec.command[0]
        if missing == spec.directory:
            raise SpawnError(f"directory {spec.directory} does not exist") from None
        raise SpawnError(f"command not found: {spec.command[0]}") from None
    except PermissionError as exc:
        raise SpawnError(f"permission denied: {exc.filename or spec.command[0]}") from None
    except subprocess.SubprocessError as exc:
        raise SpawnError(f"could not set up the process: {exc}") from None
    except OSError as exc:
        raise SpawnError(f"could not start {spec.command[0]}: {exc.strerror or exc}") from None
    if birth is not None:
        pid = _born(popen, birth, spec.command[0])
    elif hold is not None:
        pid = _release(popen, hold[1], cgroup_fd, _resolve(limits))
    else:
        pid = popen.pid
    # We reap this pid ourselves through its pidfd: tell Popen hands off, so its
    # __del__/_cleanup never waitpid()s a pid that may be reused later.
    popen.returncode = 0
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as exc:  # pragma: no cover - the pid is our unreaped child
        raise SpawnError(f"pidfd_open failed: {exc}") from None
    return Child(pid, pidfd)


def _popen(argv: list[str], hold: tuple[int, int] | None, birth: _held.Birth | None,
           **kwargs: object) -> subprocess.Popen[bytes]:
    """`subprocess.Popen`; with `hold`, its read end is closed after the start,
    and on a failed start its write end and the `birth`'s descriptors too.

    Raises:
        OSError, subprocess.SubprocessError: as Popen does.
    """
    try:
        return subprocess.Popen(argv, **kwargs)  # type: ignore[call-overload]
    except BaseException:
        if hold is not None:
            os.close(hold[1])
        if birth is not None:
            birth.close()
        raise
    finally:
        if hold is not None:
            os.close(hold[0])


def _born(helper: subprocess.Popen[bytes], birth: _held.Birth, command: str) -> int:
    """The pid of the child the helper started in the cgroup (`birth`, closed here).

    Raises:
        SpawnError: the helper failed, or the child could not set a limit or
            execute `command` (it has been reaped).
    """
    try:
        return birth.child_pid(helper)
    except _held.BornFailed as exc:
        if exc.step == "limit":
            raise SpawnError(f"could not set up the process: {exc.strerror}") from None
        if exc.errno == errno.ENOENT:
            raise SpawnError(f"command not found: {command}") from None
        if exc.errno == errno.EACCES:
            raise SpawnError(f"permission denied: {command}") from None
        raise SpawnError(f"could not start {command}: {exc.strerror}") from None
    except OSError as exc:
        raise SpawnError(f"could not start {command}: {exc.strerror or exc}") from None
    finally:
        birth.close()


def _release(popen: subprocess.Popen[bytes], hold: int, cgroup_fd: int | None,
             limits: Sequence[tuple[int, int, int]]) -> int:
    """Move the held stub into its cgroup and let it run the command
    (`_held.release`); return its pid.  `hold` (the pipe's write end) is closed.

    Raises:
        SpawnError: the move or a limit failed (the stub, closed out, exits
            without running the command, and is reaped).
    """
    try:
        _held.release(popen.pid, hold, cgroup_fd, limits)
    except OSError as exc:
        os.close(hold)
        popen.wait()
        raise SpawnError(f"could not set up the process: {exc.strerror or exc}") from None
    os.close(hold)
    return popen.pid


# -- process trees -------------------------------------------------------------------


def _children_of(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(x) for x in f.read().split())
        except OSError:
            continue
    return out


def own_children() -> list[int]:
    """Our direct children (including orphans re-parented to us)."""
    return _children_of(os.getpid())


def descendants(pid: int) -> list[int]:
    """All living descendants of `pid` (children first), read from /proc."""
    seen: list[int] = []
    stack = _children_of(pid)
    while stack:
        child = stack.pop()
        if child in seen:
            continue
        seen.append(child)
        stack.extend(_children_of(child))
    return seen


def stat_fields(pid: int | str) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name (field 3 on), or
    None when `pid` is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rfind(b")") + 2:].split()


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, process group) of `pid`, or None when gone."""
    rest = stat_fields(pid)
    return None if rest is None else (rest[0].decode(), int(rest[2]))


def start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat: when the process started (clock ticks)."""
    rest = stat_fields(pid)
    return None if rest is None else int(rest[19])


def process_group_members(pgid: int, candidates: Iterable[int]) -> list[int]:
    return [pid for pid in candidates if (st := _stat(pid)) is not None and st[1] == pgid and st[0] != "Z"]


def pidfd_or_none(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


async def wait_pidfds_gone(fds: Iterable[int]) -> None:
    """Wait until every process behind these pidfds has exited (not reaped)."""
    async with trio.open_nursery() as nursery:
        for fd in fds:
            nursery.start_soon(trio.lowlevel.wait_readable, fd)


# -- orphans ---------------------------------------------------------------------------


def set_child_subreaper() -> bool:
    """Make orphaned descendants ours (so double-forking daemons stay reapable)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except OSError:
        return False


#: A zombie child nobody owns is reaped only after it stayed unclaimed this
#: long: a helper process that a hook runs (trio.run_process, subprocess.run)
#: is our child too, and its owner collects it within milliseconds; reaping it
#: first would steal its exit status.  An orphan waits for us forever.
ORPHAN_GRACE: Final = 0.5


def reap_first_orphans(seen: dict[int, float], now: float, grace: float) -> tuple[list[tuple[int, int]], int | None]:
    """Reap unowned zombies while the kernel names one first, in O(1) per exit.

    ``waitid(P_ALL, WNOWAIT)`` names the first waitable child without reaping
    it: no listing of every child (that is `reap_orphans`).  An unowned one
    past its `grace` is reaped, and the next one asked for.  Returns the
    reaped (pid, raw status) pairs, and the pid of the zombie the pass
    stopped at: one that is owned (its `Child` reaps it) or still in its
    grace; None when no zombie is left.  `seen` is shared with
    `reap_orphans`, which forgets the sightings of processes that are no
    longer zombies; with no zombie left this forgets them all (a stale
    sighting of a reused pid could steal a status).
    """
    reaped: list[tuple[int, int]] = []
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            info = None
        if info is None:
            seen.clear()
            return reaped, None
        pid = info.si_pid
        if pid in _owned:
            return reaped, pid
        if now - seen.setdefault(pid, now) < grace:
            return reaped, pid
        del seen[pid]
        try:
            got, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            got, status = 0, 0
        if not got:  # its owner got there first, or it is gone: ask again
            continue
        reaped.append((got, status))


def reap_orphans(seen: dict[int, float] | None = None, now: float = 0.0,
                 grace: float = 0.0) -> tuple[list[tuple[int, int]], bool]:
    """Reap zombie children that no `Child` owns and nobody claimed in `grace`.

    `seen` remembers when each unowned zombie was first noticed (kept by the
    caller between passes).  Returns the reaped (pid, raw status) pairs, and
    whether zombies are still waiting for their grace period to end.
    """
    seen = {} if seen is None else seen
    reaped: list[tuple[int, int]] = []
    waiting = False
    zombies = set()
    for pid in own_children():
        if pid in _owned:
            continue
        st = _stat(pid)
        if st is None or st[0] != "Z":
            continue
        zombies.add(pid)
        first = seen.setdefault(pid, now)
        if now - first < grace:
            waiting = True
            continue
        try:
            got, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            continue
        if got:
            reaped.append((got, status))
            zombies.discard(pid)
    for pid in list(seen):
        if pid not in zombies:
            del seen[pid]
    return reaped, waiting
