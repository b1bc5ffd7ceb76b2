"""Re-executing the supervisor in place: the procedure (SIGUSR1, `herd reexec root`).

`Reexec` checks the new image, waits for calm (no service starting or
stopping, no request in flight, no reload under way), hands everything
over and executes; refused, cancelled or failed, it serves clients again
as if nothing happened.  The mechanics (the check in a child process, the
handover file, the exec with signals held) are in `_reexec`.  It also
carries the request to shut down (`request_shutdown`), which the signal
handler and the `stop root`/`power-off root` actions share with it.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import trio

from herd.protocol import ProtocolError

from . import takeover
from ._reexec import check_new_image, exec_self

if TYPE_CHECKING:
    from .control import ControlServer
    from .engine import Engine

__all__ = ["QUIESCE_TIMEOUT", "Reexec"]

log = structlog.get_logger("supervisor")

#: How long a re-exec waits for services in transition before it gives up.
QUIESCE_TIMEOUT = 10.0


class Reexec:
    """Re-execute in place: check the new image, wait for calm, hand over, exec."""

    def __init__(self, engine: Engine, state_dir: Path, sockets: dict[str, Any], *, lock_fd: int,
                 nofile: tuple[int, int]) -> None:
        self.engine = engine
        self.state_dir = state_dir
        self.sockets = sockets
        self.lock_fd = lock_fd
        self.nofile = nofile  # the open-files limit we were given, for children
        self._lock = trio.Lock()
        self.shutdown = trio.Event()
        self.how = "exit"
        self.servers: list[ControlServer] = []  # their connections are handed over too
        self.signals: Any = None  # the signal receiver (SIGHUPs not yet acted on at the exec)
        self._holding_reloads = False  # prepare() took the engine's reload lock

    def request_shutdown(self, how: str) -> None:
        """Stop every service and exit ("exit"), or then power off/reboot/halt as PID 1."""
        if not self.shutdown.is_set():
            self.how = how
            self.shutdown.set()

    async def prepare(self, requester: Any = None) -> None:
        """Everything that can fail, before anything is touched; then stop
        dispatching requests and let those in flight finish, so that each
        is answered by this image (what arrives meanwhile is answered by the
        next one).  `requester`: the connection asking for the re-exec.

        Raises:
            ProtocolError: the new image fails its check, services or
                requests stay busy.
        """
        if self._lock.locked():
            raise ProtocolError("action-failed", "a re-exec is already under way")
        async with self._lock:
            await check_new_image(self.engine.config.source, self.state_dir)
            with trio.move_on_after(QUIESCE_TIMEOUT):
                while self.engine.busy():
                    await trio.sleep(0.01)
            busy = self.engine.busy()
            if busy:
                raise ProtocolError("action-failed",
                                    f"re-exec refused: still starting or stopping after "
                                    f"{QUIESCE_TIMEOUT:g} s: {', '.join(busy)}")
            for server in self.servers:
                server.pause()
            try:
                await self._drain(requester)
            except BaseException:  # refused or cancelled: dispatch again, as if nothing happened
                self._resume_clients()
                raise

    async def _drain(self, requester: Any) -> None:
        """Wait until no request is in flight and no service is starting or
        stopping (a request answered just now may have started one), then
        hold every reload."""

        def requests() -> int:
            return sum(server.busy(requester) for server in self.servers) + len(self.engine.busy())

        with trio.move_on_after(QUIESCE_TIMEOUT):
            while requests():
                await trio.sleep(0.01)
        if requests():
            raise ProtocolError("action-failed", f"re-exec refused: {requests()} request(s) or "
                                                 f"service(s) still busy after {QUIESCE_TIMEOUT:g} s")
        # No reload may run across the exec: the configuration in force is
        # what is handed over.  A reload asked for from now on (SIGHUP) is
        # carried out by the new image.
        await self.engine.hold_reloads()
        self._holding_reloads = True

    def _resume_clients(self) -> None:
        for server in self.servers:
            server.pause(False)
        if self._holding_reloads:
            self._holding_reloads = False
            self.engine.release_reloads()

    def execute(self) -> None:
        """Hand over and exec.  Returns only if something failed before or in
        the exec itself; then every client is served again."""
        try:
            self._execute()
        finally:  # still here: the exec failed
            self._resume_clients()

    def _execute(self) -> None:
        self.engine.flush_records()
        services = takeover.describe(self.engine)
        sockets = {name: sock.fileno() for name, sock in self.sockets.items()}
        if self.engine.keeper is not None and self.engine.keeper.sock is not None:
            sockets["keeper"] = self.engine.keeper.sock.fileno()
        fds = [*sockets.values(), self.lock_fd]  # the lock stays held: same open file
        for passed in services.values():
            if passed["pidfd"] is not None:
                fds.append(passed["pidfd"])
            fds.extend(passed["listeners"])
            fds.extend(fd for pair in passed["output"]["pipes"].values() for fd in pair)
        connections = [state for server in self.servers for state in server.handover()]
        fds.extend(state["fd"] for state in connections)
        handover: dict[str, Any] = {"version": 1, "sockets": sockets, "services": services,
                                    "lock": self.lock_fd, "nofile": list(self.nofile),
                                    "events": self.engine.events.handover(),
                                    "connections": connections}
        if self.engine.config.source is not None:
            handover["config"] = {"path": str(self.engine.config.path),
                                  "source": self.engine.config.source.decode("utf-8")}
        def reload_pending(handover: dict[str, Any]) -> None:
            # with signals blocked: a reload asked for (SIGHUP) but not done
            # here is done by the new image
            hup = signal.SIGHUP in (getattr(self.signals, "_pending", None) or {})
            handover["reload"] = hup or self.engine.reloads_waiting > 0

        exec_self(self.state_dir, handover, fds, reload_pending)

    async def on_signal(self) -> None:
        if self._lock.locked():  # the re-exec under way will pick up the same new code
            log.info("re-exec already under way; SIGUSR1 merged into it")
            return
        try:
            await self.prepare()
        except ProtocolError as exc:
            log.error("re-exec refused", reason=exc.message)
            return
        self.execute()
