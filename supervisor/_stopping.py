"""Taking a service's processes down: per kill-mode, with a grace period.

Also `Strays`: what a starting pid-file daemon forked away from us, killed
if its start fails.
"""

from __future__ import annotations

import math
import os
import signal
from collections.abc import Callable

import trio

from . import _proc
from ._containment import KILL_WAIT, Containment
from .spec import ServiceSpec

__all__ = ["terminate", "Strays", "KILL_WAIT"]


class Strays:
    """Processes a starting pid-file service forked, found while it starts.

    Held by pidfd, so a reused pid is never signalled.  Used only to clean up
    after a failed start: a daemon that double-forked and called setsid is in
    no process group or tree of ours any more.
    """

    def __init__(self) -> None:
        self.before = set(_proc.own_children())
        self.launcher: _proc.Child | None = None
        self.fds: dict[int, int] = {}

    def scan(self) -> None:
        pids: set[int] = set()
        if self.launcher is not None and self.launcher.alive:
            pids.update(_proc.descendants(self.launcher.pid))
        pids.update(set(_proc.own_children()) - self.before - _proc.owned_pids())
        for pid in pids - self.fds.keys():
            fd = _proc.pidfd_or_none(pid)
            if fd is not None:
                self.fds[pid] = fd

    async def kill(self) -> None:
        self.scan()
        owned = _proc.owned_pids()  # adopted meanwhile by a service: not ours to kill
        targets = [fd for pid, fd in self.fds.items() if pid not in owned]
        for fd in targets:
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            except OSError:
                pass
        with trio.move_on_after(KILL_WAIT):
            await _proc.wait_pidfds_gone(targets)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()



async def terminate(child: _proc.Child | None, spec: ServiceSpec, note: Callable[[str], None],
                    containment: Containment | None = None) -> None:
    """Stop a service's processes per its kill-mode; return when they are gone.

    Sends `stop-signal`, waits `stop-timeout`, then SIGKILLs what is left.
    With a cgroup, "gone" means the cgroup is empty (except under kill-mode
    "process", which stops the main process only), and the SIGKILL is
    ``cgroup.kill``: nothing that forked, double-forked or called setsid
    survives.  `child` may be None when only left-over processes remain.
    """
    if containment is not None and containment.cgroup is not None:
        await _terminate_cgroup(child, spec, note, containment)
        return
    if child is None:
        return
    mode = spec.kill_mode
    extra: list[int] = []
    if mode == "tree":
        extra = _proc.descendants(child.pid)
    elif mode == "process-group":
        owned = _proc.owned_pids()
        candidates = _proc.descendants(child.pid) + [
            # orphans re-parented to us; supervised main processes each lead a
            # session of their own, so they are never in this group (skipping
            # them keeps stopping N services O(N), not O(N²))
            p for p in _proc.own_children() if p not in owned
        ]
        pgid = child.pgid()
        extra = _proc.process_group_members(pgid, candidates) if pgid is not None else []
    fds = [fd for fd in map(_proc.pidfd_or_none, extra) if fd is not None]
    try:
        _signal_all(child, mode, fds, spec.stop_signal)
        with trio.move_on_after(spec.stop_timeout) as scope:
            await child.exited.wait()
            await _proc.wait_pidfds_gone(fds)
        if scope.cancelled_caught:
            note(f"Grace period of {spec.stop_timeout:g} s is over; sending SIGKILL to {spec.name}.")
            if mode == "tree" and child.alive:
                for pid in _proc.descendants(child.pid):
                    fd = _proc.pidfd_or_none(pid)
                    if fd is not None:
                        fds.append(fd)
            _signal_all(child, mode, fds, signal.SIGKILL)
            with trio.move_on_after(KILL_WAIT):
                await child.exited.wait()
                await _proc.wait_pidfds_gone(fds)
    finally:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass


def _signal_all(child: _proc.Child, mode: str, fds: list[int], sig: int) -> None:
    if mode == "process-group":
        child.signal_group(sig)
    else:
        child.signal(sig)
    if mode != "process":
        for fd in fds:
            try:
                signal.pidfd_send_signal(fd, sig)
            except OSError:
                pass
    if sig != signal.SIGKILL:
        # a stopped (SIGSTOP) process must run to act on the signal
        if mode == "process-group":
            child.signal_group(signal.SIGCONT)
        else:
            child.signal(signal.SIGCONT)


async def _terminate_cgroup(child: _proc.Child | None, spec: ServiceSpec, note: Callable[[str], None],
                            containment: Containment) -> None:
    mode = spec.kill_mode
    if mode == "process":  # the main process only: what else is in the cgroup stays
        if child is None or not child.alive:
            return
        _signal_all(child, mode, [], spec.stop_signal)
        with trio.move_on_after(spec.stop_timeout) as scope:
            await child.exited.wait()
        if scope.cancelled_caught:
            note(f"Grace period of {spec.stop_timeout:g} s is over; sending SIGKILL to {spec.name}.")
            child.signal(signal.SIGKILL)
            with trio.move_on_after(KILL_WAIT):
                await child.exited.wait()
        return
    assert containment.cgroup is not None
    # process-group: the main process's group first; the rest of the cgroup
    # (setsid, a double fork) once the group is gone.  The group's members
    # are looked up only if the cgroup is not empty once the main process
    # is gone (the common case costs one read of cgroup.events, not one of
    # cgroup.procs and a /proc/PID/stat per member).
    pgid = child.pgid() if child is not None and child.alive and mode == "process-group" else None
    if pgid is not None:
        _signal_all(child, mode, [], spec.stop_signal)
    else:  # tree (or nothing but left-overs): every process in the cgroup
        containment.cgroup.signal(spec.stop_signal, cont=True)
    empty = False
    group: list[int] = []  # pidfds of the group's members still there
    try:
        with trio.move_on_after(spec.stop_timeout) as scope:
            if child is not None:
                await child.exited.wait()
            if pgid is not None:
                empty = not containment.populated()
                if not empty:
                    members = _proc.process_group_members(pgid, containment.pids())
                    group = [fd for fd in map(_proc.pidfd_or_none, members) if fd is not None]
                    await _proc.wait_pidfds_gone(group)
                    # the group is gone; the others get the stop-signal too,
                    # within the same grace period
                    containment.cgroup.signal(spec.stop_signal, cont=True)
            if not empty:
                empty = await containment.wait_empty(math.inf)
    finally:
        for fd in group:
            os.close(fd)
    if scope.cancelled_caught:
        note(f"Grace period of {spec.stop_timeout:g} s is over; sending SIGKILL to {spec.name}.")
    if not empty and containment.populated():
        # Grace over, or the group is gone but others (setsid, double fork) are
        # left: the stop is complete only when the cgroup is empty.
        if not await containment.kill_all():
            note(f"Processes of {spec.name} survived SIGKILL for {KILL_WAIT:g} s.")
    if child is not None and child.alive:
        with trio.move_on_after(KILL_WAIT):
            await child.exited.wait()
