"""The configuration file: one TOML document → settings and service specs.

Data path: TOML → `Table` readers → `ServiceSpec`s → `Graph` (validated).
Generic services come from ``[services.NAME]``; any other top-level table is
handed to the service type that registered its name.  Service types are
plain modules in a package (``services`` by default) that define
``SERVICE_TYPES = [ServiceType(...)]``; adding one needs no engine change.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import re
import shlex
import signal
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from herd.protocol import default_paths

from ._custom_actions import read_actions
from .graph import Graph
from .health_config import read_backoff, read_health
from .schema import ConfigError, ConfigErrors, Table, unusable_values
from .spec import RLIMIT_NAMES, ReadySpec, RespawnLimit, ServiceSpec, SocketSpec

__all__ = [
    "Settings",
    "Config",
    "ServiceType",
    "BuildContext",
    "load_config",
    "parse_config",
    "discover_service_types",
    "read_service_table",
    "parse_signal",
]

NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._@+-]*")  # fullmatch: "$" would let "a\n" through
#: The longest service name: names become file names, and the longest made from
#: one, ``.NAME.toml.tmp`` (state) or ``NAME.log.1000`` (a rotated log), must fit
#: in NAME_MAX (255 bytes), with room to spare for a new suffix.
NAME_MAX = 200
RESERVED_NAMES = frozenset({"root"})
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True, slots=True)
class Settings:
    """The ``[supervisor]`` table merged with defaults (flags are applied by the CLI)."""

    socket: Path
    status_socket: Path
    state_dir: Path
    log_dir: Path
    socket_group: str | int | None = None
    status_socket_group: str | int | None = None
    log_format: str | None = None  # None: console on a terminal, else json
    log_level: str = "info"


@dataclass(frozen=True, slots=True)
class BuildContext:
    """What a service type may know when it turns its table into specs."""

    settings: Settings
    config_path: Path | None
    #: False under ``supervisor --check --no-host-checks``: the file is meant for
    #: another host, so do not judge it by this one (a program on PATH, a file
    #: that must exist).  True everywhere else.
    host_checks: bool = True
    #: The top-level tables of the file (e.g. [libvirt] brings virtlogd
    #: along unless the file has a [virtlog] of its own); a key whose value
    #: is not a table is not one (its error is reported by itself).
    tables: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class ServiceType:
    """A service type: a top-level TOML table name and a builder.

    `build` reads its `Table` (or, with ``array=True``, the list of tables of
    ``[[name]]``) and returns specs; it records problems on the table(s) and
    never raises for bad input, never spawns or writes.
    """

    table: str
    build: Callable[[Any, BuildContext], list[ServiceSpec]]
    array: bool = False
    documentation: str = ""


@dataclass(frozen=True, slots=True)
class Config:
    settings: Settings
    services: tuple[ServiceSpec, ...] = ()
    graph: Graph = field(default_factory=lambda: Graph(()))
    path: Path | None = None
    #: The file's bytes as read: the configuration in force, which a re-exec
    #: hands to the new image (an edited file takes effect only by a reload).
    source: bytes | None = None


def discover_service_types(package: str = "services") -> dict[str, ServiceType]:
    """Import every module of `package` and collect its ``SERVICE_TYPES``.

    Raises:
        ImportError: the package or one of its modules does not import (a bug,
            not a configuration error).
    """
    try:
        pkg = importlib.import_module(package)
    except ModuleNotFoundError:
        return {}
    found: dict[str, ServiceType] = {}
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        for stype in getattr(module, "SERVICE_TYPES", ()):
            if stype.table in found or stype.table in ("supervisor", "services"):
                raise ImportError(f"{package}.{info.name}: table name {stype.table!r} is already taken")
            found[stype.table] = stype
    return found


def parse_signal(value: Any) -> int | None:
    """``"SIGTERM"``, ``"TERM"`` or ``15`` → 15; None when not a signal."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        try:
            return int(signal.Signals(value))
        except ValueError:
            return None
    if isinstance(value, str):
        name = value.upper()
        if not name.startswith("SIG"):
            name = "SIG" + name
        sig = getattr(signal.Signals, name, None)
        return int(sig) if sig is not None else None
    return None


def _read_settings(table: Table | None) -> Settings:
    defaults = default_paths()
    if table is None:
        return Settings(defaults.socket, defaults.status_socket, defaults.state_dir, defaults.log_dir)

    def path(key: str, default: Path) -> Path:
        value = table.str(key, nonempty=True)
        return Path(value) if value else default

    settings = Settings(
        socket=path("socket", defaults.socket),
        status_socket=path("status-socket", defaults.status_socket),
        state_dir=path("state-dir", defaults.state_dir),
        log_dir=path("log-dir", defaults.log_dir),
        socket_group=table.str_or_int("socket-group"),
        status_socket_group=table.str_or_int("status-socket-group"),
        log_format=table.choice("log-format", ("console", "json")),
        log_level=table.choice("log-level", LOG_LEVELS, "info"),
    )
    table.finish()
    return settings


def check_schedule(expression: str) -> str | None:
    """None when `expression` is a valid cron expression, else what is wrong."""
    from cronsim import CronSim, CronSimError

    try:
        CronSim(expression, datetime.now().astimezone())
    except (CronSimError, ValueError) as exc:
        return f"not a valid cron expression ({exc}): {expression!r}"
    return None


def _read_ready(t: Table, key: str) -> ReadySpec:
    sub = t.table(key)
    if sub is None or not sub.ok:
        return ReadySpec()
    kind = sub.choice("type", ("started", "notify", "pid-file", "tcp", "unix"), "started", required=True)
    ready = ReadySpec(type=kind)
    if kind in ("pid-file", "unix"):
        path = sub.str("path", required=True, nonempty=True)
        if path is not None and not path.startswith("/"):
            sub.error("path", f"must be an absolute path, got {path!r}")
        ready = ReadySpec(type=kind, path=path)
    elif kind == "tcp":
        address = sub.str("address", required=True, nonempty=True)
        if address is not None and not _valid_address(address):
            sub.error("address", f'expected "host:port" with a port 1-65535, got {address!r}')
        ready = ReadySpec(type=kind, address=address)
    sub.finish()
    return ready


def _valid_address(address: str) -> bool:
    host, sep, port = address.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


_SOCKET_NAME_RE = re.compile(r"[A-Za-z0-9_.@+-]{1,255}")


def _read_sockets(t: Table, key: str, service: str) -> tuple[SocketSpec, ...]:
    out: list[SocketSpec] = []
    for sub in t.table_list(key):
        if not sub.ok:
            continue
        path = sub.str("path", nonempty=True)
        address = sub.str("address", nonempty=True)
        name = sub.str("name", service, nonempty=True)
        if name is not None and not _SOCKET_NAME_RE.fullmatch(name):
            sub.error("name", f"{name!r} is not a valid socket name (letters, digits, '.', '_', '-'; no ':')")
        mode = sub.octal("mode", 0o666)
        group = sub.str_or_int("group")
        backlog = sub.int("backlog", 128, min=1, max=65535)
        accept = sub.bool("accept", False)
        max_connections = sub.int("max-connections", 100, min=1, max=65535)
        if not accept and sub.has("max-connections"):
            sub.error("max-connections", "applies to accept = true sockets only")
        if (path is None) == (address is None):
            sub.error(None, 'needs exactly one of "path" (a Unix socket) or "address" ("host:port")')
        elif path is not None and not path.startswith("/"):
            sub.error("path", f"must be an absolute path, got {path!r}")
        elif address is not None and not _valid_address(address):
            sub.error("address", f'expected "host:port" with a port 1-65535, got {address!r}')
        if address is not None and (sub.has("mode") or sub.has("group")):
            sub.error(None, '"mode" and "group" apply to Unix sockets ("path") only')
        sub.finish()
        out.append(SocketSpec(name=name or service, path=path, address=address, mode=mode,
                              group=group, backlog=backlog, accept=accept, max_connections=max_connections))
    return tuple(out)


def _read_stay_down(t: Table, key: str) -> tuple[tuple[int, str], ...]:
    value = t.raw(key, [])
    if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value):
        t.error(key, f"expected an array of exit codes 0-255, got {value!r}")
        return ()
    return tuple((code, f"exited with code {code}, listed in {key}") for code in sorted(set(value)))


def _read_rlimits(t: Table, key: str) -> tuple[tuple[str, int, int], ...]:
    sub = t.table(key)
    if sub is None or not sub.ok:
        return ()
    out = []

    def one(v: Any) -> int | None:
        if isinstance(v, str) and v in ("infinity", "unlimited"):
            return -1
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            return v
        return None

    for name, value in sub.data.items():
        sub.seen.add(name)
        if name not in RLIMIT_NAMES:
            sub.error(name, f"unknown resource limit (known: {', '.join(sorted(RLIMIT_NAMES))})")
            continue
        if isinstance(value, list) and len(value) == 2:
            soft, hard = one(value[0]), one(value[1])
        else:
            soft = hard = one(value)
        if soft is None or hard is None:
            sub.error(name, f'expected a non-negative integer, "infinity" or [soft, hard], got {value!r}')
            continue
        if hard != -1 and (soft == -1 or soft > hard):
            sub.error(name, "the soft limit is above the hard limit")
            continue
        out.append((name, soft, hard))
    return tuple(sorted(out))


def read_service_table(t: Table, name: str, settings: Settings) -> ServiceSpec:
    """A generic ``[services.NAME]`` table → spec (errors recorded on `t`).

    Service types may call this too, to accept the generic keys inside their
    own tables.
    """
    command = t.str_list("command", None, required=True, nonempty=True)
    if command is not None:
        program = command[0]
        if not program:
            t.error("command", "the program (the first element) is empty")
        elif "/" in program and not program.startswith("/"):
            t.error("command", f"the program {json.dumps(program)} is a relative path; give an absolute path, "
                               "or a bare name to look up on PATH")
    limit_table = t.table("respawn-limit")
    limit = RespawnLimit()
    if limit_table is not None and limit_table.ok:
        limit = RespawnLimit(
            count=limit_table.int("count", 5, min=0),
            seconds=limit_table.number("seconds", 7.0, min=0, exclusive_min=True),
        )
        limit_table.finish()
    stop_signal_raw = t.raw("stop-signal", "SIGTERM")
    stop_signal = parse_signal(stop_signal_raw)
    if stop_signal is None:
        t.error("stop-signal", f'expected a signal name like "SIGTERM", got {stop_signal_raw!r}')
        stop_signal = int(signal.SIGTERM)
    directory = t.str("directory", "/", nonempty=True)
    if not directory.startswith("/"):
        t.error("directory", f"must be an absolute path, got {directory!r}")
    sgroups = t.raw("supplementary-groups", None)
    if sgroups is not None and not (
        isinstance(sgroups, list) and all(isinstance(g, (str, int)) and not isinstance(g, bool) for g in sgroups)
    ):
        t.error("supplementary-groups", f"expected an array of group names or ids, got {sgroups!r}")
        sgroups = None
    schedule = t.str("schedule", nonempty=True)
    if schedule is not None:
        problem = check_schedule(schedule)
        if problem:
            t.error("schedule", problem)
    log_file = t.str("log-file", nonempty=True)
    if log_file is not None and not log_file.startswith("/"):
        t.error("log-file", f"must be an absolute path, got {log_file!r}")
    spec = ServiceSpec(
        name=name,
        command=command,
        provides=t.str_list("provides"),
        requires=t.str_list("requires"),
        documentation=t.str("documentation", ""),
        auto_start=t.bool("auto-start", True),
        respawn=t.bool("respawn", True),
        respawn_limit=limit,
        respawn_delay=t.number("respawn-delay", 0.1, min=0),
        respawn_backoff=read_backoff(t),
        health=read_health(t),
        stay_down_exits=_read_stay_down(t, "stay-down-exit-codes"),
        one_shot=t.bool("one-shot", False),
        user=t.str_or_int("user"),
        group=t.str_or_int("group"),
        supplementary_groups=tuple(sgroups) if sgroups is not None else None,
        environment=tuple(sorted(t.str_map("environment").items())),
        clear_environment=t.bool("clear-environment", False),
        directory=directory,
        umask=t.octal("umask", 0o022),
        resource_limits=_read_rlimits(t, "resource-limits"),
        stop_signal=stop_signal,
        stop_timeout=t.number("stop-timeout", 5.0, min=0, exclusive_min=True),
        kill_mode=t.choice("kill-mode", ("process-group", "process", "tree"), "process-group"),
        ready=_read_ready(t, "ready"),
        start_timeout=t.number("start-timeout", 60.0, min=0, exclusive_min=True),
        log_file=log_file,  # None: LOG_DIR/NAME.log, resolved by the engine
        log_max_size=t.int("log-max-size", 2 * 1024 * 1024, min=0),
        log_max_backups=t.int("log-max-backups", 3, min=0, max=1000),
        watchdog_sec=t.number("watchdog-sec", None, min=0, exclusive_min=True),
        schedule=schedule,
        max_duration=t.number("max-duration", None, min=0, exclusive_min=True),
        sockets=_read_sockets(t, "sockets", name),
        activation=t.choice("activation", ("eager", "lazy"), "eager"),
        actions=read_actions(t, "actions"),
        source=t.path,
    )
    if spec.schedule is not None:
        for key, bad in (("one-shot", spec.one_shot), ("sockets", bool(spec.sockets)),
                         ("ready", spec.ready.type != "started")):
            if bad:
                t.error(key, "does not apply to a timer (a service with \"schedule\")")
    elif spec.max_duration is not None:
        t.error("max-duration", 'applies to timers only (needs "schedule")')
    for key, value in (("health", spec.health), ("respawn-backoff", spec.respawn_backoff)):
        if value is not None and (spec.one_shot or spec.schedule is not None):
            t.error(key, "applies to long-running services only (not one-shot services or timers)")
    if spec.accepts:
        if not all(s.accept for s in spec.sockets):
            t.error("sockets", "either every socket has accept = true (inetd-style) or none has")
        for key, bad in (("one-shot", spec.one_shot), ("schedule", spec.schedule is not None),
                         ("activation", spec.activation == "lazy"), ("ready", spec.ready.type != "started"),
                         ("watchdog-sec", spec.watchdog_sec is not None)):
            if bad:
                t.error(key, "does not apply to an inetd-style service (sockets with accept = true)")
    if spec.activation == "lazy" and not spec.sockets:
        t.error("activation", '"lazy" needs at least one entry in "sockets"')
    if spec.watchdog_sec is not None and spec.ready.type != "notify":
        t.error("watchdog-sec", 'needs ready = { type = "notify" } (the watchdog is fed with WATCHDOG=1)')
    for env_name in dict(spec.environment):
        if not env_name or "=" in env_name or "\0" in env_name:
            t.error(f"environment.{env_name}", "not a valid environment variable name")
    return spec


def _check_name(errors: list[ConfigError], path: str, name: str) -> bool:
    """Service names and provisions: herd arguments and file names (NAME.log)."""
    if not NAME_RE.fullmatch(name):
        errors.append(ConfigError(path, f"{name!r} is not a valid service name "
                                        "(letters, digits, '.', '_', '-', '@', '+'; first a letter, a digit or '_')"))
        return False
    if len(name) > NAME_MAX:
        errors.append(ConfigError(path, f"a service name is at most {NAME_MAX} characters "
                                        f"(it names files), got {len(name)}: {name[:20]!r}..."))
        return False
    if name in RESERVED_NAMES:
        errors.append(ConfigError(path, f"{name!r} is reserved for the supervisor itself"))
        return False
    return True


def _checked_provisions(errors: list[ConfigError], spec: ServiceSpec, *, typed: bool) -> ServiceSpec:
    """`spec` without the provisions that are not valid names (each an error).

    A provision written in ``[services.NAME]`` follows the rules of service
    names.  One that a service type makes (`typed`) may be a Guix name with a
    '/' (``file-system-/proc/sys/fs/binfmt_misc``): it need only be printable,
    not empty and not reserved.
    """
    path = f"{spec.source}.provides" if spec.source else spec.name

    def ok(name: str) -> bool:
        if not typed:
            return _check_name(errors, path, name)
        if name and name.isprintable() and name not in RESERVED_NAMES:
            return True
        errors.append(ConfigError(path, f"{name!r} is not a valid name (empty, reserved or not printable)"))
        return False

    valid = tuple(p for p in spec.provides if ok(p))
    return spec if valid == spec.provides else replace(spec, provides=valid)


def _check_values(errors: list[ConfigError], document: dict[str, Any]) -> None:
    """Non-finite numbers and NULs anywhere, unless an error already names their key or table."""
    reported = [e.path for e in errors]
    for path, problem in unusable_values(document):
        if not any(path == p or path.startswith(f"{p}.") for p in reported):
            errors.append(ConfigError(path, problem))


def parse_config(
    document: dict[str, Any],
    *,
    path: Path | None = None,
    service_types: dict[str, ServiceType] | None = None,
    overrides: dict[str, Any] | None = None,
    host_checks: bool = True,
) -> Config:
    """Validate a parsed TOML document.

    `overrides` are command-line settings (``socket``, ``state_dir``, …; None
    means not given): applied before service types build, so they see them.
    `host_checks` is passed to the service types (`BuildContext`).

    Raises:
        ConfigErrors: with every problem found, each naming its key path.
    """
    types = discover_service_types() if service_types is None else service_types
    errors: list[ConfigError] = []
    root = Table(document, "", errors)
    settings = with_overrides(_read_settings(root.table("supervisor")), **(overrides or {}))
    context = BuildContext(settings=settings, config_path=path, host_checks=host_checks,
                           tables=frozenset(k for k, v in document.items() if isinstance(v, (dict, list))))
    specs: list[ServiceSpec] = []
    rejected: set[str] = set()

    services = root.table("services")
    if services is not None and services.ok:
        for name, value in services.data.items():
            services.seen.add(name)
            t = Table(value, services.key_path(name), errors)
            if not _check_name(errors, t.path, name) or not t.ok:
                rejected.add(name)  # reported: a requirement of it is no second error
                continue
            spec = read_service_table(t, name, settings)
            t.finish()
            specs.append(_checked_provisions(errors, spec, typed=False))

    for key, value in document.items():
        if key in ("supervisor", "services"):
            continue
        root.seen.add(key)
        stype = types.get(key)
        if stype is None:
            from herd.suggest import did_you_mean

            names = ["supervisor", "services", *types]
            known = ", ".join(sorted(names))
            errors.append(ConfigError(key, f"unknown table{did_you_mean(key, names)} (known: {known})"))
            continue
        if stype.array:
            arg: Any = root.table_list(key) if isinstance(value, list) else [Table(value, key, errors)]
        else:
            arg = Table(value, key, errors)
        for spec in stype.build(arg, context):
            if _check_name(errors, spec.source or key, spec.name):
                specs.append(_checked_provisions(errors, spec, typed=True))
            else:
                rejected.add(spec.name)

    _check_values(errors, document)
    _check_socket_owners(errors, specs)
    graph = Graph.build(specs, errors, rejected=frozenset(rejected))
    if errors:
        raise ConfigErrors(errors)
    return Config(settings=settings, services=tuple(specs), graph=graph, path=path)


def _check_socket_owners(errors: list[ConfigError], specs: Sequence[ServiceSpec]) -> None:
    """Two services naming the same socket path or address: an error naming both
    (the second would otherwise silently take it from the first)."""
    owner: dict[str, str] = {}
    for spec in specs:
        for i, sock in enumerate(spec.sockets):
            where = sock.path if sock.path is not None else sock.address
            if where is None:
                continue
            key = os.path.normpath(where) if sock.path is not None else where
            other = owner.setdefault(key, spec.name)
            if other != spec.name:
                errors.append(ConfigError(f"{spec.source or f'services.{spec.name}'}.sockets[{i}].{'path' if sock.path else 'address'}",
                                          f"{where} is also a socket of service {other}"))


def load_config(path: Path, *, service_types: dict[str, ServiceType] | None = None,
                missing_ok: bool = False, overrides: dict[str, Any] | None = None,
                data: bytes | None = None, host_checks: bool = True) -> Config:
    """Read and validate the configuration file at `path` (or `data`, its
    content when the caller has read it already).

    Raises:
        ConfigErrors: the file is unreadable, not TOML, or invalid.
    """
    try:
        data = path.read_bytes() if data is None else data
    except FileNotFoundError:
        if missing_ok:
            return parse_config({}, path=None, service_types=service_types, overrides=overrides,
                                host_checks=host_checks)
        raise ConfigErrors([ConfigError("", f"{path}: no such file")]) from None
    except OSError as exc:
        raise ConfigErrors([ConfigError("", f"{path}: {exc.strerror}")]) from None
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigErrors([ConfigError("", f"{path}: not UTF-8 ({exc})")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigErrors([ConfigError("", f"{path}: TOML syntax error: {exc}")]) from None
    except ValueError as exc:  # an integer of more than 4300 digits
        raise ConfigErrors([ConfigError("", f"{path}: cannot read a value: {exc}")]) from None
    config = parse_config(document, path=path, service_types=service_types, overrides=overrides,
                          host_checks=host_checks)
    return replace(config, source=data)


def with_overrides(settings: Settings, **overrides: Any) -> Settings:
    """Settings with the command-line flags that were given applied."""
    return replace(settings, **{k: v for k, v in overrides.items() if v is not None})


def describe_services(specs: Sequence[ServiceSpec]) -> Iterable[str]:
    """Lines for `supervisor --check`: each service with its requirements."""
    for spec in sorted(specs, key=lambda s: s.name):
        parts = [spec.name]
        if spec.provides:
            parts.append(f"provides: {', '.join(spec.provides)}")
        parts.append(f"requires: {', '.join(spec.requires) if spec.requires else '-'}")
        if not spec.auto_start:
            parts.append("manual start")
        if spec.one_shot:
            parts.append("one-shot")
        if spec.schedule:
            parts.append(f"timer: {spec.schedule}")
        yield "  ".join(parts)
        if spec.command:
            yield "    runs: " + shlex.join(spec.command)
