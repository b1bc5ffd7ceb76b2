"""`supervisor`: the daemon's command line, and the wiring of its tasks.

This module only wires: config → engine → control servers, plus the signal
and orphan-reaping loops.  It runs in the foreground; it never daemonizes.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import socket
import sys
from functools import partial
from pathlib import Path
from typing import Any

import structlog
import trio

from herd.protocol import ProtocolError, default_paths

from . import __version__, _limits, _proc
from ._cgroup import CgroupUnavailable, Hierarchy
from ._hostcheck import check_host, log_findings
from ._instance import InstanceLock, instance_name, notify_dir, prepare_notify_dir
from ._keeper_link import KeeperLink
from ._logging import configure_logging
from ._notify import sd_notify
from ._notify_server import NotifyServer, bound_path
from ._reexec import check_new_image, config_in_force, exec_self, take_handover
from ._state import StateStore
from .config import Config, Settings, describe_services, load_config
from .control import ControlServer, SocketInUse, bind_unix_socket, prepare_socket_dir
from .engine import Engine
from .schema import ConfigErrors

__all__ = ["main"]

log = structlog.get_logger("supervisor")

#: How long a re-exec waits for services in transition before it gives up.
QUIESCE_TIMEOUT = 10.0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="supervisor", description="Supervise the services of a VM host.")
    p.add_argument("-c", "--config", help="configuration file (TOML)")
    p.add_argument("-s", "--socket", help="read-write control socket")
    p.add_argument("--status-socket", help="read-only status socket")
    p.add_argument("--state-dir", help="directory for state")
    p.add_argument("--log-dir", help="directory for service logs")
    p.add_argument("--log-format", choices=("console", "json"), help="format of the supervisor's own log")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.add_argument("--no-cgroups", action="store_true",
                   help="track services by process group and tree, not by cgroup (the fallback)")
    p.add_argument("--check", action="store_true", help="validate the configuration, print the services, exit")
    p.add_argument("--no-host-checks", action="store_true",
                   help="with --check: skip the checks against this host (users, groups, programs, "
                        "directories), for a file meant for another host")
    p.add_argument("--version", action="version", version=f"supervisor {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.no_host_checks and not args.check:
        parser.error("--no-host-checks needs --check")
    explicit = args.config is not None
    config_path = Path(args.config) if explicit else default_paths().config
    overrides = {
        "socket": Path(args.socket) if args.socket else None,
        "status_socket": Path(args.status_socket) if args.status_socket else None,
        "state_dir": Path(args.state_dir) if args.state_dir else None,
        "log_dir": Path(args.log_dir) if args.log_dir else None,
        "log_format": args.log_format,
        "log_level": args.log_level,
    }
    # A re-exec runs the configuration in force, not the file as edited since;
    # so does the re-exec's check of the new image (see _reexec).
    handover = None if args.check else take_handover()
    source = config_in_force(handover, check=args.check)
    try:
        config = load_config(config_path, missing_ok=not explicit, overrides=overrides,
                             host_checks=not args.no_host_checks, data=source)
    except ConfigErrors as exc:
        if not args.check:
            configure_logging(args.log_format, args.log_level or "info")
            for err in exc.errors:
                log.error("configuration error", error=str(err), config=str(config_path))
        for err in exc.errors:
            print(str(err), file=sys.stdout if args.check else sys.stderr)
        if args.check:
            print(f"{config_path}: {len(exc.errors)} error(s)", file=sys.stderr)
        return 1
    settings = config.settings
    if args.check:
        return _check(config, config_path, host=not args.no_host_checks)
    configure_logging(settings.log_format, settings.log_level)
    log_findings(config, log)
    if config.path is None:
        log.warning("no configuration file; running with no services", config=str(config_path))
    try:
        return trio.run(_run, config, settings, overrides, not args.no_cgroups, handover)
    except KeyboardInterrupt:  # pragma: no cover - SIGINT is handled inside
        return 130


def _check(config: Config, config_path: Path, *, host: bool) -> int:
    """`--check` of a valid file: what this host lacks (errors, warnings), then the services."""
    findings = check_host(config) if host else []
    for finding in findings:
        print(f"warning: {finding}" if finding.warning else str(finding))
    errors = sum(not f.warning for f in findings)
    if errors:
        print(f"{config_path}: {errors} error(s) on this host", file=sys.stderr)
        return 1
    where = config.path or f"{config_path} (absent: no services)"
    print(f"{where}: valid, {len(config.services)} service(s)" + ("" if host else " (host checks skipped)"))
    for line in describe_services(config.services):
        print("  " + line)
    _limits.raise_nofile(_limits.needed(config.services))  # as the daemon would
    if (short := _limits.shortfall(config.services)) is not None:
        print(f"warning: {short}", file=sys.stderr)
    return 0


def _open_files(config: Config, handover: dict[str, Any] | None) -> tuple[int, int]:
    """Raise our open-files limit; children keep the one we were given (kept across a re-exec)."""
    given = _limits.raise_nofile(_limits.needed(config.services))
    if handover is not None and isinstance(handover.get("nofile"), list):
        given = (int(handover["nofile"][0]), int(handover["nofile"][1]))
    _limits.set_child_nofile(given)
    if (short := _limits.shortfall(config.services)) is not None:
        log.warning(short)
    return given


def _instance_lock(socket_dir: Path, handover: dict[str, Any] | None) -> InstanceLock:
    """The lock of this socket directory: taken now, or kept across a re-exec.

    It is released when the process ends; a later supervisor removes the file.

    Raises:
        OSError: another supervisor holds it (`AlreadyRunning`), or a directory is unsafe.
    """
    prepare_socket_dir(socket_dir)
    directory = notify_dir()
    prepare_notify_dir(directory)
    name = instance_name(socket_dir)
    if handover is not None and isinstance(handover.get("lock"), int):
        return InstanceLock.adopt(handover["lock"], directory / f"{name}.lock")
    return InstanceLock.acquire(directory, name, socket_dir)


def _open_cgroups(settings: Settings, wanted: bool) -> tuple[Hierarchy | None, str | None]:
    """This supervisor's cgroup subtree, or None and why (said once, in the log)."""
    if not wanted:
        reason = "cgroups turned off (--no-cgroups)"
    else:
        try:
            return Hierarchy.open(settings.state_dir), None
        except CgroupUnavailable as exc:
            reason = str(exc)
    log.warning("services are tracked by process group and tree, not by cgroup", reason=reason)
    return None, reason


async def _run(config: Config, settings: Settings, overrides: dict[str, Any], cgroups: bool = True,
               handover: dict[str, Any] | None = None) -> int:
    nofile = _open_files(config, handover)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1) as signals:
        # Signals held across a re-exec are delivered now, to the receiver above;
        # and no signal stays blocked (children inherit the mask: see _proc.spawn).
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        try:
            # The lock comes first: a second supervisor touches no socket.
            lock = _instance_lock(settings.socket.parent, handover)
            settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
            settings.log_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
            if handover is not None:
                fds = handover["sockets"]
                rw, ro = _socket_from_fd(fds["control"]), _socket_from_fd(fds["status"])
                notify_fd: int | None = fds["notify"]
                notify_path = bound_path(fds["notify"])
            else:
                rw = bind_unix_socket(settings.socket, group=settings.socket_group)
                ro = bind_unix_socket(settings.status_socket,
                                      group=settings.status_socket_group or settings.socket_group)
                notify_fd = None
                notify_path = lock.path.with_suffix(".sock")
        except (SocketInUse, OSError, ValueError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            log.error("cannot start", error=why)
            print(f"supervisor: {why}", file=sys.stderr)
            return 1
        if os.getpid() != 1:
            _proc.set_child_subreaper()
        hierarchy, no_cgroups = _open_cgroups(settings, cgroups)
        # Before anything is written to a log: a keeper left by a crash of ours
        # stops draining and hands back the pipes and sockets (docs/keeper.md).
        keeper = KeeperLink(settings.state_dir)
        kept = keeper.open((handover or {}).get("sockets", {}).get("keeper"))
        engine = Engine(config, log_dir=settings.log_dir, notify_socket=notify_path, overrides=overrides,
                        cgroups=hierarchy, no_cgroups_reason=no_cgroups, keeper=keeper)
        try:
            notify = NotifyServer(notify_path, engine.route_notify, fd=notify_fd)
        except OSError as exc:
            log.error("cannot create the notify socket", path=str(notify_path), error=str(exc))
            return 1
        engine.restore(StateStore(settings.state_dir), handover, kept)
        if handover is not None:
            log.info("resumed after re-exec", pid=os.getpid(),
                     running=sum(1 for s in engine.services.values() if s.child is not None))
        reexec = Reexec(engine, settings.state_dir, {"control": rw, "status": ro, "notify": notify.sock},
                        lock_fd=lock.fd, nofile=nofile)
        reexec.signals = signals
        async with trio.open_nursery() as nursery:
            await nursery.start(notify.serve)
            # Handed-over connections subscribe again before the actors run:
            # no event and no line of output happens unseen in between.
            resumed = (handover or {}).get("connections", [])
            for server in (ControlServer(engine, rw, read_only=False, path=settings.socket, on_reexec=reexec),
                           ControlServer(engine, ro, read_only=True, path=settings.status_socket)):
                reexec.servers.append(server)
                await nursery.start(partial(server.serve, resumed=[c for c in resumed
                                                                   if c.get("read-only") == server.read_only]))
            await nursery.start(engine.run)
            engine.keep_all()
            await nursery.start(keeper.run)
            nursery.start_soon(_reap_orphans)
            log.info("ready", version=__version__, pid=os.getpid(), services=len(engine.services),
                     socket=str(settings.socket), status_socket=str(settings.status_socket))
            sd_notify(f"READY=1\nSTATUS=supervising {len(engine.services)} services\nMAINPID={os.getpid()}")
            boot = trio.CancelScope()

            async def autostart() -> None:
                with boot:
                    await engine.autostart()

            nursery.start_soon(autostart)
            if (handover or {}).get("reload"):  # a SIGHUP came while the previous image re-executed
                nursery.start_soon(_reload, engine, False)

            async def watch_signals() -> None:
                async for signum in signals:
                    if signum in (signal.SIGTERM, signal.SIGINT):
                        log.info("shutting down", signal=signal.Signals(signum).name)
                        reexec.request_shutdown("exit")
                    elif signum == signal.SIGHUP:
                        engine.reloads_waiting += 1  # counted now: a re-exec in between carries it over
                        nursery.start_soon(_reload, engine)
                    elif signum == signal.SIGUSR1:
                        nursery.start_soon(reexec.on_signal)

            nursery.start_soon(watch_signals)
            await reexec.shutdown.wait()
            sd_notify("STOPPING=1")
            boot.cancel()
            stopped = await engine.shutdown()
            log.info("all services stopped", order=stopped)
            await keeper.close()
            if os.getpid() == 1:
                await _terminate_strays()
            nursery.cancel_scope.cancel()
    if os.getpid() == 1 and reexec.how in ("power-off", "reboot", "halt"):
        _reboot(reexec.how)
    return 0


async def _terminate_strays(grace: float = 5.0) -> None:
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


def _reboot(how: str) -> None:
    """reboot(2): power off, restart or halt (only meaningful as PID 1)."""
    import ctypes

    cmd = {"power-off": 0x4321FEDC, "reboot": 0x01234567, "halt": 0xCDEF0123}[how]
    os.sync()
    log.info("system going down", how=how)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.reboot(ctypes.c_int(cmd)) != 0:
        log.error("reboot(2) failed", how=how, errno=ctypes.get_errno())


def _socket_from_fd(fd: int) -> trio.socket.SocketType:
    os.set_inheritable(fd, False)
    return trio.socket.from_stdlib_socket(socket.socket(fileno=fd))


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
        services = self.engine.handover()
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
                                    "events": {"epoch": self.engine.epoch, "seq": self.engine.seq},
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


async def _reload(engine: Engine, counted: bool = True) -> None:
    try:
        await engine.reload(counted=counted)
    except Exception as exc:  # already logged with its details; keep running
        log.warning("reload on SIGHUP failed", error=str(exc))


async def _reap_orphans() -> None:
    """Reap orphans re-parented to us (subreaper / PID 1), never an owned child,
    and never a helper process before its owner had the chance to wait for it."""
    seen: dict[int, float] = {}
    with trio.open_signal_receiver(signal.SIGCHLD) as sigchld:
        while True:
            reaped, waiting = _proc.reap_orphans(seen, trio.current_time(), _proc.ORPHAN_GRACE)
            for pid, status in reaped:
                log.debug("reaped orphan", pid=pid, status=status)
            with trio.move_on_after(_proc.ORPHAN_GRACE if waiting else math.inf):
                await sigchld.__anext__()
