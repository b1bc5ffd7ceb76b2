"""Transient services: ``herd spawn NAME -- COMMAND [ARG...]`` (Shepherd 1.0's
transient services, ``systemd-run``).

A transient service is supervised like any other (its cgroup, its output
captured in ``LOG_DIR/NAME.log``), but it is not in the configuration, is
never respawned, and is forgotten once its process has ended: it leaves
`status` and the service records, while its recent lines stay readable
with ``herd log NAME`` (`Transients.ended`, the last `KEEP_ENDED`).  It runs
as the requesting user (SO_PEERCRED); only a root requester gets root.  Its
environment is a clean one (PATH, HOME, USER, LOGNAME), its directory ``/``.

Its record says it was spawned, by whom and with what command (`Spawned`,
its type state), so that a re-exec or crash recovery takes a transient
whose process still runs back under supervision (`revive`, from
`takeover.restore`) instead of leaving it running unseen.
"""

from __future__ import annotations

import os
import pwd
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Final

import structlog
import trio

from herd.protocol import ProtocolError

from ._actor import State
from ._messages import say
from ._output import LogLine, ServiceOutput
from .spec import ServiceSpec

if TYPE_CHECKING:
    from .engine import Engine
    from .service import Service

__all__ = ["Transients", "KEEP_ENDED"]

log = structlog.get_logger("supervisor.engine")

#: Ended transients whose recent log lines `herd log NAME` still shows.
KEEP_ENDED: Final = 100

#: Seconds an ended transient's output may take to be read before it is forgotten.
DRAIN: Final = 2.0

_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Spawned:
    """A transient's type state: who spawned it and its command, in its record."""

    __slots__ = ("uid", "argv")

    def __init__(self, uid: int, argv: list[str]) -> None:
        self.uid, self.argv = uid, argv

    def to_record(self) -> dict[str, Any]:
        return {"spawned-by": self.uid, "command": list(self.argv)}

    def from_record(self, data: dict[str, Any]) -> None:
        pass  # fixed at `spawn`; `revive` reads the record itself

    @staticmethod
    def parse(record: Any) -> tuple[int, list[str]] | None:
        """(uid, argv) from a transient's record; None for any other record."""
        state = record.get("type-state") if isinstance(record, dict) else None
        if not isinstance(state, dict):
            return None
        uid, argv = state.get("spawned-by"), state.get("command")
        if type(uid) is not int or not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            return None
        return uid, argv


class Transients:
    """The engine's transient services, running and ended."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.running: set[str] = set()
        self.ended: OrderedDict[str, ServiceOutput] = OrderedDict()

    def recent_log(self, name: str, n: int) -> list[LogLine] | None:
        """An ended transient's last lines; None when there is no such transient."""
        output = self.ended.get(name)
        return output.recent(n) if output is not None else None

    def _spec(self, name: str, argv: list[Any], uid: int) -> ServiceSpec:
        """The definition of a transient run by `uid`.

        Raises:
            ProtocolError: ``bad-arguments`` or ``permission-denied``.
        """
        from .config import NAME_MAX, NAME_RE

        if not NAME_RE.fullmatch(name) or len(name) > NAME_MAX:
            raise ProtocolError("bad-arguments", f"{name!r} is not a valid service name")
        if self.engine.graph.resolve(name) is not None or name in self.engine.services or name == "root":
            raise ProtocolError("bad-arguments", f"a service named {name!r} exists already")
        if not argv or not argv[0] or not all(isinstance(a, str) and "\0" not in a for a in argv):
            raise ProtocolError("bad-arguments", "usage: spawn NAME -- COMMAND [ARG...] (non-empty strings)")
        if "/" in argv[0] and not argv[0].startswith("/"):
            raise ProtocolError("bad-arguments", f"the program {argv[0]!r} is a relative path; give an "
                                                 "absolute path, or a bare name to look up on PATH")
        if uid < 0:
            raise ProtocolError("permission-denied", "the requester's user is unknown (no SO_PEERCRED)")
        me = os.geteuid()
        if me != 0 and uid != me:
            raise ProtocolError("permission-denied", f"this supervisor runs as uid {me}: it cannot run "
                                                     f"a command as uid {uid}")
        try:
            pw = pwd.getpwuid(uid)
        except KeyError:
            raise ProtocolError("permission-denied", f"uid {uid} has no user entry to run as") from None
        env = (("HOME", pw.pw_dir), ("LOGNAME", pw.pw_name), ("PATH", _PATH), ("USER", pw.pw_name))
        return ServiceSpec(
            name=name, command=tuple(argv), documentation=f"Transient service, spawned by {pw.pw_name}.",
            auto_start=False, respawn=False, clear_environment=True, environment=env,
            user=uid if me == 0 and uid != 0 else None, type_state=Spawned(uid, list(argv)),
            source=f"spawn {name}")

    def revive(self, name: str, record: dict[str, Any]) -> bool:
        """Before the engine runs (a re-exec, crash recovery): put back the
        transient whose record this is, its process still running, so that
        `takeover.restore` adopts it.  False (and a warning) when it can no
        longer be defined: a service of the configuration took the name, or
        its user is gone."""
        parsed = Spawned.parse(record)
        if parsed is None:
            return False
        uid, argv = parsed
        try:
            spec = self._spec(name, argv, uid)
        except ProtocolError as exc:
            log.warning("a transient service's process is left alone", service=name, pid=record.get("pid"),
                        reason=exc.message)
            return False
        self.engine.services[name] = self.engine._new_service(spec)
        self.running.add(name)
        return True

    async def spawn(self, name: str, argv: list[Any], uid: int) -> dict[str, Any]:
        """Start a transient service; reply once its process runs.

        Raises:
            ProtocolError: as `_spec`, or ``start-failed``.
        """
        spec = self._spec(name, argv, uid)
        engine = self.engine
        self.ended.pop(name, None)
        await engine.add_service(spec)
        service = engine.services[name]
        self.running.add(name)
        outcome = await service.start(operator=False)
        if not outcome.ok:
            self._forget(service)
            raise ProtocolError(outcome.code or "start-failed", outcome.message)
        pid = service.child.pid if service.child is not None else None
        say(f"Service {name} has been started" + (f" (PID {pid})." if pid else "."))
        return {"service": name, "pid": pid, "state": service.state.value, "log-file": str(service.output.path)}

    def on_state(self, service: Service, new: State) -> None:
        """Every state change: a transient that stopped is forgotten."""
        if new is State.STOPPED and service.name in self.running and self.engine.services.get(
                service.name) is service and service.spec.source.startswith("spawn "):
            self.engine.start_soon(self._forget_soon, service)

    async def _forget_soon(self, service: Service) -> None:
        """Once what the process wrote last is read (at most `DRAIN` s), forget it."""
        with trio.move_on_after(DRAIN):
            while service.output.reading:  # a pipe has data or a writer left
                await trio.sleep(0.01)
        await trio.lowlevel.checkpoint()
        if service.state is State.STOPPED and service.name in self.running:
            self._forget(service)

    def _forget(self, service: Service) -> None:
        name = service.name
        self.running.discard(name)
        if self.engine.services.get(name) is service:
            self.engine.remove_service(name)
        self.ended[name] = service.output
        while len(self.ended) > KEEP_ENDED:
            self.ended.popitem(last=False)
        log.info("transient service ended", service=name,
                 exit=service.last_exit.to_json() if service.last_exit else None)
