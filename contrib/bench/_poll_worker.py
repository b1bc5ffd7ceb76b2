"""Load generator for the polling scenario: K clients in threads, each asking for
the full status of every service, over and over, on one persistent connection.

Run by bench.py with the Python that has the system's client library
(circus needs pyzmq).  Prints one JSON object on stdout:
``{"lat": [seconds...], "in_window": n, "errors": n, "reconnects": n, "reply_bytes": n}``
(`reply_bytes`: the size of one status reply as it crossed the wire; circus:
of the reply its library decoded, encoded again as compact JSON).

Replies are read whole but not parsed (circus's own client library parses its
small JSON replies): the load generator must cost as little CPU as possible,
the machine has two cores.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
import xmlrpc.client

SUPERVISORD_BODY = xmlrpc.client.dumps((), "supervisor.getAllProcessInfo").encode()


class OursClient:
    """Our protocol: newline-delimited JSON on the (read-only) status socket."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(path)
        self.buf = bytearray(1 << 20)
        self.n = 0
        self.size = 0
        self._read_line()  # hello

    def _read_line(self) -> int:
        total = 0
        while True:
            if total == len(self.buf):
                self.buf.extend(bytes(len(self.buf)))
            with memoryview(self.buf) as view:
                tail = view[total:]
                got = self.sock.recv_into(tail)
                tail.release()
            if got == 0:
                raise ConnectionError("closed")
            total += got
            # One reply is one line and the only thing in flight: it is complete
            # when what we have so far ends with the newline.
            if self.buf[total - 1] == 10:
                return total

    def request(self) -> None:
        self.n += 1
        self.sock.sendall(b'{"id":%d,"action":"status"}\n' % self.n)
        n = self.size = self._read_line()
        if b'"ok":true' not in self.buf[:min(n, 200)]:
            raise RuntimeError(bytes(self.buf[:200]).decode(errors="replace"))


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, counter: list[int]) -> None:
        super().__init__("localhost", timeout=60)
        self.path = path
        self.counter = counter

    def connect(self) -> None:
        self.counter[0] += 1
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(self.path)


class SupervisordClient:
    """supervisord's XML-RPC (getAllProcessInfo) over its Unix HTTP socket, keep-alive."""

    def __init__(self, path: str) -> None:
        self.connects = [0]
        self.size = 0
        self.conn = _UnixHTTPConnection(path, self.connects)
        self.conn.connect()

    def request(self) -> None:
        self.conn.request("POST", "/RPC2", body=SUPERVISORD_BODY,
                          headers={"Content-Type": "text/xml", "Connection": "keep-alive"})
        resp = self.conn.getresponse()
        body = resp.read()
        self.size = len(body)
        if resp.status != 200 or b"<fault>" in body[:300]:
            raise RuntimeError(body[:300].decode(errors="replace"))
        if resp.will_close:
            self.conn.close()


class CircusClient:
    """circus's own client library (ZeroMQ): the `status` command of every watcher."""

    def __init__(self, endpoint: str) -> None:
        from circus.client import CircusClient as Lib  # the venv's circus
        self.client = Lib(endpoint=endpoint, timeout=60)
        self.size = 0

    def request(self) -> None:
        res = self.client.call({"command": "status", "properties": {}})
        if not self.size:
            self.size = len(json.dumps(res, separators=(",", ":")).encode())
        if res.get("status") != "ok":
            raise RuntimeError(str(res)[:300])


class Censored(Exception):
    """A request cut off at its time limit: counted with that limit as its latency."""


class CommandClient:
    """s6 / runit: their status commands (no daemon to keep a connection to)."""

    limit = 20.0

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.size = 0

    def request(self) -> None:
        try:
            out = subprocess.run(self.argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 stdin=subprocess.DEVNULL, timeout=self.limit, check=False).stdout
            self.size = len(out)
        except subprocess.TimeoutExpired:
            raise Censored() from None


def make_client(a: argparse.Namespace):
    if a.system == "ours":
        return OursClient(a.target)
    if a.system == "supervisord":
        return SupervisordClient(a.target)
    if a.system == "circus":
        return CircusClient(a.target)
    with open(a.target) as f:
        return CommandClient(json.load(f))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("system")
    p.add_argument("target", help="socket path, endpoint, or a JSON file with an argv")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--start-at", type=float, required=True, help="time.time() to begin at")
    p.add_argument("--duration", type=float, default=10.0)
    a = p.parse_args()

    lock = threading.Lock()
    lat: list[float] = []
    counts = {"in_window": 0, "errors": 0, "reconnects": 0, "censored": 0, "reply_bytes": 0}
    end = a.start_at + a.duration

    def run(client) -> None:
        while time.time() < a.start_at:
            time.sleep(min(0.01, max(0.0, a.start_at - time.time())))
        mine: list[float] = []
        in_window = errors = 0
        while time.time() < end:
            t0 = time.perf_counter()
            try:
                client.request()
            except Censored:
                mine.append(CommandClient.limit)
                with lock:
                    counts["censored"] += 1
                break
            except Exception as exc:  # counted; a broken client stops
                errors += 1
                print(f"poll worker: {type(exc).__name__}: {exc}", file=sys.stderr)
                break
            mine.append(time.perf_counter() - t0)
            if time.time() <= end:
                in_window += 1
        with lock:
            lat.extend(mine)
            counts["in_window"] += in_window
            counts["errors"] += errors
            counts["reply_bytes"] = max(counts["reply_bytes"], getattr(client, "size", 0))
            if isinstance(client, SupervisordClient):
                counts["reconnects"] += client.connects[0] - 1

    clients = []
    for _ in range(a.clients):
        try:
            clients.append(make_client(a))
        except Exception as exc:
            counts["errors"] += 1
            print(f"poll worker: cannot connect: {type(exc).__name__}: {exc}", file=sys.stderr)
    threads = [threading.Thread(target=run, args=(c,), daemon=True) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(a.duration + max(0.0, a.start_at - time.time()) + 150)
    with lock:
        print(json.dumps({"lat": lat, **counts}))


if __name__ == "__main__":
    main()
