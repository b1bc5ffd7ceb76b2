"""What the supervisor does as PID 1 (and, for orphans, as a subreaper).

Orphans re-parented to us are reaped (`reap_orphans`: never a child a
service owns, and never a helper before its owner could wait for it).  At
the end, as PID 1, every other process is terminated (`terminate_strays`)
and the machine is powered off, rebooted or halted (`reboot`), as
`herd power-off root`, `reboot root` or `halt root` asked.
"""

from __future__ import annotations

import math
import os
import signal
from typing import Final

import structlog
import trio

from . import _proc

__all__ = ["kernel_thread", "reap_orphans", "reboot", "terminate_strays"]

log = structlog.get_logger("supervisor")


#: How soon the first zombie is asked for again while one blocks the way
#: (its owner reaps it within milliseconds; a helper's grace runs out).
_RECHECK: Final = 0.05


async def reap_orphans() -> None:
    """Reap orphans re-parented to us (subreaper / PID 1), never an owned child,
    and never a helper process before its owner had the chance to wait for it.

    Each SIGCHLD costs O(1) (`_proc.reap_first_orphans`), and so does each
    look again while a zombie blocks the way (owned, or in its grace).  Only
    a zombie that still blocks it after the grace (an owner that does not
    reap) makes us list every child (`_proc.reap_orphans`), to reap what
    waits behind it.
    """
    seen: dict[int, float] = {}
    blocker: int | None = None
    blocked_since = 0.0
    with trio.open_signal_receiver(signal.SIGCHLD) as sigchld:
        reaped, waiting = _proc.reap_orphans(seen, trio.current_time(), _proc.ORPHAN_GRACE)
        again = trio.current_time() + _proc.ORPHAN_GRACE if waiting else math.inf
        while True:
            _log_reaped(reaped)
            with trio.move_on_at(again):
                await sigchld.__anext__()
            now = trio.current_time()
            reaped, first = _proc.reap_first_orphans(seen, now, _proc.ORPHAN_GRACE)
            if first is None:
                blocker, again = None, math.inf
                continue
            if first != blocker:
                blocker, blocked_since = first, now
            if now - blocked_since < _proc.ORPHAN_GRACE:
                again = now + _RECHECK
                continue
            more, waiting = _proc.reap_orphans(seen, now, _proc.ORPHAN_GRACE)
            reaped.extend(more)
            # behind it, helpers still in their grace; else the next SIGCHLD
            again = now + _proc.ORPHAN_GRACE if waiting else math.inf


def _log_reaped(reaped: list[tuple[int, int]]) -> None:
    for pid, status in reaped:
        log.debug("reaped orphan", pid=pid, status=status)


async def terminate_strays(grace: float = 5.0) -> None:
    """As PID 1: SIGTERM every other process, wait `grace`, then SIGKILL."""
    def others() -> list[int]:
        return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != 1 and not kernel_thread(p)]

    if not others():
        return
    log.info("terminating stray processes", count=len(others()))
    os.kill(-1, signal.SIGTERM)
    with trio.move_on_after(grace):
        while others():
            _proc.reap_orphans()  # at shutdown every zombie is an orphan: no grace
            await trio.sleep(0.05)
    if others():
        log.warning("stray processes survived SIGTERM; sending SIGKILL", count=len(others()))
        os.kill(-1, signal.SIGKILL)
        with trio.move_on_after(2):
            while others():
                _proc.reap_orphans()
                await trio.sleep(0.05)


#: PF_KTHREAD in the flags of /proc/PID/stat.
_PF_KTHREAD = 0x00200000


def kernel_thread(pid: str) -> bool:
    """Whether `pid` is a kernel thread (on a machine, not in a PID namespace):
    no signal ends one, so it is no stray."""
    fields = _proc.stat_fields(pid)
    return fields is not None and len(fields) > 6 and int(fields[6]) & _PF_KTHREAD != 0


def reboot(how: str) -> None:
    """reboot(2): power off, restart or halt (only meaningful as PID 1)."""
    import ctypes

    cmd = {"power-off": 0x4321FEDC, "reboot": 0x01234567, "halt": 0xCDEF0123}[how]
    os.sync()
    log.info("system going down", how=how)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.reboot(ctypes.c_int(cmd)) != 0:
        log.error("reboot(2) failed", how=how, errno=ctypes.get_errno())
