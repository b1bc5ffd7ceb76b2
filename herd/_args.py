"""Command-line parsing for ``herd``.

``herd [-s|--socket PATH] [--json] ACTION [SERVICE] [ARG...]``.

The grammar is Shepherd's rather than argparse's: the arguments of a custom
action are passed to the daemon verbatim, even when they look like options,
so a small hand-written scanner is used.  Built-in actions also accept the
global options after the action word (``herd status --json``).
"""

from __future__ import annotations

import os

# Plain classes, no `dataclasses`, `typing` or `collections` at run time:
# this module is on `herd`'s fast path (see tests/test_herd_unit.py).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any, Final

__all__ = [
    "Call",
    "Invocation",
    "UsageError",
    "USAGE",
    "HELP",
    "CHANGE_ACTIONS",
    "DEFAULT_LOG_LINES",
    "parse_args",
    "socket_path",
]

#: Lines of log shown when ``-n`` is not given and the daemon needs a number.
DEFAULT_LOG_LINES: Final = 10

#: Actions that take one or more services and print the server's messages.
CHANGE_ACTIONS: Final = ("start", "stop", "restart", "enable", "disable")

#: The actions herd knows by name (for "did you mean").
BUILTIN_ACTIONS: Final = (*CHANGE_ACTIONS, "status", "detailed-status", "doc", "log", "graph", "events",
                          "reload", "reexec", "ping", "spawn", "metrics", "help")

USAGE: Final = "usage: herd [-s|--socket PATH] [--host [USER@]HOST[:SOCKET]]... [--json] ACTION [SERVICE] [ARG...]"

HELP: Final = f"""{USAGE}

Control the supervisor.

Options:
  -s, --socket PATH   control socket (default: $SUPERVISOR_SOCKET, else the
                      supervisor's default socket)
      --host [USER@]HOST[:SOCKET]
                      act on the supervisor of HOST, through ssh (SOCKET:
                      its socket there, else -s, else /run/supervisor/
                      control.sock); repeat for several hosts
      --json          print the daemon's JSON results, one object per line
  -h, --help          show this help and exit
      --version       show the version and exit

Actions:
  status [SERVICE...] [-n N]   summary, or the status of SERVICE with N log lines
  detailed-status [-n N]       the status of every service
  start|stop|restart SERVICE...
  enable|disable SERVICE...
  doc SERVICE [action NAME]    documentation of a service or of one of its actions
  log [SERVICE] [-n N] [-f]    recent log lines; -f follows until interrupted
  graph                        the dependency graph, in Graphviz DOT
  events                       state changes as JSON lines, until interrupted
  metrics                      the services' figures, in the Prometheus text format
  reload root [FILE]           reload the configuration (from FILE)
  reexec root                  re-execute the supervisor in place
  ping                         check that the supervisor answers
  spawn NAME -- COMMAND [ARG...]
                               run COMMAND as a transient service NAME (as you)
  ACTION SERVICE [ARG...]      a custom action of SERVICE

Exit status: 0 success, 1 the action failed, 2 usage error, unknown service
or unknown action, 3 no supervisor reachable."""


class UsageError(Exception):
    """The command line is wrong; herd exits with status 2."""


class _Record:
    """A small value class: keyword construction, equality and repr from ``__slots__``."""

    __slots__: tuple[str, ...] = ()
    _defaults: tuple[Any, ...] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        values = dict(zip(self.__slots__, self._defaults))
        if len(args) > len(self.__slots__):
            raise TypeError(f"{type(self).__name__} takes at most {len(self.__slots__)} arguments")
        values.update(zip(self.__slots__, args))
        for key, value in kwargs.items():
            if key not in values:
                raise TypeError(f"{type(self).__name__} has no field {key!r}")
            values[key] = value
        for key, value in values.items():
            setattr(self, key, value)

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, key) for key in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{key}={value!r}" for key, value in zip(self.__slots__, self._values()))
        return f"{type(self).__name__}({fields})"


class Call(_Record):
    """One request to send to the daemon: ``Call(action, service=None, args=())``."""

    __slots__ = ("action", "service", "args")
    _defaults = ("", None, ())
    action: str
    service: str | None
    args: tuple[Any, ...]

    def to_json(self, req_id: int) -> dict[str, Any]:
        """The request object, with ``req_id`` as its ``id``."""
        return {"id": req_id, "action": self.action, "service": self.service, "args": list(self.args)}


class Invocation(_Record):
    """What one ``herd`` command line asks for.

    ``kind`` names how the replies are shown: ``summary``, ``status``,
    ``detailed``, ``change``, ``doc``, ``log``, ``graph``, ``events``, ``metrics``,
    ``ping`` or ``custom``.
    """

    __slots__ = ("action", "kind", "calls", "socket", "json", "follow", "hosts", "show_help", "show_version")
    _defaults = ("", "", (), None, False, False, (), False, False)
    action: str
    kind: str
    calls: tuple[Call, ...]
    socket: str | None
    json: bool
    follow: bool
    hosts: tuple[str, ...]
    show_help: bool
    show_version: bool


class _Options:
    __slots__ = ("socket", "json", "help", "version", "lines", "follow", "hosts")

    def __init__(self) -> None:
        self.socket: str | None = None
        self.json = False
        self.help = False
        self.version = False
        self.lines: int | None = None
        self.follow = False
        self.hosts: list[str] = []


def _take_value(tokens: Sequence[str], i: int, short: str, longs: Sequence[str]) -> tuple[str, int] | None:
    """Parse an option with a value at ``tokens[i]``: ``-x V``, ``-xV``, ``--long V``, ``--long=V``.

    Returns ``(value, next index)``, or None when ``tokens[i]`` is not this option.

    Raises:
        UsageError: the value is missing.
    """
    tok = tokens[i]
    if tok == short or tok in longs:
        if i + 1 >= len(tokens):
            raise UsageError(f"option {tok} needs a value")
        return tokens[i + 1], i + 2
    if not tok.startswith("--") and tok.startswith(short) and len(tok) > len(short):
        return tok[len(short) :], i + 1
    for name in longs:
        if tok.startswith(name + "="):
            return tok[len(name) + 1 :], i + 1
    return None


def _global_option(tokens: Sequence[str], i: int, opts: _Options) -> int | None:
    """Consume a global option at ``tokens[i]``; the next index, or None if it is not one."""
    tok = tokens[i]
    if tok == "--json":
        opts.json = True
        return i + 1
    if tok in ("-h", "--help"):
        opts.help = True
        return i + 1
    if tok == "--version":
        opts.version = True
        return i + 1
    taken = _take_value(tokens, i, "-s", ("--socket",))
    if taken is not None:
        value, nxt = taken
        if not value:
            raise UsageError("the socket path is empty")
        opts.socket = value
        return nxt
    if tok == "--host" or tok.startswith("--host="):
        if tok == "--host" and i + 1 >= len(tokens):
            raise UsageError("option --host needs a value")
        value, nxt = (tokens[i + 1], i + 2) if tok == "--host" else (tok[len("--host=") :], i + 1)
        from herd._remote import parse_host  # only when --host is given

        parse_host(value)
        opts.hosts.append(value)
        return nxt
    return None


def _count(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise UsageError(f"expected a number of lines, got {text!r}") from None
    if value < 0:
        raise UsageError(f"the number of lines must not be negative, got {value}")
    return value


def _scan(action: str, tokens: Sequence[str], opts: _Options, *, lines: bool = False, follow: bool = False) -> list[str]:
    """Split the words after a built-in action into options and positionals."""
    positionals: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == "--":
            positionals.extend(tokens[i + 1 :])
            break
        if not tok.startswith("-") or tok == "-":
            positionals.append(tok)
            i += 1
            continue
        nxt = _global_option(tokens, i, opts)
        if nxt is not None:
            i = nxt
            continue
        if lines:
            taken = _take_value(tokens, i, "-n", ("--lines", "--log-history"))
            if taken is not None:
                opts.lines = _count(taken[0])
                i = taken[1]
                continue
        if follow and tok in ("-f", "--follow"):
            opts.follow = True
            i += 1
            continue
        raise UsageError(f"unknown option {tok!r} for {action!r}")
    return positionals


def _no_service(action: str, positionals: list[str]) -> None:
    if positionals not in ([], ["root"]):
        raise UsageError(f"{action!r} takes no service, got {' '.join(positionals)!r}")


def _leading_options(tokens: Sequence[str], opts: _Options) -> int:
    """Consume global options at the start of ``tokens``; the index of the first other word."""
    i = 0
    while i < len(tokens):
        if tokens[i] == "--":
            return i + 1
        if not tokens[i].startswith("-") or tokens[i] == "-":
            return i
        nxt = _global_option(tokens, i, opts)
        if nxt is None:
            raise UsageError(f"unknown option {tokens[i]!r}")
        i = nxt
    return i


def _plan(action: str, rest: Sequence[str], opts: _Options) -> tuple[str, list[Call]]:
    """The rendering kind and the requests for ``action`` with words ``rest``."""
    if action == "status":
        pos = _scan(action, rest, opts, lines=True)
        if pos in ([], ["root"]):  # the sections alone (names only); --json prints every SVC object
            return "summary", [Call("status" if opts.json else "summary")]
        n_args: tuple[Any, ...] = () if opts.lines is None else (opts.lines,)
        return "status", [Call("status", name, n_args) for name in pos]
    if action == "detailed-status":
        _no_service(action, _scan(action, rest, opts, lines=True))
        return "detailed", [Call("detailed-status", None, () if opts.lines is None else (opts.lines,))]
    if action in CHANGE_ACTIONS:
        pos = _scan(action, rest, opts)
        if not pos:
            raise UsageError(f"{action!r} needs at least one SERVICE")
        return "change", [Call(action, name) for name in pos]
    if action == "doc":
        pos = _scan(action, rest, opts)
        if len(pos) == 1:
            return "doc", [Call("doc", pos[0])]
        if len(pos) == 3 and pos[1] == "action":
            return "doc", [Call("doc", pos[0], ("action", pos[2]))]
        raise UsageError("usage: herd doc SERVICE [action NAME]")
    if action == "log":
        pos = _scan(action, rest, opts, lines=True, follow=True)
        if len(pos) > 1:
            raise UsageError("usage: herd log [SERVICE] [-n N] [-f]")
        log_args: list[Any] = []
        if opts.lines is not None or opts.follow:
            log_args.append(DEFAULT_LOG_LINES if opts.lines is None else opts.lines)
        if opts.follow:
            log_args.append("follow")
        return "log", [Call("log", pos[0] if pos else None, tuple(log_args))]
    if action in ("graph", "ping"):
        _no_service(action, _scan(action, rest, opts))
        return action, [Call(action)]
    if action == "spawn":
        # the command's own words are never herd's options: only those before NAME are
        start = _leading_options(rest, opts)
        words = list(rest[start:])
        if len(words) < 3 or words[1] != "--":
            raise UsageError("usage: herd spawn NAME -- COMMAND [ARG...]")
        return "custom", [Call("spawn", words[0], tuple(words[2:]))]
    if action == "metrics":
        _no_service(action, _scan(action, rest, opts))
        return "metrics", [Call("ping"), Call("status"), Call("stats")]
    if action == "events":
        _no_service(action, _scan(action, rest, opts))
        opts.follow = True
        return "events", [Call("subscribe")]

    # Custom actions, and the built-in `reload root` / `reexec root`.
    start = _leading_options(rest, opts)
    if start >= len(rest):
        from herd.suggest import did_you_mean

        hint = did_you_mean(action, BUILTIN_ACTIONS)
        if hint:
            raise UsageError(f"unknown action {action!r}{hint}")
        raise UsageError(f"{action!r} needs a SERVICE (custom actions: herd ACTION SERVICE [ARG...])")
    service, args = rest[start], list(rest[start + 1 :])
    if service == "root" and action in ("reload", "reexec"):
        pos = _scan(action, args, opts)
        if action == "reexec":
            if pos:
                raise UsageError("usage: herd reexec root")
            return "custom", [Call("reexec", "root")]
        if len(pos) > 1:
            raise UsageError("usage: herd reload root [FILE]")
        return "custom", [Call("reload", "root", tuple(os.path.abspath(p) for p in pos))]
    return "custom", [Call(action, service, tuple(args))]


def parse_args(argv: Sequence[str]) -> Invocation:
    """Parse ``herd``'s arguments (without the program name).

    Raises:
        UsageError: the command line is wrong.
    """
    opts = _Options()
    argv = list(argv)
    start = _leading_options(argv, opts)
    if opts.help:
        return Invocation(show_help=True)
    if opts.version:
        return Invocation(show_version=True)
    if start >= len(argv):
        raise UsageError("missing ACTION")
    action, rest = argv[start], argv[start + 1 :]
    if action == "help":
        return Invocation(show_help=True)
    kind, calls = _plan(action, rest, opts)
    if opts.help:
        return Invocation(show_help=True)
    if opts.version:
        return Invocation(show_version=True)
    return Invocation(
        action=action,
        kind=kind,
        calls=tuple(calls),
        socket=opts.socket,
        json=opts.json,
        follow=opts.follow,
        hosts=tuple(opts.hosts),
    )


def socket_path(invocation: Invocation, env: dict[str, str] | None = None) -> str:
    """The socket to use: ``-s``, else ``$SUPERVISOR_SOCKET``, else the default."""
    if invocation.socket:
        return invocation.socket
    env = dict(os.environ) if env is None else env
    if env.get("SUPERVISOR_SOCKET"):
        return env["SUPERVISOR_SOCKET"]
    from herd.protocol import default_socket

    return default_socket(env=env)

