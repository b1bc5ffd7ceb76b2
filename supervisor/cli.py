"""`supervisor`: the daemon's command line, and the wiring of its tasks.

This module only parses arguments and wires: config → engine → control
servers, plus the signal loop.  The re-exec is `reexec.Reexec`; what PID 1
does (reaping orphans, terminating strays, powering off) is in `pid1`.
It runs in the foreground; it never daemonizes.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from functools import partial
from pathlib import Path
from typing import Any

import structlog
import trio

from herd.protocol import default_paths

from . import __version__, _boot_console, _early_boot, _limits, _proc, _reexec, _samecode, pid1, takeover
from . import _memdebug, _memory  # memory: a debug aid; giving it back
from ._cgroup import CgroupUnavailable, Hierarchy
from ._control_sockets import SocketInUse, bind_unix_socket, prepare_socket_dir
from ._hostcheck import check_host, log_findings
from ._instance import InstanceLock, instance_name, notify_dir, prepare_notify_dir
from ._keeper_link import KeeperLink
from ._logging import configure_logging
from ._notify import sd_notify
from ._notify_server import NotifyServer, bound_path
from ._reexec import config_in_force, take_handover
from ._state import StateStore
from .config import Config, Settings, describe_services, load_config
from .control import ControlServer
from .engine import Engine
from .reexec import Reexec
from .schema import ConfigErrors

__all__ = ["main"]

log = structlog.get_logger("supervisor")

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
    p.add_argument("--boot", action="store_true",
                   help="run as the init of a machine (PID 1): early mounts, Ctrl-Alt-Del, never exit "
                        "(docs/boot.md)")
    p.add_argument("--version", action="version", version=f"supervisor {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.no_host_checks and not args.check:
        parser.error("--no-host-checks needs --check")
    if args.boot and not args.check:
        if os.getpid() != 1:
            parser.error("--boot: only as PID 1 (the init of a machine)")
        from ._init_guard import run_as_init

        configure_logging(args.log_format or "console", args.log_level or "info")
        _early_boot.prepare()
        # a machine's init may run on a slow CPU (an emulated one): give the
        # re-exec's check of the new image time
        _reexec.CHECK_TIMEOUT = _early_boot.REEXEC_CHECK_TIMEOUT
        run_as_init(partial(_main, args, boot=True))
    return _main(args)


def _main(args: argparse.Namespace, *, boot: bool = False) -> int:
    explicit, config_path, overrides = _where(args)
    _memdebug.start()  # SUPERVISOR_MEMDEBUG only: a debug aid
    _memory.configure()  # big buffers mmapped, unmapped when freed
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
    _samecode.remember()  # what this image runs: a re-exec into the same code checks it here
    configure_logging(settings.log_format, settings.log_level)
    log_findings(config, log)
    if config.path is None:
        log.warning("no configuration file; running with no services", config=str(config_path))
    try:
        return trio.run(partial(_run, as_init=boot), config, settings, overrides, not args.no_cgroups, handover)
    except KeyboardInterrupt:  # pragma: no cover - SIGINT is handled inside
        return 130


def _where(args: argparse.Namespace) -> tuple[bool, Path, dict[str, Any]]:
    """(whether -c was given, the configuration file, the command line's overrides)."""
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
    return explicit, config_path, overrides


def preflight(source: bytes | None) -> list[str]:
    """What ``supervisor ARGS --check`` would refuse in the configuration
    `source`, checked in this process (a re-exec into unchanged code, see
    `_samecode`); empty when it passes.  The same checks as `main` and
    `_check`, without their output or their raising of our open-files limit."""
    args = _parser().parse_args([*sys.argv[1:], "--check"])
    explicit, config_path, overrides = _where(args)
    try:
        config = load_config(config_path, missing_ok=not explicit, overrides=overrides,
                             host_checks=True, data=source)
    except ConfigErrors as exc:
        return [str(err) for err in exc.errors] + [f"{config_path}: {len(exc.errors)} error(s)"]
    findings = check_host(config)
    errors = sum(not f.warning for f in findings)
    if errors:
        return [str(f) for f in findings if not f.warning] + [f"{config_path}: {errors} error(s) on this host"]
    return []


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
               handover: dict[str, Any] | None = None, *, as_init: bool = False) -> int:
    nofile = _open_files(config, handover)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1) as signals:
        # Signals held across a re-exec are delivered now, to the receiver above;
        # and no signal stays blocked (children inherit the mask: see _proc.spawn).
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        try:
            # The lock comes first: a second supervisor touches no socket.
            lock = _instance_lock(settings.socket.parent, handover)
            settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
            if not as_init:  # as init, the log directory may appear later (_boot_console)
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
        engine.hear_notify = notify.drain
        takeover.restore(engine, StateStore(settings.state_dir), handover, kept)
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
            if as_init:
                await nursery.start(partial(_boot_console.mirror_until_writable, engine.hub, settings.log_dir))
            engine.keep_all()
            await nursery.start(keeper.run)
            nursery.start_soon(pid1.reap_orphans)
            log.info("ready", version=__version__, pid=os.getpid(), services=len(engine.services),
                     socket=str(settings.socket), status_socket=str(settings.status_socket))
            if handover is not None:
                _memdebug.dump("resumed")
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
                    if as_init and signum == signal.SIGINT:  # Ctrl-Alt-Del
                        log.info("Ctrl-Alt-Del: rebooting")
                        reexec.request_shutdown("reboot")
                    elif as_init and signum == signal.SIGTERM:  # as systemd does: re-execute, never exit
                        log.info("SIGTERM as init: re-executing (PID 1 never exits)")
                        nursery.start_soon(reexec.on_signal)
                    elif signum in (signal.SIGTERM, signal.SIGINT):
                        log.info("shutting down", signal=signal.Signals(signum).name)
                        reexec.request_shutdown("exit")
                    elif signum == signal.SIGHUP:
                        engine.reloads_waiting += 1  # counted now: a re-exec in between carries it over
                        nursery.start_soon(_reload, engine)
                    elif signum == signal.SIGUSR1:
                        nursery.start_soon(reexec.on_signal)

            nursery.start_soon(watch_signals)
            await reexec.shutdown.wait()
            _memdebug.dump("shutdown")
            sd_notify("STOPPING=1")
            boot.cancel()
            stopped = await engine.shutdown()
            log.info("all services stopped", order=stopped)
            await keeper.close()
            if os.getpid() == 1:
                await pid1.terminate_strays()
            nursery.cancel_scope.cancel()
    if as_init:  # `herd stop root` too: PID 1 never exits
        _early_boot.unmount_all()
        pid1.reboot("power-off" if reexec.how == "exit" else reexec.how)
    elif os.getpid() == 1 and reexec.how in ("power-off", "reboot", "halt"):
        pid1.reboot(reexec.how)
    return 0


def _socket_from_fd(fd: int) -> trio.socket.SocketType:
    os.set_inheritable(fd, False)
    return trio.socket.from_stdlib_socket(socket.socket(fileno=fd))


async def _reload(engine: Engine, counted: bool = True) -> None:
    try:
        await engine.reload(counted=counted)
    except Exception as exc:  # already logged with its details; keep running
        log.warning("reload on SIGHUP failed", error=str(exc))
