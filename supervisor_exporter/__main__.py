"""``python -m supervisor_exporter``: serve the supervisor's metrics over HTTP."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence

from herd.protocol import default_paths

DEFAULT_LISTEN = "127.0.0.1:9816"


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT``.

    Raises:
        argparse.ArgumentTypeError: not of that shape.
    """
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"--listen: expected HOST:PORT (e.g. {DEFAULT_LISTEN}), got {text!r}")
    return host, int(port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="supervisor_exporter", description=(
        "Serve the supervisor's metrics for Prometheus, read from its status socket at each scrape."))
    parser.add_argument("--listen", type=parse_listen, default=DEFAULT_LISTEN, metavar="HOST:PORT",
                        help=f"address to serve /metrics on (default {DEFAULT_LISTEN}; only this host)")
    parser.add_argument("-s", "--socket", default=str(default_paths().status_socket),
                        help="the supervisor's read-only socket (default: %(default)s)")
    args = parser.parse_args(argv)
    from prometheus_client import CollectorRegistry, start_http_server

    from ._collector import SupervisorCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(SupervisorCollector(args.socket))
    host, port = args.listen
    try:
        server, _ = start_http_server(port, host, registry=registry)
    except OSError as exc:
        print(f"supervisor_exporter: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"supervisor_exporter: serving http://{host}:{server.server_port}/metrics "
          f"from {args.socket}", file=sys.stderr, flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
