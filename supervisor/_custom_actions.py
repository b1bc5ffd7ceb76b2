"""Custom actions declared in the configuration: ``[services.NAME.actions.ACTION]``.

Each has a ``command`` (an argv, never run through a shell; the action's
arguments are appended), ``documentation`` and ``read-only`` (false: the
read-only socket refuses it).  The command runs with the service's
credentials, environment, directory and limits, in its cgroup, with
/dev/null as stdin; its output (stdout and stderr, merged) goes to the
caller, line by line in the reply's messages, and to the service's log.
"""

from __future__ import annotations

import functools
import os
import signal
from dataclasses import replace
from typing import Any, Final

import structlog
import trio

from herd.protocol import ProtocolError

from . import _proc
from .schema import Table
from .spec import ActionContext, ActionSpec

__all__ = ["read_actions", "run_command", "MAX_OUTPUT"]

log = structlog.get_logger("supervisor.engine")

#: Bytes of an action's output kept for the reply (the log gets every line).
MAX_OUTPUT: Final = 256 * 1024

#: Names a configured action may not take: they are herd's and the protocol's own.
RESERVED: Final = frozenset({"start", "stop", "restart", "enable", "disable", "status", "detailed-status",
                             "doc", "log", "graph", "subscribe", "ping", "events", "spawn", "help"})


def read_actions(t: Table, key: str) -> tuple[ActionSpec, ...]:
    """The ``actions`` table of a generic service (errors recorded in `t`)."""
    from .config import NAME_RE

    table = t.table(key)
    if table is None or not table.ok:
        return ()
    out: list[ActionSpec] = []
    for name, value in table.data.items():
        table.seen.add(name)
        sub = Table(value, table.key_path(name), table.errors)
        if not sub.ok:
            continue
        if not NAME_RE.fullmatch(name) or name in RESERVED:
            sub.error(None, f"{name!r} cannot name an action (a name like a service's, "
                            f"not one of {', '.join(sorted(RESERVED))})")
        command = sub.str_list("command", None, required=True, nonempty=True)
        if command is not None and "/" in command[0] and not command[0].startswith("/"):
            sub.error("command", f"the program {command[0]!r} is a relative path; give an absolute path, "
                                 "or a bare name to look up on PATH")
        documentation = sub.str("documentation", "")
        read_only = sub.bool("read-only", False)
        sub.finish()
        if command is not None:
            out.append(ActionSpec(name=name, documentation=documentation, read_only=read_only,
                                  command=tuple(command), handler=functools.partial(run_command, name, tuple(command))))
    return tuple(out)


async def run_command(action: str, command: tuple[str, ...], ctx: ActionContext, args: list[Any]) -> dict[str, Any]:
    """Run a configured action's command for `ctx.service` and wait for it
    (at most the service's ``start-timeout``; then its process group is killed).

    Raises:
        ProtocolError: ``bad-arguments`` (an argument that is not a string),
            ``action-failed`` (it could not start, failed, or ran too long).
    """
    if not all(isinstance(a, str) and "\0" not in a for a in args):
        raise ProtocolError("bad-arguments", f"the arguments of a configured action are strings, got {args!r}")
    service = ctx.engine.lookup(ctx.service)
    spec = replace(service.spec, command=(*command, *args))
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        try:
            cgroup_fd = service.containment.open_for_spawn()
        except OSError as exc:
            raise ProtocolError("action-failed", f"cannot use the cgroup of {service.name}: {exc.strerror}") from None
        try:
            child = _proc.spawn(spec, stdout=w, stderr=w, cgroup_fd=cgroup_fd)
        except _proc.SpawnError as exc:
            raise ProtocolError("action-failed", f"{service.name}: {exc}") from None
        finally:
            if cgroup_fd is not None:
                os.close(cgroup_fd)
    finally:
        os.close(w)
    service.output.note(f"Action {action} started (PID {child.pid}).")
    kept = bytearray()
    timed_out = False
    async with trio.lowlevel.FdStream(r) as pipe:
        with trio.move_on_after(spec.start_timeout) as scope:
            while data := await pipe.receive_some(65536):
                if len(kept) < MAX_OUTPUT:
                    kept += data[: MAX_OUTPUT - len(kept)]
            await child.wait()
        if scope.cancelled_caught:
            timed_out = True
            child.signal_group(signal.SIGKILL)
            with trio.CancelScope(shield=True):
                await child.wait()
    status = child.status
    assert status is not None
    text = kept.decode("utf-8", "replace")
    for line in text.splitlines():
        ctx.say(line)
        service.output.note(f"{action}: {line}")
    outcome = (f"ran longer than {spec.start_timeout:g} s (start-timeout) and was killed" if timed_out
               else status.describe())
    service.output.note(f"Action {action} {outcome}.")
    if timed_out or status.code != 0:
        raise ProtocolError("action-failed", f"{service.name}: the action's command {outcome}")
    return {"service": service.name, "code": status.code, "output": text}
