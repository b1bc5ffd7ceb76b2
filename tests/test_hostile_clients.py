"""Issue 15: clients that are hostile, careless or just slow, on the control sockets.

The read-only socket refuses everything that changes something; each request
line has its own timeout; NaN, infinities and huge numbers are bad requests
(never invalid JSON back, never a traceback in the log); a reload refuses
what it cannot read safely (a FIFO, a NUL in the name) and, for a non-root
client, any file that someone else than root could write; a follower that
falls behind is told how much it lost; and unread replies cannot take the
daemon's memory with them.
"""

from __future__ import annotations

import json
import os
import re
import select
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from helpers import (
    PY,
    Client,
    Deadline,
    Supervisor,
    WAIT_GATE,
    base_env,
    make_gate,
    nobody_python,
    open_gate,
    run_herd,
    sleeper,
    wait_until,
)

from herd.protocol import LINE_TIMEOUT


def _strict_json(line: bytes) -> Any:
    """Parse like a strict JSON parser would: NaN and Infinity are not JSON."""
    def refuse(name: str) -> None:
        raise AssertionError(f"invalid JSON from the daemon ({name}): {line[:200]!r}")
    return json.loads(line, parse_constant=refuse)


def _daemon_log(sup: Supervisor) -> list[dict[str, Any]]:
    """The daemon's own log records (it runs with --log-format json)."""
    records = []
    for line in sup.stderr_path.read_text(errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            records.append({"event": line, "level": "raw"})
    return records


# --------------------------------------------------------------------------
# Item 3: the read-only socket


def test_read_only_socket_refuses_everything_that_changes_something(sup: Supervisor, tmp_path: Path) -> None:
    ran = tmp_path / "timer-ran"
    sup.start({"services": {
        "a": sleeper(sup.marker("a"), **{"auto-start": False}),
        # A timer that would run once a year by itself; `trigger` runs it now.
        "yearly": {"command": [PY, "-c", "import sys; open(sys.argv[1], 'a').write('ran\\n')", str(ran)],
                   "schedule": "0 0 1 1 *"},
    }})
    wait_until(lambda: sup.rstatus("yearly")["state"] == "running", 10, "the timer armed")
    ro = sup.connect(ro=True)
    for action, service in [("trigger", "yearly"), ("power-off", "root"), ("reboot", "root"),
                            ("halt", "root"), ("stop", "root"), ("stop", None), ("reload", None),
                            ("start", "a"), ("disable", "a")]:
        rep = ro.call(action, service)
        assert rep["ok"] is False and rep["error"]["code"] == "read-only", (action, service, rep)
        assert action in rep["error"]["message"], rep
    assert not ran.exists(), "the read-only socket ran the timer's command"
    cp = run_herd(sup.status_socket, "trigger", "yearly", check=1)
    assert "read-only" in cp.stderr and "Traceback" not in cp.stderr, cp.stderr
    assert not ran.exists()

    # Unknown actions and services are still told apart from refused ones.
    assert ro.call("frobnicate", "a")["error"]["code"] == "unknown-action"
    assert ro.call("frobnicate")["error"]["code"] == "unknown-action"
    assert ro.call("trigger", "a")["error"]["code"] == "unknown-action"  # not a timer
    assert ro.call("trigger", "nope")["error"]["code"] == "unknown-service"
    # What only reads is served; the timer's action is documented.
    for action, service in [("status", "yearly"), ("doc", "yearly"), ("log", "yearly"), ("ping", None)]:
        assert ro.call(action, service)["ok"] is True, action
    doc = ro.call("doc", "yearly", ["action", "trigger"])
    assert doc["ok"] is True and "now" in doc["result"]["documentation"], doc

    # The control socket does run it.
    rw = sup.connect()
    rep = rw.call("trigger", "yearly")
    assert rep["ok"] is True, rep
    wait_until(ran.exists, 10, "the triggered run")
    assert sup.proc.poll() is None


# --------------------------------------------------------------------------
# Item 9: protocol bugs


def test_each_request_line_has_its_own_timeout(sup: Supervisor) -> None:
    """A client whose lines straddle its writes is served for as long as it
    likes; a line that is begun and never finished is still cut off."""
    sup.start({"services": {}})
    slow = sup.connect(timeout=30)
    stalled = sup.connect(timeout=30)
    stalled.send_raw(b'{"id": "stalled", "action": "pi')
    slow.send_raw(b'{"id": 0, "action": "pi')
    began = time.monotonic()
    n = 0
    while time.monotonic() - began < LINE_TIMEOUT + 3:
        time.sleep(1)  # the client is slow: this is its pace, not a wait for the daemon
        n += 1
        slow.send_raw(b'ng"}\n{"id": %d, "action": "pi' % n)
        rep = slow.reply(n - 1, timeout=10)
        assert rep["ok"] is True and rep["result"]["pong"] is True, rep
    slow.send_raw(b'ng"}\n')
    assert slow.reply(n, timeout=10)["ok"] is True

    rep = stalled.recv(timeout=LINE_TIMEOUT + 10)
    assert rep is not None and rep["ok"] is False and rep["error"]["code"] == "timeout", rep
    assert stalled.recv(timeout=10) is None  # and closed


def _raw_replies(sup: Supervisor, lines: list[bytes], count: int) -> list[Any]:
    """Send raw lines on one connection; the next `count` reply lines, strictly parsed."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(sup.socket))
    try:
        s.sendall(b"".join(line + b"\n" for line in lines))
        buf = b""
        out: list[Any] = []
        deadline = Deadline(10)
        while len(out) < count + 1:  # the hello first
            while b"\n" not in buf:
                s.settimeout(max(deadline.remaining(), 0.01))
                chunk = s.recv(65536)
                assert chunk, f"connection closed after {out}"
                buf += chunk
            line, _, buf = buf.partition(b"\n")
            out.append(_strict_json(line))
        return out[1:]
    finally:
        s.close()


def test_non_finite_and_huge_numbers_are_bad_requests_and_log_no_traceback(sup: Supervisor) -> None:
    sup.start({"services": {"a": sleeper(sup.marker("a"), **{"auto-start": False})}})
    lines = [
        b'{"id": NaN, "action": "ping"}',
        b'{"id": Infinity, "action": "ping"}',
        b'{"id": -Infinity, "action": "ping"}',
        b'{"id": 1e999, "action": "ping"}',
        b'{"id": 7, "action": "status", "service": "a", "args": [NaN]}',
        b'{"id": 8, "action": "log", "args": [{"deep": [1, -Infinity]}]}',
        b'{"id": ' + b"9" * 5000 + b', "action": "ping"}',
        b'{"id": 10, "action": "status", "args": [' + b"1" * 5000 + b"]}",
    ]
    for _ in range(3):  # every time, not just the first
        replies = _raw_replies(sup, lines, len(lines))
        for line, rep in zip(lines, replies):
            assert rep["ok"] is False and rep["error"]["code"] == "bad-request", (line[:60], rep)
        assert [r["id"] for r in replies] == [None, None, None, None, 7, 8, None, None], replies
        assert "'args[0]'" in replies[4]["error"]["message"], replies[4]
        assert "'args[0].deep[1]'" in replies[5]["error"]["message"], replies[5]
        assert "too many digits" in replies[6]["error"]["message"], replies[6]
    # A finite float id is no id, but it may be echoed: it is valid JSON.
    rep = _raw_replies(sup, [b'{"id": 1.5, "action": "ping"}'], 1)[0]
    assert rep["error"]["code"] == "bad-request" and rep["id"] == 1.5
    assert sup.request({"action": "ping"})["ok"] is True

    # Client mistakes are not daemon errors: no traceback, nothing at error level.
    records = _daemon_log(sup)
    bad = [r for r in records if r.get("level") in ("error", "critical", "raw") or "exception" in r]
    assert not bad, bad[:3]


def test_reload_with_a_nul_in_the_file_name_is_a_clear_error(sup: Supervisor) -> None:
    sup.start({"services": {}})
    for path in ("/etc/sup\x00ervisor.toml", "/tmp/\ud800.toml"):
        rep = sup.request({"action": "reload", "service": "root", "args": [path]})
        assert rep["ok"] is False and rep["error"]["code"] == "bad-arguments", rep
        assert "file name" in rep["error"]["message"] and "reload root" in rep["error"]["message"], rep
    assert not [r for r in _daemon_log(sup) if r.get("level") == "error" or "exception" in r]


# --------------------------------------------------------------------------
# Item 8 and "reload from a non-root client"


def test_reload_refuses_what_is_not_a_regular_file_without_blocking(sup: Supervisor, tmp_path: Path) -> None:
    sup.start({"services": {"a": sleeper(sup.marker("a"), **{"auto-start": False})}})
    fifo = tmp_path / "init.fifo"
    os.mkfifo(fifo)
    try:
        c = sup.connect(timeout=15)
        reload_id = c.send({"action": "reload", "service": "root", "args": [str(fifo)]})
        # The daemon keeps answering meanwhile, on other connections too.
        assert sup.request({"action": "ping"}, timeout=10)["ok"] is True
        rep = c.reply(reload_id, timeout=10)
        assert rep["ok"] is False and rep["error"]["code"] == "config-error", rep
        assert str(fifo) in rep["error"]["message"] and "FIFO" in rep["error"]["message"], rep
    finally:
        try:  # the old daemon blocks in open(): give it a writer so that it can go on
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    for path, kind in ((tmp_path, "directory"), (Path("/dev/zero"), "character device")):
        rep = sup.request({"action": "reload", "service": "root", "args": [str(path)]})
        assert rep["error"]["code"] == "config-error" and kind in rep["error"]["message"], rep
    cp = run_herd(sup.socket, "reload", "root", str(fifo), check=1)
    assert "not a regular file" in cp.stderr, cp.stderr
    assert set(sup.rstatus()) == {"a"}  # nothing changed


_AS_NOBODY = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(20)
s.connect(sys.argv[1])
f = s.makefile("rwb")
f.readline()  # hello
for i, path in enumerate(sys.argv[2:]):
    args = [path] if path != "-" else []
    f.write(json.dumps({"id": i, "action": "reload", "service": "root", "args": args}).encode() + b"\n")
    f.flush()
    print(f.readline().decode().strip(), flush=True)
"""


def test_reload_from_a_group_member_loads_only_root_owned_unwritable_files(sup: Supervisor,
                                                                           tmp_path: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root: the daemon runs as root and the client as nobody")
    python = nobody_python()
    nobody = 65534
    os.chmod(sup.sockdir, 0o755)  # nobody reaches the socket through its group only
    base = {"supervisor": {"socket-group": nobody},
            "services": {"a": sleeper(sup.marker("a"), **{"auto-start": False})}}
    sup.start(base)
    assert stat.S_IMODE(os.stat(sup.socket).st_mode) == 0o660

    def config(name: str, uid: int, mode: int) -> Path:
        path = tmp_path / f"{name}.toml"
        services = {**base["services"], name: sleeper(sup.marker(name), **{"auto-start": False})}
        sup.write_config({**base, "services": services}, path)
        os.chown(path, uid, 0)
        os.chmod(path, mode)
        return path

    theirs = config("theirs", nobody, 0o644)
    group_writable = config("grp", 0, 0o664)
    world_writable = config("world", 0, 0o646)
    good = config("good", 0, 0o644)

    def as_nobody(*paths: str) -> list[dict[str, Any]]:
        cp = subprocess.run([python, "-c", _AS_NOBODY, str(sup.socket), *paths], user=nobody, group=nobody,
                            extra_groups=[], capture_output=True, text=True, timeout=60, env={})
        assert cp.returncode == 0, cp.stderr
        return [json.loads(line) for line in cp.stdout.splitlines()]

    replies = as_nobody(str(theirs), str(group_writable), str(world_writable))
    for rep, path, why in zip(replies, (theirs, group_writable, world_writable),
                              ("belongs to uid 65534", "writable by its group", "writable by others")):
        assert rep["ok"] is False and rep["error"]["code"] == "permission-denied", rep
        assert str(path) in rep["error"]["message"] and why in rep["error"]["message"], rep
    assert set(sup.rstatus()) == {"a"}, "a refused file was loaded"

    assert as_nobody(str(good))[0]["result"]["added"] == ["good"]
    # Root (here: the test, on the same socket) may load any file ...
    rep = sup.request({"action": "reload", "service": "root", "args": [str(theirs)]})
    assert rep["ok"] is True and rep["result"]["added"] == ["theirs"], rep
    # ... and a group member's plain `reload root` re-reads that same file: refused too.
    rep = as_nobody("-")[0]
    assert rep["error"]["code"] == "permission-denied" and str(theirs) in rep["error"]["message"], rep
    cp = run_herd(sup.socket, "reload", "root", str(good), check=True)  # root, through herd
    assert "Service theirs has been removed." in cp.stdout, cp.stdout


# --------------------------------------------------------------------------
# Item 7: followers that fall behind


_BURST = WAIT_GATE + r"""
import os, sys, time
go, again, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
print("ready", flush=True)
wait_gate(go)
for i in range(n):
    sys.stdout.write(f"burst-line-{i:06d} " + "x" * 80 + "\n")
sys.stdout.flush()
print("burst-done", flush=True)
wait_gate(again)
print("after-the-gap", flush=True)
time.sleep(1e6)
"""


class _Lines:
    """Reads a pipe line by line with deadlines (the test decides when to read)."""

    def __init__(self, pipe: Any) -> None:
        self.fd = pipe.fileno()
        self.buf = b""

    def until(self, predicate: Any, timeout: float) -> list[str]:
        got: list[str] = []
        deadline = Deadline(timeout)
        while True:
            while b"\n" in self.buf:
                line, _, self.buf = self.buf.partition(b"\n")
                got.append(line.decode(errors="replace"))
                if predicate(got[-1]):
                    return got
            left = deadline.remaining()
            assert left > 0, f"no matching line within {timeout} s; last lines: {got[-5:]}"
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                chunk = os.read(self.fd, 1 << 20)
                assert chunk, f"end of output; last lines: {got[-5:]}"
                self.buf += chunk


def test_log_follower_that_falls_behind_is_told_how_many_lines_it_lost(sup: Supervisor, tmp_path: Path) -> None:
    n = 30000
    go, again = make_gate(tmp_path / "go"), make_gate(tmp_path / "again")
    sup.start({"services": {"burst": {"command": [PY, "-c", _BURST, str(go), str(again), str(n)]}}})
    sup.wait_log("burst", lambda t: t == "ready")
    herd = subprocess.Popen([sys.executable, "-m", "herd", "-s", str(sup.socket), "log", "burst", "-f"],
                            env=base_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        out = _Lines(herd.stdout)
        out.until(lambda line: line.endswith("stdout: ready"), 20)
        open_gate(go)  # and read nothing while the service writes its burst
        sup.wait_log("burst", lambda t: t == "burst-done", timeout=60)
        open_gate(again)
        lines = out.until(lambda line: line.endswith("stdout: after-the-gap"), 60)
    finally:
        herd.terminate()
        _, err = herd.communicate(timeout=20)
    # Between "ready" and "after-the-gap" the service wrote n burst lines and
    # "burst-done": each was either received or counted as lost.
    received = sum(1 for line in lines[:-1] if " stdout: " in line)
    gaps = [int(m) for m in re.findall(rb"herd: warning: (\d+) log lines lost \(client too slow\)\n", err)]
    assert gaps, f"herd said nothing about lost lines; stderr: {err[-500:]!r}, {received} of {n} lines received"
    assert all(lost > 0 for lost in gaps) and received + sum(gaps) == n + 1, (received, gaps)


def test_subscriber_that_falls_behind_gets_an_overflow_event(sup: Supervisor) -> None:
    sup.start({"services": {"a": sleeper(sup.marker("a"), **{"auto-start": False})}})
    lagging = sup.subscribe(ro=True)  # reads nothing until the end
    toggles = 6000
    c = sup.connect(timeout=60)
    window = 64
    for start in range(0, toggles, window):
        ids = [c.send({"action": "disable" if i % 2 == 0 else "enable", "service": "a"})
               for i in range(start, min(start + window, toggles))]
        for i in ids:
            assert c.reply(i, timeout=30)["ok"] is True
    marker = c.send({"action": "disable", "service": "a"})  # the last event: after every toggle
    assert c.reply(marker, timeout=30)["ok"] is True

    states = lost = 0
    overflows = []
    deadline = Deadline(60)
    while states + lost < toggles + 1:
        obj = lagging.recv(timeout=max(deadline.remaining(), 0.01))
        assert obj is not None, f"the subscription was closed after {states} events, {lost} lost"
        if obj.get("event") == "state":
            states += 1
        elif obj.get("event") == "overflow":
            assert obj["stream"] == "state" and obj["lost"] > 0, obj
            overflows.append(obj)
            lost += obj["lost"]
    assert overflows and states + lost == toggles + 1, (states, lost, overflows)
    # Still subscribed: a new change arrives.
    c.call("enable", "a")
    got = lagging.events(lambda ev: any(e.get("reason") == "enabled" for e in ev), timeout=10)
    assert got[-1]["to"] == "stopped"


# --------------------------------------------------------------------------
# Item 6: replies that nobody reads


_CHATTY = r"""
import sys, time
for i in range(5000):
    sys.stdout.write(f"line-{i:05d} " + "y" * 4000 + "\n")
sys.stdout.write("chatty-done\n")
sys.stdout.flush()
time.sleep(1e6)
"""


def test_unread_replies_of_many_clients_stay_within_one_memory_budget(sup: Supervisor) -> None:
    sup.start({"services": {"chatty": {"command": [PY, "-c", _CHATTY]}}})
    sup.wait_log("chatty", lambda t: t == "chatty-done", timeout=60)
    daemon = psutil.Process(sup.proc.pid)
    # A well-behaved client reads a large reply in full (this also warms the daemon up).
    big = Client(sup.status_socket, timeout=60)
    rep = big.call("log", None, [10000], timeout=60)
    assert rep["ok"] is True and len(rep["result"]["lines"]) >= 1000
    big.close()
    before = daemon.memory_info().rss

    hogs = []
    for _ in range(20):  # each asks for every log line and reads nothing
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(sup.status_socket))
        s.sendall(b'{"id": 1, "action": "log", "args": [10000]}\n')
        hogs.append(s)
        # Served (reply begun) or dropped: either way the socket turns readable.
        ready, _, _ = select.select([s], [], [], 60)
        assert ready, "the daemon did not answer a log request within 60 s"
    grown = (daemon.memory_info().rss - before) / (1024 * 1024)

    assert sup.rstatus("chatty")["state"] == "running"  # a well-behaved client is answered
    cp = run_herd(sup.status_socket, "log", "chatty", "-n", "3", check=True)
    assert "chatty-done" in cp.stdout
    for s in hogs:
        s.close()
    assert grown < 200, f"the daemon grew by {grown:.0f} MiB for 20 clients that do not read"
    reasons = [r for r in _daemon_log(sup) if r.get("event") == "client does not read its replies; disconnecting"]
    assert reasons and "MiB" in reasons[0]["reason"], reasons[:2]
