"""A Prometheus exporter for the supervisor: a client of its read-only socket.

``python -m supervisor_exporter [--listen ADDR:PORT] [-s SOCKET]`` serves
``/metrics`` over HTTP on the address the operator chooses (127.0.0.1:9816
by default), asking the supervisor's status socket at each scrape.  The
daemon itself never listens on the network.  This package is a client: it
imports `herd` (standard library only) and the Prometheus client library,
never the engine.  See ``docs/metrics.md``.
"""
