"""The built-in actions of the control protocol, declared once, in one table.

Each `Action` says what the action is called, whether it acts on the
supervisor itself (service ``root``), whether it only reads (then the
read-only socket serves it too), what arguments it takes (a parser that
validates them), and its handler.  A service type's own actions are declared
the same way in its `ActionSpec` (``read_only``), and every timer's
``trigger`` in `timer.TRIGGER`.  `herd.protocol.READ_ACTIONS` and
``WRITE_ACTIONS`` are this table's names for clients (a test keeps them equal).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import trio

from herd.protocol import HEARTBEAT_INTERVAL, MAX_LOG_LINES, ProtocolError, Request

from ._backlog import Backlog
from ._events import parse_since
from ._messages import say

if TYPE_CHECKING:
    from ._connection import _Connection

__all__ = ["Action", "ACTIONS", "find_action", "root_doc", "STREAMED"]

#: Returned by handlers whose reply was sent before their event stream began.
STREAMED: Final = object()

ArgParser = Callable[[Request], Any]
Handler = Callable[["_Connection", Request, Any], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Action:
    """One built-in action."""

    name: str
    handler: Handler
    #: It changes nothing: the read-only socket serves it too.
    read_only: bool
    #: Validates the request's `args`; what it returns goes to the handler.
    #:
    #: Raises:
    #:     ProtocolError: ``bad-arguments``.
    args: ArgParser
    #: False: any service (or none).  "only": the request names ``root``.
    #: "default": it names ``root`` or no service.
    root: Literal[False, "only", "default"] = False


# -- argument parsers -----------------------------------------------------------------------


def no_args(req: Request) -> None:
    if req.args:
        raise ProtocolError("bad-arguments", f"{req.action!r} takes no arguments, got {req.args!r}")


def count_arg(req: Request, default: int = 10) -> int:
    """``[]`` or ``[N]``: a line count 0-MAX_LOG_LINES (an integer or a string of digits)."""
    if not req.args:
        return default
    if len(req.args) == 1:
        value = req.args[0]
        if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 9:
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_LOG_LINES:
            return value
    raise ProtocolError("bad-arguments",
                        f"{req.action!r} takes at most one argument, a line count 0-{MAX_LOG_LINES}; "
                        f"got {req.args!r}")


def _status_args(req: Request) -> int | None:
    """All services: no arguments (None); one service: a line count."""
    if req.service in (None, "root"):
        no_args(req)
        return None
    return count_arg(req)


def _log_args(req: Request) -> tuple[int, bool]:
    """``[]``, ``[N]`` or ``[N, "follow"]``: (count, follow)."""
    args = list(req.args)
    follow = bool(args) and args[-1] == "follow"
    if follow:
        args.pop()
    return count_arg(Request(req.id, req.action, req.service, args)), follow


def _subscribe_args(req: Request) -> tuple[str, int] | None:
    """``[]`` or ``[EPOCH, SEQ]`` (`_events.parse_since`)."""
    return parse_since(req.args)


def _raw_args(req: Request) -> list[Any]:
    """Checked by the handler itself."""
    return req.args


def _reload_args(req: Request) -> Path | None:
    """``[]`` or ``[ABSOLUTE-FILE]``."""
    if not req.args:
        return None
    file = req.args[0]
    if len(req.args) > 1 or not (isinstance(file, str) and file.startswith("/")):
        raise ProtocolError("bad-arguments", "usage: reload root [ABSOLUTE-FILE]")
    if "\0" in file:
        raise ProtocolError("bad-arguments", f"reload root: the file name {file!r} contains a NUL byte")
    try:
        os.fsencode(file)
    except UnicodeError:
        raise ProtocolError("bad-arguments", f"reload root: the file name {file!r} is not valid text") from None
    return Path(file)


# -- handlers -------------------------------------------------------------------------------


async def _ping(conn: _Connection, req: Request, _: None) -> Any:
    return conn.engine.ping()


async def _status(conn: _Connection, req: Request, lines: int | None) -> Any:
    if lines is None:
        return await conn.engine.status()
    return await conn.engine.status(req.service, log_lines=lines)


async def _summary(conn: _Connection, req: Request, _: None) -> Any:
    return await conn.engine.summary()


async def _stats(conn: _Connection, req: Request, _: None) -> Any:
    return await conn.engine.stats()


async def _detailed_status(conn: _Connection, req: Request, lines: int) -> Any:
    return conn.engine.detailed_status(lines)


async def _doc(conn: _Connection, req: Request, args: list[Any]) -> Any:
    return conn.engine.doc(req.service, args)  # type: ignore[arg-type]


async def _graph(conn: _Connection, req: Request, _: None) -> Any:
    return conn.engine.graph_dot()


async def _log(conn: _Connection, req: Request, parsed: tuple[int, bool]) -> Any:
    n, follow = parsed
    hub = conn.engine.hub
    name: str | None
    if req.service:
        ended = conn.engine.transients.recent_log(req.service, n)
        if ended is not None and req.service not in conn.engine.services:  # a transient, gone
            lines, name = ended, req.service
        else:
            service = conn.engine.lookup(req.service)
            lines = service.recent_log(n)
            name = service.name
    else:
        lines = hub.recent(n)
        name = None
    result = {"lines": [line.to_json() for line in lines]}
    if not follow:
        return result
    # No checkpoint since `recent`: the stream starts right after those lines.
    with hub.follow_into(name, Backlog()) as backlog:
        await conn.stream_events(req, result, "log", lambda line: {"event": "log", **line.to_json()},
                                 backlog=backlog, service=name)
    return STREAMED


async def _subscribe(conn: _Connection, req: Request, since: tuple[str, int] | None) -> Any:
    # No checkpoint between the replay and the subscription: no event is lost or doubled.
    result, replay = conn.engine.events.replay(since)
    with conn.engine.subscribe(replay) as backlog:
        await conn.stream_events(req, result, "state", lambda event: event, backlog=backlog,
                                 heartbeat=HEARTBEAT_INTERVAL)
    return STREAMED


async def _start(conn: _Connection, req: Request, _: None) -> Any:
    return await conn.engine.start(req.service)  # type: ignore[arg-type]


async def _stop(conn: _Connection, req: Request, _: None) -> Any:
    return await conn.engine.stop(req.service)  # type: ignore[arg-type]


async def _restart(conn: _Connection, req: Request, _: None) -> Any:
    return await conn.engine.restart(req.service)  # type: ignore[arg-type]


async def _enable(conn: _Connection, req: Request, _: None) -> Any:
    return await conn.engine.set_enabled(req.service, True)  # type: ignore[arg-type]


async def _disable(conn: _Connection, req: Request, _: None) -> Any:
    return await conn.engine.set_enabled(req.service, False)  # type: ignore[arg-type]


async def _shutdown(conn: _Connection, req: Request, _: None) -> Any:
    """``stop``/``power-off``/``reboot``/``halt`` root."""
    reexec = conn.server.reexec
    if reexec is None:
        raise ProtocolError("unsupported", f"{req.action!r} root is not available here")
    how = "exit" if req.action == "stop" else req.action
    if how != "exit" and os.getpid() != 1:
        raise ProtocolError("action-failed", f"{req.action!r} needs the supervisor to be PID 1")
    reexec.request_shutdown(how)
    say("Stopping every service; the supervisor then exits."
        if how == "exit" else f"Stopping every service, then {req.action}.")
    return {"shutdown": how}


async def _reload(conn: _Connection, req: Request, path: Path | None) -> Any:
    return await conn.engine.reload(path, requester=conn.peer_uid)


def _spawn_args(req: Request) -> list[Any]:
    """``[PROGRAM, ARG...]``: checked by `_transient`."""
    if req.service is None:
        raise ProtocolError("bad-arguments", "usage: spawn NAME -- COMMAND [ARG...]")
    return req.args


async def _spawn(conn: _Connection, req: Request, argv: list[Any]) -> Any:
    return await conn.engine.transients.spawn(req.service, argv, conn.peer_uid)


async def _reexec(conn: _Connection, req: Request, _: None) -> Any:
    reexec = conn.server.reexec
    if reexec is None:
        raise ProtocolError("unsupported", "re-exec is not available here")
    await reexec.prepare(requester=conn)
    # From here on, clients wait for the exec: nothing may cancel it halfway
    # (the requester hanging up included), or they would wait forever.
    with trio.CancelScope(shield=True):
        try:
            conn.send({"id": req.id, "ok": True, "result": {"reexec": True},
                       "messages": ["Re-executing the supervisor; every service keeps running."]})
            with trio.move_on_after(1):  # let the reply reach the client first
                await conn.flushed()
        finally:
            reexec.execute()
    return STREAMED


# -- the table ------------------------------------------------------------------------------

ACTIONS: Final[tuple[Action, ...]] = (
    Action("ping", _ping, read_only=True, args=no_args),
    Action("status", _status, read_only=True, args=_status_args),
    Action("summary", _summary, read_only=True, args=no_args, root="default"),
    Action("stats", _stats, read_only=True, args=no_args),
    Action("detailed-status", _detailed_status, read_only=True, args=count_arg),
    Action("doc", _doc, read_only=True, args=_raw_args),
    Action("graph", _graph, read_only=True, args=no_args),
    Action("log", _log, read_only=True, args=_log_args),
    Action("subscribe", _subscribe, read_only=True, args=_subscribe_args),
    Action("start", _start, read_only=False, args=no_args),
    Action("stop", _stop, read_only=False, args=no_args),
    Action("restart", _restart, read_only=False, args=no_args),
    Action("enable", _enable, read_only=False, args=no_args),
    Action("disable", _disable, read_only=False, args=no_args),
    Action("spawn", _spawn, read_only=False, args=_spawn_args),
    Action("stop", _shutdown, read_only=False, args=no_args, root="only"),
    Action("power-off", _shutdown, read_only=False, args=no_args, root="only"),
    Action("reboot", _shutdown, read_only=False, args=no_args, root="only"),
    Action("halt", _shutdown, read_only=False, args=no_args, root="only"),
    Action("reload", _reload, read_only=False, args=_reload_args, root="default"),
    Action("reexec", _reexec, read_only=False, args=no_args, root="default"),
)

_ROOT: Final = {a.name: a for a in ACTIONS if a.root}
_GENERAL: Final = {a.name: a for a in ACTIONS if not a.root}


def find_action(action: str, service: str | None) -> Action | None:
    """The built-in action a request names; None for a service's own action
    (or an unknown one)."""
    if service in (None, "root"):
        entry = _ROOT.get(action)
        if entry is not None and (service == "root" or entry.root == "default"):
            return entry
    return _GENERAL.get(action)


#: What `doc root` says of the supervisor's own actions (Shepherd's root service).
_ROOT_DOCS: Final = {
    "status": "List every service in Shepherd's sections (the summary).",
    "summary": "The summary's sections alone: each service's name under its state (what herd status prints).",
    "detailed-status": "Show the status of every service, with recent log lines.",
    "doc": "Show the documentation of a service or of one of its actions.",
    "log": "Show recent log lines of every service.",
    "graph": "Show the dependency graph in Graphviz DOT.",
    "reload": "Read the configuration file again (or FILE) and apply it as a diff.",
    "reexec": "Execute the supervisor again in place; every service keeps running.",
    "stop": "Stop every service, dependents first, then exit.",
    "power-off": "Stop every service, then power off (PID 1 only).",
    "reboot": "Stop every service, then reboot (PID 1 only).",
    "halt": "Stop every service, then halt (PID 1 only).",
}


def root_doc(args: list[Any]) -> dict[str, Any]:
    """`doc root [action NAME]`: the supervisor itself, as Shepherd's root service.

    Raises:
        ProtocolError: ``bad-arguments``, or ``unknown-action`` (with a suggestion).
    """
    doc = "The root service is the supervisor itself: its actions operate on every service."
    if not args:
        return {"service": "root", "documentation": doc,
                "actions": [{"name": n, "documentation": d} for n, d in _ROOT_DOCS.items()]}
    if len(args) != 2 or args[0] != "action" or not isinstance(args[1], str):
        raise ProtocolError("bad-arguments", "usage: doc SERVICE [action NAME]")
    if args[1] not in _ROOT_DOCS:
        from herd.suggest import did_you_mean

        raise ProtocolError("unknown-action",
                            f"root has no action {args[1]!r}{did_you_mean(args[1], _ROOT_DOCS)}")
    return {"service": "root", "action": args[1], "documentation": _ROOT_DOCS[args[1]]}
