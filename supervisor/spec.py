"""Service specifications: what the engine is asked to run.

A `ServiceSpec` is frozen data built from configuration (by `config.py` for
generic ``[services.NAME]`` tables, by the modules under ``services/`` for the
service types).  The engine never mutates a spec; a changed configuration
produces a new spec, and spec equality decides what a reload changes.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from .respawn import Backoff

__all__ = [
    "KillMode",
    "ReadySpec",
    "SocketSpec",
    "RespawnLimit",
    "Backoff",
    "HealthSpec",
    "ActionSpec",
    "ActionContext",
    "Creates",
    "ServiceSpec",
    "TypeState",
    "RLIMIT_NAMES",
]

KillMode = Literal["process-group", "process", "tree"]
ReadyType = Literal["started", "notify", "pid-file", "tcp", "unix"]

#: resource-limits keys → `resource` module constants' names.
RLIMIT_NAMES: Mapping[str, str] = {
    "as": "RLIMIT_AS",
    "core": "RLIMIT_CORE",
    "cpu": "RLIMIT_CPU",
    "data": "RLIMIT_DATA",
    "fsize": "RLIMIT_FSIZE",
    "locks": "RLIMIT_LOCKS",
    "memlock": "RLIMIT_MEMLOCK",
    "msgqueue": "RLIMIT_MSGQUEUE",
    "nice": "RLIMIT_NICE",
    "nofile": "RLIMIT_NOFILE",
    "nproc": "RLIMIT_NPROC",
    "rss": "RLIMIT_RSS",
    "rtprio": "RLIMIT_RTPRIO",
    "rttime": "RLIMIT_RTTIME",
    "sigpending": "RLIMIT_SIGPENDING",
    "stack": "RLIMIT_STACK",
}


@dataclass(frozen=True, slots=True)
class RespawnLimit:
    """More than `count` respawns within `seconds` disables the service."""

    count: int = 5
    seconds: float = 7.0


HealthType = Literal["tcp", "unix", "udp", "exec"]


@dataclass(frozen=True, slots=True)
class HealthSpec:
    """A health check (the ``health`` key): run every `interval` while the
    service runs; `failures` failed checks in a row restart it.  A failure
    within `start_period` of a start is forgiven."""

    type: HealthType
    address: str | None = None  # tcp, udp: "host:port"
    path: str | None = None  # unix
    command: tuple[str, ...] | None = None  # exec: argv, never through a shell
    send: bytes | None = None  # tcp, unix, udp: sent once connected
    expect: bytes | None = None  # tcp, unix, udp: must appear in what comes back
    tls: bool = False  # tcp: a TLS handshake must complete (certificate not verified)
    interval: float = 30.0
    timeout: float = 10.0
    failures: int = 3
    start_period: float = 0.0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "interval": self.interval, "timeout": self.timeout,
                               "failures": self.failures, "start-period": self.start_period}
        for key, value in (("address", self.address), ("path", self.path)):
            if value is not None:
                out[key] = value
        if self.command is not None:
            out["command"] = list(self.command)
        if self.tls:
            out["tls"] = True
        return out


@dataclass(frozen=True, slots=True)
class ReadySpec:
    """When a started service counts as up."""

    type: ReadyType = "started"
    path: str | None = None  # pid-file, unix
    address: str | None = None  # tcp: "host:port"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type}
        if self.path is not None:
            out["path"] = self.path
        if self.address is not None:
            out["address"] = self.address
        return out


@dataclass(frozen=True, slots=True)
class SocketSpec:
    """A listening socket the supervisor binds and passes (systemd-style)."""

    name: str  # LISTEN_FDNAMES entry
    path: str | None = None  # a Unix stream socket …
    address: str | None = None  # … or a TCP "host:port"
    mode: int = 0o666  # Unix sockets: file mode
    group: str | int | None = None  # Unix sockets: owning group
    backlog: int = 128
    accept: bool = False  # inetd-style: one instance of the command per connection
    max_connections: int = 100  # accept: instances at once on this socket


@dataclass(frozen=True, slots=True)
class Creates:
    """What a service type's `prepare_hook` creates when it is missing.

    The host checks (``supervisor --check``, and the warnings at load) do not
    report these as missing: hurd-vm, for one, creates its ``childhurd``
    account at the first start.
    """

    users: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    directories: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ActionContext:
    """What a custom action's handler gets besides its arguments."""

    service: str
    pid: int | None
    say: Callable[[str], None]
    engine: Any  # supervisor.engine.Engine; Any to keep specs free of engine imports


ActionHandler = Callable[[ActionContext, list[Any]], Awaitable[Any]]
Hook = Callable[["ServiceSpec"], Awaitable[None]]
ReadyHook = Callable[["ServiceSpec", int], Awaitable[None]]
DetailsHook = Callable[["ServiceSpec"], dict[str, Any]]


class TypeState(Protocol):
    """What a service type remembers about a running service (hurd-vm: the
    guest got its secrets; virtlogd: when it re-executed).  The engine keeps
    it in the service's record, so a re-exec hands it over and crash
    recovery reads it back; hooks must not keep such state anywhere else.

    `to_record` returns TOML-able values (no None); `from_record` takes what
    an earlier `to_record` returned, maybe from an older version.
    """

    def to_record(self) -> dict[str, Any]: ...

    def from_record(self, data: dict[str, Any]) -> None: ...


@dataclass(frozen=True, slots=True)
class ActionSpec:
    """A custom action (`herd ACTION SERVICE [ARG...]`)."""

    name: str
    documentation: str
    handler: ActionHandler = field(compare=False)
    read_only: bool = False  # may be called on the read-only socket
    command: tuple[str, ...] | None = None  # a configured action's argv (compared: a reload sees a change)


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """Everything the engine needs to run one service.

    Either `command` is set (a process service) or `start_hook` is (a service
    with no process, e.g. binfmt_misc registrations; `stop_hook` undoes it).
    """

    name: str
    command: tuple[str, ...] | None = None
    provides: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    documentation: str = ""
    auto_start: bool = True
    respawn: bool = True
    respawn_limit: RespawnLimit = RespawnLimit()
    respawn_delay: float = 0.1
    #: Capped exponential respawn delay; while set, the limit never disables.
    respawn_backoff: Backoff | None = None
    health: HealthSpec | None = None
    #: Exit codes that mean "not needed here" (s6's permanent failure): no
    #: respawn, and status says why (code → reason).
    stay_down_exits: tuple[tuple[int, str], ...] = ()
    one_shot: bool = False
    user: str | int | None = None
    group: str | int | None = None
    supplementary_groups: tuple[str | int, ...] | None = None
    environment: tuple[tuple[str, str], ...] = ()
    clear_environment: bool = False
    directory: str = "/"
    umask: int = 0o022
    resource_limits: tuple[tuple[str, int, int], ...] = ()  # (name, soft, hard); -1 = infinity
    stop_signal: int = int(signal.SIGTERM)
    stop_timeout: float = 5.0
    kill_mode: KillMode = "process-group"
    ready: ReadySpec = ReadySpec()
    start_timeout: float = 60.0
    log_file: str | None = None
    log_max_size: int = 2 * 1024 * 1024  # bytes; 0 = never rotate (virtlogd's default size)
    log_max_backups: int = 3
    watchdog_sec: float | None = None  # notify services: WATCHDOG=1 expected this often
    sockets: tuple[SocketSpec, ...] = ()
    activation: Literal["eager", "lazy"] = "eager"  # lazy: start on the first connection
    schedule: str | None = None  # cron expression: a timer that runs `command` at each event
    max_duration: float | None = None  # timers: a run taking longer is stopped
    actions: tuple[ActionSpec, ...] = ()
    #: Process services: runs before each spawn (write config files, create
    #: directories); an exception fails the start with its message.
    prepare_hook: Hook | None = field(default=None, compare=False)
    #: The users, groups and directories `prepare_hook` creates when missing.
    creates: Creates = Creates()
    start_hook: Hook | None = field(default=None, compare=False)
    #: Process services: after spawn, the service is ready when this returns
    #: (given the spec and the main PID); an exception fails the start with
    #: its message; a stop cancels it.  Bounded by start-timeout.
    ready_hook: ReadyHook | None = field(default=None, compare=False)
    #: Without a process: undoes start_hook.  With a process: asks it to stop
    #: (e.g. ACPI power-down over QMP) before stop-signal; the process then has
    #: stop-timeout to exit by itself before the signal is sent.
    stop_hook: Hook | None = field(default=None, compare=False)
    #: Extra facts for `status SERVICE` (under "details"); must be quick and not block.
    details_hook: DetailsHook | None = field(default=None, compare=False)
    #: The service type's run-time state, kept in the service's record.
    type_state: TypeState | None = field(default=None, compare=False)
    #: A service type's own settings (any value with equality): hooks are not
    #: compared, so this is what tells a reload that a hook service changed.
    parameters: Any = None
    #: Where the spec came from, for error messages ("services.web", "libvirt").
    source: str = ""
    #: A service type's own names for the generic keys that errors name
    #: ("command", "requires"): e.g. (("requires", "requirement"),), so that an
    #: error names a key the user's table really has (`key_path`).
    keys: tuple[tuple[str, str], ...] = ()

    def key_path(self, key: str) -> str:
        """The TOML key path an error about the generic `key` names."""
        base = self.source or f"services.{self.name}"
        return f"{base}.{dict(self.keys).get(key, key)}"

    @property
    def names(self) -> tuple[str, ...]:
        """The canonical name first, then the extra provisions."""
        return (self.name, *(p for p in self.provides if p != self.name))

    @property
    def accepts(self) -> bool:
        """inetd-style: its sockets accept, one instance per connection."""
        return any(s.accept for s in self.sockets)

    def action(self, name: str) -> ActionSpec | None:
        for action in self.actions:
            if action.name == name:
                return action
        return None
