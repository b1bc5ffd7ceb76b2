"""inetd-style sockets (``accept = true``): one instance per connection.

Like Shepherd's ``make-inetd-constructor`` and systemd's ``Accept=yes``: a
service whose sockets all have ``accept = true`` is ``running`` while it
listens, with no main process.  Each connection is accepted by the
supervisor and handed to a new instance of ``command`` as its stdin and
stdout (stderr goes to the service's log), in the service's cgroup, with
``REMOTE_ADDR``/``REMOTE_PORT`` for TCP.  At most ``max-connections``
instances run at once per socket; a connection beyond that is closed at
once (and noted in the log).  Stopping the service stops accepting and
sends every instance the stop signal (SIGKILL after ``stop-timeout``).
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING, Any

import structlog
import trio

from . import _proc
from .spec import SocketSpec

if TYPE_CHECKING:
    from .service import Service

__all__ = ["Inetd"]

log = structlog.get_logger("supervisor.service")


class Inetd:
    """The accept loops and instances of one ``accept`` service (the actor's)."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self._scope: trio.CancelScope | None = None
        self.instances: dict[int, _proc.Child] = {}  # pid → instance
        self.per_socket: dict[str, int] = {}  # socket name → running instances
        self.accepted = 0

    def arm(self, nursery: trio.Nursery) -> None:
        """The service is running: accept on every socket."""
        self._scope = trio.CancelScope()
        for spec, sock in zip(self.service.spec.sockets, self.service.listeners):
            nursery.start_soon(self._accept_loop, spec, sock, self._scope)

    def disarm(self) -> None:
        """The service leaves `running`: stop accepting, stop the instances."""
        if self._scope is None:
            return
        self._scope.cancel()
        self._scope = None
        svc = self.service
        for child in list(self.instances.values()):
            child.signal_group(svc.spec.stop_signal)
        if self.instances and svc._nursery is not None:
            svc._nursery.start_soon(self._kill_late, list(self.instances.values()))

    def to_json(self) -> dict[str, Any]:
        return {"connections": len(self.instances), "accepted": self.accepted,
                "max-connections": {s.name: s.max_connections for s in self.service.spec.sockets}}

    async def _kill_late(self, children: list[_proc.Child]) -> None:
        with trio.move_on_after(self.service.spec.stop_timeout):
            for child in children:
                await child.exited.wait()
            return
        for child in children:
            if child.alive:
                child.signal_group(9)

    async def _accept_loop(self, spec: SocketSpec, sock: socket.socket, scope: trio.CancelScope) -> None:
        with scope:
            while True:
                await trio.lowlevel.wait_readable(sock)
                try:
                    sock.setblocking(False)
                    conn, peer = sock.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:  # EMFILE and the like: wait a little, never spin
                    log.warning("accept failed", socket=spec.name, error=exc.strerror)
                    await trio.sleep(0.1)
                    continue
                with conn:
                    self._serve(spec, conn, peer)

    def _serve(self, spec: SocketSpec, conn: socket.socket, peer: Any) -> None:
        svc = self.service
        if self.per_socket.get(spec.name, 0) >= spec.max_connections:
            svc.output.note(f"Connection on {spec.name} refused: {spec.max_connections} instances "
                            "run already (max-connections).")
            return
        conn.setblocking(True)
        env = {}
        if isinstance(peer, tuple) and len(peer) >= 2:
            env = {"REMOTE_ADDR": str(peer[0]), "REMOTE_PORT": str(peer[1])}
        assert svc._nursery is not None
        try:
            try:
                cgroup_fd = svc.containment.open_for_spawn()
            except OSError as exc:
                raise _proc.SpawnError(f"cannot use the cgroup: {exc.strerror or exc}") from None
            try:
                with svc.output.writers(svc._nursery) as (_out, err):
                    child = _proc.spawn(svc.spec, stdin=conn.fileno(), stdout=conn.fileno(), stderr=err,
                                        extra_env=env, cgroup_fd=cgroup_fd)
            finally:
                if cgroup_fd is not None:
                    os.close(cgroup_fd)
        except _proc.SpawnError as exc:
            svc.output.note(f"Instance of {svc.name} failed to start: {exc}")
            return
        self.accepted += 1
        self.instances[child.pid] = child
        self.per_socket[spec.name] = self.per_socket.get(spec.name, 0) + 1
        svc.output.note(f"Instance of {svc.name} started for a connection on {spec.name} (PID {child.pid}).")
        svc._nursery.start_soon(self._reap, spec.name, child)
        self._changed()

    async def _reap(self, name: str, child: _proc.Child) -> None:
        status = await child.wait()
        self.instances.pop(child.pid, None)
        self.per_socket[name] = max(0, self.per_socket.get(name, 1) - 1)
        self.service.output.note(f"Instance of {self.service.name} (PID {child.pid}) {status.describe()}.")
        self._changed()

    def _changed(self) -> None:
        """The counts are part of the service's status: drop its cached reply."""
        if self.service.on_change is not None:
            self.service.on_change(self.service.name)
