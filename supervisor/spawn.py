"""Spawning a service's process: its descriptors, environment and cgroup.

The child gets the service's output pipes as stdout/stderr, its listening
sockets (socket activation), the pipes' read ends as guard descriptors (so
that a crash of the supervisor loses none of its output: docs/keeper.md),
and `NOTIFY_SOCKET`/`WATCHDOG_USEC` when it reports readiness by notify.  It
starts inside the service's cgroup.  The caller (the actor, or its start
worker) keeps the child and the guards' record.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from . import _guard, _proc
from .spec import ServiceSpec

if TYPE_CHECKING:
    from .service import Service

__all__ = ["spawn_process", "extra_env"]


def spawn_process(service: Service, spec: ServiceSpec, out: int,
                  err: int) -> tuple[_proc.Child, dict[str, dict[str, int]]]:
    """Start the command in the service's cgroup.

    Returns the child, and where it holds each stream's guard (stream →
    `_guard.record`), which the service records for a takeover.

    Raises:
        _proc.SpawnError: it could not be started.
    """
    try:
        cgroup_fd = service.containment.open_for_spawn()
    except OSError as exc:
        raise _proc.SpawnError(f"cannot use the cgroup of {service.name}: {exc.strerror or exc}") from None
    listen_fds = [(sock.fileno(), s.name) for sock, s in zip(service.listeners, spec.sockets)]
    readers = service.output.pipes  # its guards
    try:
        child = _proc.spawn(spec, stdout=out, stderr=err, extra_env=extra_env(service),
                            listen_fds=listen_fds, cgroup_fd=cgroup_fd, guard_fds=[*readers.values()])
    finally:
        if cgroup_fd is not None:
            os.close(cgroup_fd)
    numbers = _proc.guard_numbers([*readers.values()], len(listen_fds))
    guards = {stream: _guard.record(r, n) for (stream, r), n in zip(readers.items(), numbers)}
    return child, guards


def extra_env(service: Service) -> dict[str, str]:
    """The environment the supervisor adds for the service's readiness protocol."""
    env: dict[str, str] = {}
    if service.spec.ready.type == "notify" and service.notify_socket is not None:
        env["NOTIFY_SOCKET"] = str(service.notify_socket)
        if service.spec.watchdog_sec:
            env["WATCHDOG_USEC"] = str(int(service.spec.watchdog_sec * 1_000_000))
    return env
