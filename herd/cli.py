"""``herd``: control the supervisor from the command line.

``herd [-s|--socket PATH] [--json] ACTION [SERVICE] [ARG...]``; see
``herd --help`` and ``docs/protocol.md``.  Standard library only, so that it
starts fast: no trio, no engine code.
"""

from __future__ import annotations

import os
import sys

# The fast path (`herd status`, `herd start X`) imports only what it uses:
# tests/test_herd_unit.py lists the modules and keeps it that way.  New
# features go in modules imported where they are used.
from herd import render
from herd._args import HELP, Call, Invocation, UsageError, parse_args, socket_path
from herd._client import Connection, HerdError, exchange
from herd.protocol import ERROR_CODES, EXIT_FAILED, EXIT_OK, EXIT_USAGE, exit_code_for

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from typing import Any, TextIO

__all__ = ["main"]


def _error(message: str) -> None:
    print(f"herd: error: {message}", file=sys.stderr, flush=True)


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("vmhost-supervisor")
    except metadata.PackageNotFoundError:
        return "unknown"


class _Printer:
    """Writes replies and events to stdout for one invocation."""

    def __init__(self, invocation: Invocation, out: TextIO, color: bool) -> None:
        self.inv = invocation
        self.out = out
        self.color = color
        self.blocks = 0  # status blocks printed so far

    def emit(self, text: str) -> None:
        if text:
            self.out.write(text + "\n")
            if self.inv.follow:
                self.out.flush()

    def reply(self, call: Call, reply: dict[str, Any]) -> int:
        """Show one reply; its exit status."""
        ok = reply.get("ok") is True
        if self.inv.json:
            self.emit(render.json_line(reply.get("result") if ok else reply.get("error")))
        else:
            messages = "\n".join(str(m) for m in reply.get("messages") or [])
            if ok:
                self.emit(self._body(call, reply.get("result"), messages))
            else:
                self.emit(messages)
        if ok:
            return EXIT_OK
        error = reply.get("error")
        error = error if isinstance(error, dict) else {}
        code = str(error.get("code", "internal"))
        if not self.inv.json:
            _error(str(error.get("message") or ERROR_CODES.get(code, (0, code))[1]))
        return exit_code_for(code)

    def _body(self, call: Call, result: Any, messages: str) -> str:
        """Human text for a successful reply."""
        kind = self.inv.kind
        res: dict[str, Any] = result if isinstance(result, dict) else {}
        parts = [messages]
        if kind == "summary":
            if "services" in res:  # a `status` result (a daemon without `summary`)
                parts.append(render.render_summary(res.get("services") or [], color=self.color))
            else:
                parts.append(render.render_sections(res, color=self.color))
        elif kind in ("status", "detailed"):
            services = res.get("services") or []
            text = render.render_services(services, color=self.color)
            if text and self.blocks:
                text = "\n" + text
            self.blocks += len(services)
            parts.append(text)
        elif kind == "change":
            if not messages:
                parts.append(render.render_change(call.action, call.service or "", result))
        elif kind == "doc":
            parts.append(render.render_doc(res))
        elif kind == "log":
            parts.append(render.render_log(res.get("lines") or []))
        elif kind == "graph":
            parts.append(str(res.get("dot", "")).rstrip("\n"))
        elif kind == "ping":
            parts.append(render.render_ping(res))
        elif kind == "custom":
            if not messages:
                parts.append(render.render_value(result))
        return "\n".join(p for p in parts if p)

    def event(self, event: dict[str, Any]) -> None:
        """Show one event object (follow modes); say on stderr when some were lost.
        Heartbeats are shown with ``--json`` only."""
        if event.get("event") == "heartbeat" and not self.inv.json:
            return
        if self.inv.json or self.inv.kind == "events":
            self.emit(render.json_line(event))
        elif event.get("event") == "log":
            self.emit(render.render_logline(event))
        if event.get("event") == "overflow":
            self.out.flush()
            print(f"herd: warning: {render.render_overflow(event)}", file=sys.stderr, flush=True)


def _summary_or_status(conn: Connection, replies: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The `summary` reply, or, from a daemon that predates it (upgraded but
    not yet re-executed), the full `status` asked for in its place.

    Raises:
        HerdError: the connection broke or the server refused it.
    """
    reply = next(replies)
    error = reply.get("error")
    if reply.get("ok") is not True and isinstance(error, dict) and error.get("code") == "unknown-action":
        yield from exchange(conn, [{"id": 2, "action": "status", "service": None, "args": []}])
    else:
        yield reply


def run(invocation: Invocation, conn: Connection, out: TextIO, *, color: bool = False) -> int:
    """Send the invocation's requests on ``conn`` and print the replies.

    In follow modes (``log -f``, ``events``) this then prints events until the
    connection closes or the user interrupts.

    Raises:
        HerdError: the connection broke or the server refused it.
    """
    printer = _Printer(invocation, out, color)
    requests = [call.to_json(i + 1) for i, call in enumerate(invocation.calls)]
    early: list[dict[str, Any]] = []
    status = EXIT_OK
    replies = exchange(conn, requests, on_event=early.append if invocation.follow else None)
    if invocation.kind == "summary" and invocation.calls[0].action == "summary":
        replies = _summary_or_status(conn, replies)
    if invocation.kind == "metrics" and not invocation.json:
        from herd import _metrics  # only here: `herd status` never imports it

        return _metrics.print_metrics(replies, out)
    answered = 0
    progress = None
    if invocation.kind == "change" and not invocation.json and sys.stderr.isatty():
        from herd.progress import Progress

        progress = Progress(conn.path, sys.stderr)
    try:
        if progress is not None:
            progress.__enter__()
        for call, reply in zip(invocation.calls, replies):
            if progress is not None:
                with progress.hold():
                    status = max(status, printer.reply(call, reply))
                    out.flush()
            else:
                status = max(status, printer.reply(call, reply))
            answered += 1
    except KeyboardInterrupt:
        if invocation.follow:
            raise
        if progress is not None:
            progress.__exit__(None, None, None)
            progress = None
        from herd.progress import interrupted_message

        pending = [(c.action, c.service) for c in invocation.calls[answered:]]
        print(f"herd: {interrupted_message(pending)}", file=sys.stderr, flush=True)
        raise
    finally:
        if progress is not None:
            progress.__exit__(None, None, None)
    out.flush()
    if not invocation.follow or status != EXIT_OK:
        return status
    for event in early:
        printer.event(event)
    while True:
        obj = conn.read()
        if "event" in obj:
            printer.event(obj)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``herd`` program; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        invocation = parse_args(argv)
    except UsageError as exc:
        _error(f"{exc} (see 'herd --help')")
        return EXIT_USAGE
    if invocation.show_help:
        print(HELP)
        return EXIT_OK
    if invocation.show_version:
        print(f"herd {_version()}")
        return EXIT_OK
    color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    try:
        if invocation.hosts:
            from herd._remote import run_hosts  # only when --host is given

            return run_hosts(invocation, sys.stdout, color=color)
        with Connection.open(socket_path(invocation)) as conn:
            return run(invocation, conn, sys.stdout, color=color)
    except HerdError as exc:
        _error(exc.message)
        return exc.exit_status
    except KeyboardInterrupt:
        return EXIT_OK if invocation.follow else 130
    except BrokenPipeError:
        # stdout was closed (`herd log -f | head`): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK if invocation.follow else EXIT_FAILED
