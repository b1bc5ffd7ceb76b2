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

import structlog
import trio

from . import _proc

__all__ = ["reap_orphans", "reboot", "terminate_strays"]

log = structlog.get_logger("supervisor")


async def reap_orphans() -> None:
    """Reap orphans re-parented to us (subreaper / PID 1), never an owned child,
    and never a helper process before its owner had the chance to wait for it.

    Each SIGCHLD costs O(1) (`_proc.reap_first_orphans`); only when a zombie
    is left waiting (owned, or in its grace) is every child listed, once the
    grace is over (`_proc.reap_orphans`), however many SIGCHLDs come meanwhile.
    """
    seen: dict[int, float] = {}
    with trio.open_signal_receiver(signal.SIGCHLD) as sigchld:
        reaped, waiting = _proc.reap_orphans(seen, trio.current_time(), _proc.ORPHAN_GRACE)
        scan_at = trio.current_time() + _proc.ORPHAN_GRACE if waiting else math.inf
        while True:
            _log_reaped(reaped)
            with trio.move_on_at(scan_at):
                await sigchld.__anext__()
            now = trio.current_time()
            if now >= scan_at:
                reaped, waiting = _proc.reap_orphans(seen, now, _proc.ORPHAN_GRACE)
                scan_at = now + _proc.ORPHAN_GRACE if waiting else math.inf
            else:
                reaped, waiting = _proc.reap_first_orphans(seen, now, _proc.ORPHAN_GRACE)
                if waiting:
                    scan_at = min(scan_at, now + _proc.ORPHAN_GRACE)


def _log_reaped(reaped: list[tuple[int, int]]) -> None:
    for pid, status in reaped:
        log.debug("reaped orphan", pid=pid, status=status)


async def terminate_strays(grace: float = 5.0) -> None:
    """As PID 1: SIGTERM every other process, wait `grace`, then SIGKILL."""
    def others() -> list[int]:
        return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != 1]

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


def reboot(how: str) -> None:
    """reboot(2): power off, restart or halt (only meaningful as PID 1)."""
    import ctypes

    cmd = {"power-off": 0x4321FEDC, "reboot": 0x01234567, "halt": 0xCDEF0123}[how]
    os.sync()
    log.info("system going down", how=how)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.reboot(ctypes.c_int(cmd)) != 0:
        log.error("reboot(2) failed", how=how, errno=ctypes.get_errno())
