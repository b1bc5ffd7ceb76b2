"""`supervisor`: the daemon's command line, and the wiring of its tasks.

This module only wires: config → engine → control servers, plus the signal
and orphan-reaping loops.  It runs in the foreground; it never daemonizes.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import structlog
import trio

from herd.protocol import default_paths

from . import __version__, _proc
from ._logging import configure_logging
from ._notify import sd_notify
from ._notify_server import NotifyServer
from .config import Config, Settings, describe_services, load_config
from .control import ControlServer, SocketInUse, bind_unix_socket
from .engine import Engine
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
    p.add_argument("--check", action="store_true", help="validate the configuration, print the services, exit")
    p.add_argument("--version", action="version", version=f"supervisor {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
    try:
        config = load_config(config_path, missing_ok=not explicit, overrides=overrides)
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
        where = config.path or f"{config_path} (absent: no services)"
        print(f"{where}: valid, {len(config.services)} service(s)")
        for line in describe_services(config.services):
            print("  " + line)
        return 0
    configure_logging(settings.log_format, settings.log_level)
    if config.path is None:
        log.warning("no configuration file; running with no services", config=str(config_path))
    try:
        return trio.run(_run, config, settings)
    except KeyboardInterrupt:  # pragma: no cover - SIGINT is handled inside
        return 130


async def _run(config: Config, settings: Settings) -> int:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1) as signals:
        try:
            settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
            settings.log_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
            rw = bind_unix_socket(settings.socket, group=settings.socket_group)
            ro = bind_unix_socket(settings.status_socket,
                                  group=settings.status_socket_group or settings.socket_group)
        except (SocketInUse, OSError, ValueError) as exc:
            log.error("cannot start", error=str(exc))
            print(f"supervisor: {exc}", file=sys.stderr)
            return 1
        if os.getpid() != 1:
            _proc.set_child_subreaper()
        notify_path = settings.socket.parent / "notify.sock"
        engine = Engine(config, log_dir=settings.log_dir, notify_socket=notify_path)
        try:
            notify = NotifyServer(notify_path, engine.route_notify)
        except OSError as exc:
            log.error("cannot create the notify socket", path=str(notify_path), error=str(exc))
            return 1
        async with trio.open_nursery() as nursery:
            await nursery.start(notify.serve)
            await nursery.start(engine.run)
            await nursery.start(ControlServer(engine, rw, read_only=False, path=settings.socket).serve)
            await nursery.start(ControlServer(engine, ro, read_only=True, path=settings.status_socket).serve)
            nursery.start_soon(_reap_orphans)
            log.info("ready", version=__version__, pid=os.getpid(), services=len(engine.services),
                     socket=str(settings.socket), status_socket=str(settings.status_socket))
            sd_notify(f"READY=1\nSTATUS=supervising {len(engine.services)} services\nMAINPID={os.getpid()}")
            boot = trio.CancelScope()

            async def autostart() -> None:
                with boot:
                    await engine.autostart()

            nursery.start_soon(autostart)
            async for signum in signals:
                if signum in (signal.SIGTERM, signal.SIGINT):
                    log.info("shutting down", signal=signal.Signals(signum).name)
                    break
                log.warning("signal not supported by this version yet; ignored",
                            signal=signal.Signals(signum).name)
            sd_notify("STOPPING=1")
            boot.cancel()
            stopped = await engine.shutdown()
            log.info("all services stopped", order=stopped)
            nursery.cancel_scope.cancel()
    return 0


async def _reap_orphans() -> None:
    """Reap orphans re-parented to us (subreaper / PID 1), never an owned child."""
    with trio.open_signal_receiver(signal.SIGCHLD) as sigchld:
        _proc.reap_orphans()
        async for _ in sigchld:
            for pid, status in _proc.reap_orphans():
                log.debug("reaped orphan", pid=pid, status=status)
