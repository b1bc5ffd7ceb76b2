"""Open files: what the configuration needs, and the daemon's RLIMIT_NOFILE.

Descriptors the daemon holds:

* per service with a command: the read ends of its stdout and stderr pipes
  and the pidfd of its running process: `PER_SERVICE`; plus one per
  listening socket (`sockets`).  The write ends are opened for each spawn
  and closed once the child has them; the guards (`_guard`) are in the
  service's table, not in ours;
* log files: `_logfile.MAX_OPEN` at most, however many services (the least
  recently written one is closed);
* the supervisor itself (`BASE`: its own files, sockets, event loop, the
  reserve kept for clients when the table is full) and its clients
  (`MAX_CLIENTS` per control socket).

The keeper (docs/keeper.md) holds the read ends and the listening sockets
again, in its own table: 2 per service, with the same hard limit (it raises
its soft limit to it).

At start the soft limit is raised to the hard limit and, as root, the hard
limit too when the configuration needs more (up to ``fs.nr_open``).
Children get the limit the supervisor was given (`child_nofile`), unless
their ``resource-limits`` set ``nofile``: set by the spawn helper or by the
supervisor (prlimit(2)) when the child is born in or moved into its cgroup
(`_held`), else by running it through ``prlimit`` (`restore_wrapper`): a
``preexec_fn`` would turn Popen's vfork into a full fork of the daemon
(30 ms instead of 4 per spawn at a few thousand services).
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
from collections.abc import Iterable
from typing import Final

from herd.protocol import MAX_CLIENTS

from ._logfile import MAX_OPEN
from .spec import ServiceSpec

__all__ = ["PER_SERVICE", "BASE", "needed", "raise_nofile", "shortfall", "child_nofile", "set_child_nofile",
           "restore_wrapper"]

PER_SERVICE: Final = 3
#: The supervisor's own descriptors (standard streams, event loop, control,
#: status and notify sockets, lock, state files being written, helper
#: processes' pipes, the reserve for clients): measured about 20, kept at 64.
BASE: Final = 64

_NOFILE = resource.RLIMIT_NOFILE
#: (soft, hard) the supervisor was started with, when it changed its own limit.
_child_nofile: tuple[int, int] | None = None


def needed(services: Iterable[ServiceSpec]) -> int:
    """Descriptors the daemon needs for these services, its clients and itself."""
    total = BASE + 2 * MAX_CLIENTS + MAX_OPEN
    for spec in services:
        total += (PER_SERVICE if spec.command is not None else 0) + len(spec.sockets)
    return total


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20


def raise_nofile(need: int) -> tuple[int, int]:
    """Raise this process's open-files limit (soft to hard; as root, hard to
    what `need` asks, up to ``fs.nr_open``).  Returns the limit it had."""
    original = resource.getrlimit(_NOFILE)
    soft, hard = original
    if os.geteuid() == 0 and need > hard:
        target = min(_nr_open(), need)
        try:
            resource.setrlimit(_NOFILE, (target, target))
            soft, hard = target, target
        except (ValueError, OSError):  # no CAP_SYS_RESOURCE (a container): keep the hard limit
            pass
    if soft < hard:
        try:
            resource.setrlimit(_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
    return original


def shortfall(services: list[ServiceSpec]) -> str | None:
    """One line saying the open-files limit cannot cover the configuration, or None."""
    need = needed(services)
    limit = resource.getrlimit(_NOFILE)[0]
    if need <= limit:
        return None
    with_command = sum(1 for s in services if s.command is not None)
    sockets = sum(len(s.sockets) for s in services)
    return (f"open-files limit {limit} is too low for this configuration: it needs about {need} "
            f"descriptors ({with_command} services with a command x {PER_SERVICE}, {sockets} listening "
            f"sockets, {need - with_command * PER_SERVICE - sockets} for the supervisor, its clients "
            f"and log files); raise the hard limit (ulimit -Hn, LimitNOFILE=)")


def set_child_nofile(original: tuple[int, int]) -> None:
    """Remember the limit children get (the one the supervisor was started with)."""
    global _child_nofile
    _child_nofile = original if tuple(original) != resource.getrlimit(_NOFILE) else None


def child_nofile(limits: Iterable[tuple[str, int, int]]) -> tuple[str, int, int] | None:
    """The ``nofile`` limit to set in a child, unless its own limits set it or ours is unchanged."""
    if _child_nofile is None or any(name == "nofile" for name, _, _ in limits):
        return None
    return ("nofile", *_child_nofile)


@functools.cache
def _prlimit() -> str | None:
    return shutil.which("prlimit", path=os.defpath + ":/usr/sbin:/sbin")


def restore_wrapper(nofile: tuple[str, int, int]) -> tuple[str, ...] | None:
    """An exec wrapper that sets the child's open-files limit, then execs the
    command unchanged (util-linux ``prlimit``: no shell, no change to the
    environment); None where there is no ``prlimit``."""
    path = _prlimit()
    if path is None:
        return None
    _, soft, hard = nofile
    value = ":".join("unlimited" if v < 0 or v == resource.RLIM_INFINITY else str(int(v)) for v in (soft, hard))
    return (path, f"--nofile={value}", "--")
