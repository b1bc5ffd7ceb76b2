"""``supervisor-status-page``: serve the live status page.

::

    supervisor-status-page [--listen ADDR:PORT] [-s|--status-socket PATH]
                           [--host [USER@]HOST[:SOCKET]]... [--no-local]
                           [--log-lines N] [--server-name NAME]...
                           [--allow-writes --token-file FILE [--control-socket PATH]]

Prints ``listening on http://ADDR:PORT/`` on stdout once it serves.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from collections.abc import Sequence
from typing import Final

import trio

from herd._args import UsageError
from herd._remote import DEFAULT_REMOTE_STATUS_SOCKET, parse_host
from herd.protocol import default_paths
from statuspage._app import App
from statuspage._auth import Sessions, TokenError, load_token
from statuspage._http import serve
from statuspage._hub import HostState, Hub, watch
from statuspage._source import Target

__all__ = ["main", "DEFAULT_LISTEN"]

DEFAULT_LISTEN: Final = "127.0.0.1:8470"


def _listen(text: str) -> tuple[str, int]:
    """``ADDR:PORT`` (``[ADDR]:PORT`` for IPv6).

    Raises:
        argparse.ArgumentTypeError: not an IP address and a port.
    """
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
        number = int(port, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ADDR:PORT with an IP address, got {text!r}") from None
    if not sep or not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"expected ADDR:PORT with a port from 0 to 65535, got {text!r}")
    return host, number


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="supervisor-status-page",
        description="Serve a live status page for one or more supervisors (see docs/status-page.md).")
    p.add_argument("--listen", type=_listen, default=_listen(DEFAULT_LISTEN), metavar="ADDR:PORT",
                   help=f"where to serve HTTP (default {DEFAULT_LISTEN}; port 0 picks a free one)")
    p.add_argument("-s", "--status-socket", metavar="PATH",
                   help="the local supervisor's read-only socket (default: the supervisor's default)")
    p.add_argument("--host", action="append", default=[], metavar="[USER@]HOST[:SOCKET]",
                   help="also show the supervisor of HOST, through ssh as herd --host reaches it "
                        f"(SOCKET defaults to {DEFAULT_REMOTE_STATUS_SOCKET}); repeatable")
    p.add_argument("--no-local", action="store_true", help="show only the --host supervisors")
    p.add_argument("--log-lines", type=int, default=20, metavar="N",
                   help="recent log lines kept per service (default 20, at most 1000)")
    p.add_argument("--server-name", action="append", default=[], metavar="NAME[:PORT]",
                   help="another name browsers use for this server (behind a proxy); repeatable")
    p.add_argument("--allow-writes", action="store_true",
                   help="offer start/stop/restart/enable/disable for the local supervisor (needs --token-file)")
    p.add_argument("--token-file", metavar="FILE",
                   help="the operator's token (a file only this user can read); needed with --allow-writes")
    p.add_argument("--control-socket", metavar="PATH",
                   help="the local read-write socket for write actions (default: the supervisor's default)")
    return p


def _names(addr: str, port: int, extra: Sequence[str]) -> list[str]:
    shown = f"[{addr}]" if ":" in addr else addr
    names = [f"{shown}:{port}"]
    if ipaddress.ip_address(addr).is_loopback:
        names.append(f"localhost:{port}")
    names += [n if ":" in n.rsplit("]", 1)[-1] else f"{n}:{port}" for n in extra]
    return names


async def _serve(addr: str, port: int, hosts: list[HostState], extra_names: Sequence[str],
                 sessions: Sessions | None, control: str | None) -> None:
    listeners = await trio.open_tcp_listeners(port, host=addr)  # OSError here: not yet in a nursery
    bound = listeners[0].socket.getsockname()[1]
    hub = Hub(hosts)
    app = App(hub, server_names=_names(addr, bound, extra_names), sessions=sessions, control_socket=control)
    async with trio.open_nursery() as nursery:
        for host in hosts:
            nursery.start_soon(watch, hub, host)
        nursery.start_soon(serve, listeners, app)
        shown = f"[{addr}]" if ":" in addr else addr
        print(f"listening on http://{shown}:{bound}/", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """The program; its exit status (2 for a usage error)."""
    parser = _parser()
    args = parser.parse_args(argv)
    addr, port = args.listen
    if not 0 <= args.log_lines <= 1000:
        parser.error("--log-lines must be from 0 to 1000")
    hosts: list[HostState] = []
    paths = default_paths()
    writable = False
    sessions = None
    if args.allow_writes:
        if args.no_local:
            parser.error("--allow-writes acts on the local supervisor: it cannot go with --no-local")
        if not args.token_file:
            parser.error("--allow-writes needs --token-file FILE")
        try:
            sessions = Sessions(load_token(args.token_file))
        except TokenError as exc:
            print(f"supervisor-status-page: error: {exc}", file=sys.stderr)
            return 2
        writable = True
    elif args.token_file or args.control_socket:
        parser.error("--token-file and --control-socket only go with --allow-writes")
    if not args.no_local:
        path = args.status_socket or str(paths.status_socket)
        hosts.append(HostState(Target("local", path), args.log_lines, writable))
    for text in args.host:
        try:
            remote = parse_host(text)
        except UsageError as exc:
            parser.error(str(exc))
        hosts.append(HostState(Target(text, remote.socket_or(DEFAULT_REMOTE_STATUS_SOCKET), remote),
                               args.log_lines))
    if not hosts:
        parser.error("nothing to show: --no-local needs at least one --host")
    control = (args.control_socket or str(paths.socket)) if writable else None
    try:
        trio.run(_serve, addr, port, hosts, args.server_name, sessions, control)
    except OSError as exc:
        print(f"supervisor-status-page: error: cannot listen on {addr}:{port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0
