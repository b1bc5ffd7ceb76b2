"""The control protocol, shared by the daemon and `herd`.

Standard library only: `herd` imports this module and must start fast and
never import trio or the engine.  The daemon imports it too, so the shapes
and error codes below are the single source of truth (documented for
dashboard authors in ``docs/protocol.md``).

Wire format: newline-delimited JSON objects over a Unix stream socket.

* On connect the server sends ``{"hello": "supervisor", "protocol": 1,
  "version": "…", "read-only": bool}``.
* Request: ``{"id": 7, "action": "start", "service": "libvirtd", "args": []}``.
* Reply: ``{"id": 7, "ok": true, "result": …, "messages": […]}`` or
  ``{"id": 7, "ok": false, "error": {"code": "…", "message": "…"}, "messages": […]}``.
* After a successful ``subscribe`` (or ``log`` with ``follow``) the server
  also sends event objects, which carry an ``"event"`` key and no ``"id"``.
  A client more than `MAX_BACKLOG` events behind gets ``{"event":
  "overflow", "stream": "state"|"log", "lost": N}`` in place of the N it lost.
"""

from __future__ import annotations

import math
import os

from herd._json import dumps

# `herd` imports this module on its fast path: no json (it imports re),
# dataclasses, pathlib or typing at import time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any, Final

__all__ = [
    "PROTOCOL_VERSION",
    "MAX_LINE_BYTES",
    "LINE_TIMEOUT",
    "MAX_IN_FLIGHT",
    "MAX_CLIENTS",
    "MAX_QUEUED_BYTES",
    "MAX_TOTAL_QUEUED_BYTES",
    "MAX_BACKLOG",
    "MAX_REPLAY",
    "HEARTBEAT_INTERVAL",
    "MAX_LOG_LINES",
    "READ_ACTIONS",
    "SUMMARY_SECTIONS",
    "summary_section",
    "WRITE_ACTIONS",
    "ERROR_CODES",
    "EXIT_OK",
    "EXIT_FAILED",
    "EXIT_USAGE",
    "EXIT_UNREACHABLE",
    "ProtocolError",
    "Request",
    "DefaultPaths",
    "default_paths",
    "default_socket",
    "encode",
    "decode_request",
    "exit_code_for",
]

PROTOCOL_VERSION: Final = 1

#: Longest request line the server accepts (bytes, newline included).
MAX_LINE_BYTES: Final = 1024 * 1024

#: A request line that has begun must be completed within this many seconds
#: (each line on its own: the clock restarts with every new line).
LINE_TIMEOUT: Final = 10.0
#: Requests in flight at once on one connection.
MAX_IN_FLIGHT: Final = 64
#: Connections at once on one socket.
MAX_CLIENTS: Final = 256
#: Reply bytes queued for a client that does not read; past it, it is disconnected.
MAX_QUEUED_BYTES: Final = 1024 * 1024
#: Reply bytes queued for all clients of both sockets together; past it, the
#: client with the most unread output is disconnected.
MAX_TOTAL_QUEUED_BYTES: Final = 64 * 1024 * 1024
#: Events (state changes, followed log lines) a client may fall behind by;
#: past it, the newer ones are dropped and counted in an ``overflow`` event.
MAX_BACKLOG: Final = 1000
#: State events the daemon keeps, for `subscribe` from an [epoch, seq].
MAX_REPLAY: Final = 2048
#: A subscription with nothing else to send for this many seconds gets a
#: ``heartbeat`` event.
HEARTBEAT_INTERVAL: Final = 5.0
#: Most log lines one `log`/`status` request may ask for.
MAX_LOG_LINES: Final = 10000

#: Built-in actions served on the read-only socket too.  The daemon declares
#: each action once, in its action table (``supervisor/_actions.py``); these
#: sets are that table's names for clients, which do not import the daemon.
READ_ACTIONS: Final = frozenset(
    {"status", "summary", "stats", "detailed-status", "doc", "log", "graph", "subscribe", "ping"}
)
#: Built-in actions that change something; refused on the read-only socket.
#: (``trigger`` is every timer's action; a service type's own actions say
#: themselves whether they only read.)
WRITE_ACTIONS: Final = frozenset(
    {"start", "stop", "restart", "enable", "disable", "spawn", "reload", "reexec",
     "power-off", "reboot", "halt", "trigger"}
)

#: The sections of ``herd status`` (Shepherd's summary), in its order: the
#: keys of a `summary` result.  Every service is in exactly one of them.
SUMMARY_SECTIONS: Final = ("running", "starting", "stopped", "stopping", "respawning", "one-shot",
                           "disabled", "failed")


def summary_section(svc: dict[str, Any]) -> str:
    """The `SUMMARY_SECTIONS` key an SVC object belongs to (daemon and herd alike).

    A stopped service waiting to be respawned is ``respawning``; a stopped,
    disabled one is ``disabled`` whatever its failures; a stopped, enabled one
    with startup failures is ``failed``.
    """
    state = svc.get("state", "stopped")
    if state in ("running", "starting", "stopping"):
        return str(state)
    if svc.get("next-respawn") is not None:
        return "respawning"
    if svc.get("enabled", True) is False:
        return "disabled"
    if svc.get("startup-failures"):
        return "failed"
    return "one-shot" if svc.get("one-shot") else "stopped"

# herd exit statuses.
EXIT_OK: Final = 0
EXIT_FAILED: Final = 1  # the action failed
EXIT_USAGE: Final = 2  # usage error, unknown service or unknown action
EXIT_UNREACHABLE: Final = 3  # no daemon reachable

#: Every error code the server sends, with the herd exit status it maps to
#: and its meaning.  Documented in docs/protocol.md.
ERROR_CODES: Final[dict[str, tuple[int, str]]] = {
    "bad-request": (EXIT_USAGE, "the line is not a JSON object of the request shape"),
    "line-too-long": (EXIT_USAGE, f"a request line exceeded {MAX_LINE_BYTES} bytes; the connection is closed"),
    "timeout": (EXIT_FAILED, "a request line was not completed in time, or an action ran out of time"),
    "too-many-requests": (EXIT_FAILED, "too many requests in flight on this connection"),
    "too-many-clients": (EXIT_FAILED, "the server has too many connections; try again"),
    "unknown-action": (EXIT_USAGE, "no such action, built-in or of this service"),
    "unknown-service": (EXIT_USAGE, "no service provides this name"),
    "bad-arguments": (EXIT_USAGE, "the action's arguments are wrong"),
    "read-only": (EXIT_FAILED, "a write action was sent to the read-only socket"),
    "permission-denied": (EXIT_FAILED, "the requester may not do this (e.g. make root load a file "
                                       "that others can write)"),
    "disabled": (EXIT_FAILED, "the service is disabled; `herd enable` it first"),
    "start-failed": (EXIT_FAILED, "the service (or one of its requirements) failed to start"),
    "stop-failed": (EXIT_FAILED, "the service could not be stopped"),
    "action-failed": (EXIT_FAILED, "a custom action failed"),
    "config-error": (EXIT_FAILED, "the configuration is invalid; nothing was changed"),
    "unsupported": (EXIT_FAILED, "this daemon does not support the request"),
    "shutting-down": (EXIT_FAILED, "the daemon is shutting down"),
    "internal": (EXIT_FAILED, "a bug in the daemon; the message says where"),
}


class ProtocolError(Exception):
    """An error that is sent to the client as ``{"code", "message"}``."""

    def __init__(self, code: str, message: str) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message

    def to_json(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class Request:
    """A parsed request line (a plain class: `dataclasses` is slow to import)."""

    __slots__ = ("id", "action", "service", "args")

    def __init__(self, id: Any, action: str, service: str | None = None, args: list[Any] | None = None) -> None:
        self.id = id
        self.action = action
        self.service = service
        self.args: list[Any] = [] if args is None else args

    def __repr__(self) -> str:
        return f"Request(id={self.id!r}, action={self.action!r}, service={self.service!r}, args={self.args!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Request):
            return NotImplemented
        return (self.id, self.action, self.service, self.args) == (other.id, other.action, other.service, other.args)

    __hash__ = None  # type: ignore[assignment]


def encode(obj: Any) -> bytes:
    """One protocol line: compact JSON, UTF-8, newline-terminated.

    Always valid JSON: a lone surrogate (which a client can send as
    ``"\\ud800"``) goes out as the same ``\\uXXXX`` escape.

    Raises:
        ValueError: `obj` holds a NaN or an infinity (JSON has no such numbers).
    """
    return dumps(obj).encode("utf-8", "backslashreplace") + b"\n"


def _non_finite(obj: Any) -> str | None:
    """Where `obj` holds a NaN or an infinity (``"args[0]"``), or None."""
    stack: list[tuple[str, Any]] = [("", obj)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return where or "the request"
        if isinstance(value, dict):
            stack.extend((f"{where}.{k}" if where else str(k), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(value))
    return None


def decode_request(line: bytes) -> Request:
    """Parse one request line.

    Raises:
        ProtocolError: ``bad-request`` naming what is wrong.  When the line is
            an object with an ``id``, the caller can still address the reply:
            the id is attached as the ``request_id`` attribute.
    """
    import json  # loaded by the daemon anyway; herd never decodes a request

    try:
        obj = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError("bad-request", f"not JSON: {exc}") from None
    except ValueError:  # Python refuses to convert integers of more than 4300 digits
        raise ProtocolError("bad-request", "a number has too many digits") from None
    except RecursionError:
        raise ProtocolError("bad-request", "JSON nested too deeply") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad-request", f"expected a JSON object, got {type(obj).__name__}")
    req_id = obj.get("id")
    if isinstance(req_id, float) and not math.isfinite(req_id):
        req_id = None  # never echoed: JSON has no such number

    def bad(message: str) -> ProtocolError:
        err = ProtocolError("bad-request", message)
        err.request_id = req_id  # type: ignore[attr-defined]
        return err

    where = _non_finite(obj)
    if where is not None:
        raise bad(f"{where[:200]!r} is not a finite number (NaN and Infinity are not JSON)")

    if req_id is not None and not isinstance(req_id, (int, str)) or isinstance(req_id, bool):
        raise bad("'id' must be an integer or a string")
    action = obj.get("action")
    if not isinstance(action, str) or not action:
        raise bad("'action' must be a non-empty string")
    service = obj.get("service")
    if service is not None and not isinstance(service, str):
        raise bad("'service' must be a string or null")
    args = obj.get("args", [])
    if not isinstance(args, list):
        raise bad("'args' must be an array")
    unknown = set(obj) - {"id", "action", "service", "args"}
    if unknown:
        raise bad(f"unknown request keys: {', '.join(sorted(unknown))}")
    return Request(id=req_id, action=action, service=service or None, args=args)


def exit_code_for(error_code: str) -> int:
    """The herd exit status for an error code (unknown codes count as failure)."""
    return ERROR_CODES.get(error_code, (EXIT_FAILED, ""))[0]


class DefaultPaths:
    """The default locations of the configuration, the sockets, the state and the logs."""

    __slots__ = ("config", "socket", "status_socket", "state_dir", "log_dir")

    def __init__(self, config: Path, socket: Path, status_socket: Path, state_dir: Path, log_dir: Path) -> None:
        self.config = config
        self.socket = socket
        self.status_socket = status_socket
        self.state_dir = state_dir
        self.log_dir = log_dir

    def __repr__(self) -> str:
        return "DefaultPaths(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ")"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DefaultPaths):
            return NotImplemented
        return all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    __hash__ = None  # type: ignore[assignment]


def _default_dirs(uid: int | None, env: dict[str, str] | None) -> dict[str, str]:
    """The default locations as strings: FHS paths for root, XDG paths for anyone else."""
    uid = os.getuid() if uid is None else uid
    env = os.environ if env is None else env  # type: ignore[assignment]
    if uid == 0:
        run = "/run/supervisor"
        return {
            "config": "/etc/supervisor/init.toml",
            "socket": f"{run}/control.sock",
            "status_socket": f"{run}/status.sock",
            "state_dir": "/var/lib/supervisor",
            "log_dir": "/var/log/supervisor",
        }
    join = os.path.join
    home = env.get("HOME") or "/"
    config_home = env.get("XDG_CONFIG_HOME") or join(home, ".config")
    state_home = env.get("XDG_STATE_HOME") or join(home, ".local", "state")
    runtime = env.get("XDG_RUNTIME_DIR")
    run = join(runtime, "supervisor") if runtime else f"/tmp/supervisor-{uid}"
    return {
        "config": join(config_home, "supervisor", "init.toml"),
        "socket": join(run, "control.sock"),
        "status_socket": join(run, "status.sock"),
        "state_dir": join(state_home, "supervisor"),
        "log_dir": join(state_home, "supervisor", "log"),
    }


def default_socket(uid: int | None = None, env: dict[str, str] | None = None) -> str:
    """The default control socket (`herd`'s fast path: no :mod:`pathlib`)."""
    return _default_dirs(uid, env)["socket"]


def default_paths(uid: int | None = None, env: dict[str, str] | None = None) -> DefaultPaths:
    """Default locations: FHS paths for root, XDG paths for anyone else."""
    from pathlib import Path

    return DefaultPaths(**{key: Path(value) for key, value in _default_dirs(uid, env).items()})
