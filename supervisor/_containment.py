"""Which processes are a service's, and how to empty a service of them.

With cgroups (the normal case) a service's processes are exactly those in its
cgroup: a daemon that forks, double-forks or calls setsid is still there, and
nothing outside it can speak for the service.  Without a writable cgroup v2
hierarchy (`Containment.cgroup` is None) the supervisor falls back to what a
process tree tells: the main process, its session and its descendants.

Whatever the mode, a PID is never believed when it is the supervisor, PID 1,
or a process of another service (`why_untrusted`).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterable

import trio

from ._cgroup import ServiceCgroup, Watcher
from ._notify_server import ancestors, session_of

__all__ = ["Containment", "KILL_WAIT"]

#: After SIGKILL, how long to wait for the processes to vanish.
KILL_WAIT = 10.0


class Containment:
    """One service's processes: its cgroup, or (fallback) its process tree."""

    def __init__(self, name: str, cgroup: ServiceCgroup | None, watcher: Watcher | None,
                 owner_of: Callable[[int], str | None]) -> None:
        self.name = name
        self.cgroup = cgroup
        self.watcher = watcher
        self._owner_of = owner_of  # which service a PID belongs to (None: none)
        self._refused: set[str] = set()  # reasons already logged (once per service)

    @property
    def mode(self) -> str:
        return "cgroup" if self.cgroup is not None else "process-tree"

    # -- spawning ---------------------------------------------------------------------

    def open_for_spawn(self) -> int | None:
        """The fd a new child writes to join the cgroup (caller closes it), or None.

        Raises:
            OSError: the cgroup cannot be created or opened.
        """
        if self.cgroup is None:
            return None
        self.cgroup.ensure()
        if self.watcher is not None:
            self.watcher.watch(self.cgroup)
        return self.cgroup.open_procs()

    def pids(self) -> set[int]:
        return set(self.cgroup.pids()) if self.cgroup is not None else set()

    def populated(self) -> bool:
        return self.cgroup is not None and self.cgroup.populated()

    # -- trust ------------------------------------------------------------------------

    def why_untrusted(self, pid: int, main: int | None, also: Iterable[int] = ()) -> str | None:
        """None if `pid` is one of this service's processes, else why not.

        `main` is the current main process (fallback: its session and
        descendants count); `also` lists PIDs the start has seen the service
        fork (fallback only: a daemon that double-forked and left the session).
        """
        if pid <= 1:
            return "it is PID 1"
        if pid == os.getpid():
            return "it is the supervisor itself"
        owner = self._owner_of(pid)
        if owner is not None and owner != self.name:
            return f"it is a process of service {owner}"
        if self.cgroup is not None:
            return None if self.cgroup.contains(pid) else "it is not in the service's cgroup"
        if main is not None and (pid == main or session_of(pid) == main or main in ancestors(pid)):
            return None
        if pid in set(also):
            return None
        return "it is not in the service's session or process tree"

    def refused_once(self, reason: str) -> bool:
        """True the first time a refusal for `reason` is seen (log it then)."""
        if reason in self._refused:
            return False
        self._refused.add(reason)
        return True

    # -- emptying ---------------------------------------------------------------------

    async def wait_empty(self, timeout: float) -> bool:
        """Wait (at most `timeout`) until the cgroup is empty; True if it is."""
        if self.cgroup is None:
            return True
        if self.watcher is None:  # no inotify: a bounded poll
            with trio.move_on_after(timeout):
                while self.cgroup.populated():
                    await trio.sleep(0.05)
            return not self.cgroup.populated()
        with trio.move_on_after(timeout) as scope:
            await self.watcher.wait_empty(self.cgroup)  # returns once it read "not populated"
        return not scope.cancelled_caught or not self.cgroup.populated()

    async def kill_all(self) -> bool:
        """SIGKILL whatever is in the cgroup; wait until it is empty."""
        if self.cgroup is None:
            return True
        self.cgroup.kill()
        return await self.wait_empty(KILL_WAIT)

    async def sweep(self, stop_signal: int, timeout: float, note: Callable[[str], None],
                    *, only: set[int] | None = None) -> None:
        """Stop what is left in the cgroup: `stop_signal`, `timeout`, then SIGKILL.

        `only`: stop just these PIDs (what a failed start forked), leaving the
        rest alone (kill-mode "process", whose cgroup may hold guests).
        """
        if self.cgroup is None:
            return
        pids = self.pids() if only is None else self.pids() & only
        if not pids:
            return
        note(f"Stopping {len(pids)} process(es) left in the cgroup of {self.name}.")
        if only is not None:
            await _signal_wait_kill(pids, stop_signal, timeout)
            return
        self.cgroup.signal(stop_signal, cont=True)
        if not await self.wait_empty(timeout):
            note(f"Processes of {self.name} still there after {timeout:g} s; sending SIGKILL.")
            await self.kill_all()

    def stats(self) -> dict[str, int | None] | None:
        return self.cgroup.stats() if self.cgroup is not None else None


async def _signal_wait_kill(pids: set[int], sig: int, timeout: float) -> None:
    """Signal these processes (by pidfd), wait for them, SIGKILL after `timeout`."""
    fds = [fd for fd in (_pidfd(p) for p in pids) if fd is not None]
    try:
        for how in (sig, signal.SIGKILL):
            for fd in fds:
                try:
                    signal.pidfd_send_signal(fd, how)
                except OSError:
                    pass
            with trio.move_on_after(timeout if how == sig else KILL_WAIT) as scope:
                async with trio.open_nursery() as nursery:
                    for fd in fds:
                        nursery.start_soon(trio.lowlevel.wait_readable, fd)
            if not scope.cancelled_caught:
                return
    finally:
        for fd in fds:
            os.close(fd)


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None
