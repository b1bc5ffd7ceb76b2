"""Protocol fuzzing: random and malformed request lines against one real daemon.

Whatever a client sends, the daemon must keep serving and answer every
non-blank request line with exactly one well-formed reply object: ``ok`` is a
boolean, and a failure carries an ``error.code`` from
``herd.protocol.ERROR_CODES`` (never ``internal``, which means a daemon bug).

One daemon serves the whole module (a few ``sleep`` services, so the write
actions that hypothesis sends with real names only start and stop sleeps); it
is stopped at the end.  ``reload root``, ``reexec root`` and ``stop root``
(or power-off, reboot, halt) are never sent: they act on the daemon itself.
Inputs that once broke the daemon (deep nesting, odd digit strings) are
pinned by regression tests at the bottom.

The examples are the same in every run; ``FUZZ_RANDOM=1 FUZZ_EXAMPLES=5000``
explores further.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from helpers import Deadline, Supervisor, sleeper
from herd.protocol import ERROR_CODES, MAX_LINE_BYTES, READ_ACTIONS, WRITE_ACTIONS

SERVICES = ["fz-a", "fz-b", "fz-c"]
# Deterministic by default (the same examples in every CI run); FUZZ_RANDOM=1
# explores new ones, and FUZZ_EXAMPLES raises the count.
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "250")),
    derandomize=os.environ.get("FUZZ_RANDOM") != "1",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)


# --------------------------------------------------------------------------
# The daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Any:
    s = Supervisor(tmp_path_factory.mktemp("fuzz"), uuid.uuid4().hex[:12])
    config = {"services": {
        "fz-a": sleeper(s.marker("fz-a"), **{"respawn-delay": 0, "stop-timeout": 2}),
        "fz-b": sleeper(s.marker("fz-b"), requires=["fz-a"], **{"stop-timeout": 2}),
        "fz-c": sleeper(s.marker("fz-c"), **{"auto-start": False, "stop-timeout": 2}),
    }}
    try:
        s.start(config)
        yield s
        if s.proc is not None and s.proc.poll() is None:
            for name in SERVICES:
                try:
                    s.request({"action": "enable", "service": name})
                    s.request({"action": "stop", "service": name}, timeout=15)
                except OSError:
                    pass
            assert s.stop() == 0, s.stderr_tail()
    finally:
        s.cleanup()


# --------------------------------------------------------------------------
# Talking to it


def _check_reply(obj: Any) -> None:
    """One reply object, well formed (docs/protocol.md §3, §9)."""
    assert isinstance(obj, dict), obj
    assert "event" not in obj, obj
    assert "id" in obj, obj
    assert isinstance(obj.get("ok"), bool), obj
    if obj["ok"]:
        assert "result" in obj, obj
    else:
        err = obj.get("error")
        assert isinstance(err, dict), obj
        assert err.get("code") in ERROR_CODES, obj
        assert err["code"] != "internal", f"daemon bug (internal error): {obj}"
        assert isinstance(err.get("message"), str), obj
    messages = obj.get("messages", [])
    assert isinstance(messages, list) and all(isinstance(m, str) for m in messages), obj


class Conn:
    def __init__(self, path: Path, timeout: float = 20.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buf = b""
        hello = self.read_obj(Deadline(timeout))
        assert hello is not None and hello.get("hello") == "supervisor", hello

    def read_obj(self, deadline: Deadline) -> dict[str, Any] | None:
        while b"\n" not in self.buf:
            left = deadline.remaining()
            if left <= 0:
                raise TimeoutError(f"no complete line in time; have {self.buf[:200]!r}")
            self.sock.settimeout(left)
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                assert not self.buf, f"connection closed mid-line: {self.buf[:200]!r}"
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def close(self) -> None:
        self.sock.close()


def exchange(sup: Supervisor, lines: list[bytes], *, ro: bool = False, timeout: float = 20.0) -> list[dict]:
    """Send ``lines`` on one connection; return the replies (events skipped).

    Asserts that each non-blank line gets exactly one reply: once all are in,
    a sentinel ``ping`` is sent, and nothing but its reply (and events) may
    come before it.
    """
    assert sup.proc is not None and sup.proc.poll() is None, "the daemon is gone"
    want = sum(1 for line in lines if line.strip())
    conn = Conn(sup.status_socket if ro else sup.socket, timeout)
    try:
        conn.sock.sendall(b"".join(line + b"\n" for line in lines))
        deadline = Deadline(timeout)
        replies: list[dict] = []
        while len(replies) < want:
            obj = conn.read_obj(deadline)
            assert obj is not None, f"connection closed after {len(replies)}/{want} replies: {replies}"
            if "event" in obj:
                continue
            _check_reply(obj)
            replies.append(obj)
        sentinel = f"sentinel-{uuid.uuid4().hex}"
        conn.sock.sendall(json.dumps({"id": sentinel, "action": "ping"}).encode() + b"\n")
        while True:
            obj = conn.read_obj(deadline)
            assert obj is not None, "connection closed before the sentinel's reply"
            if "event" in obj:
                continue
            assert obj.get("id") == sentinel, f"an extra reply: {obj}"
            assert obj["ok"] is True, obj
            break
        return replies
    finally:
        conn.close()


def _valid_id(value: Any) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


# --------------------------------------------------------------------------
# Strategies

_scalars = (st.none() | st.booleans() | st.integers(min_value=-(10**40), max_value=10**40)
            | st.floats() | st.text(max_size=30))
json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
ids = (st.none() | st.integers() | st.integers(min_value=2**63, max_value=10**60)
       | st.integers(max_value=-(2**63)) | st.text(max_size=40) | st.booleans() | st.floats()
       | json_values)
actions = (st.sampled_from(sorted((READ_ACTIONS | WRITE_ACTIONS) - {"reload", "reexec"}))
           | st.sampled_from(["trigger", "force-start", "", "STATUS", "status ", "reload", "reexec"])
           | st.text(max_size=20))
services = (st.none() | st.sampled_from([*SERVICES, "root", "", "nope", "fz-a ", "FZ-A"])
            | st.text(max_size=20))
args = (st.lists(json_values, max_size=3)
        | st.lists(st.integers(min_value=-5, max_value=20000), max_size=2)
        | st.lists(st.sampled_from(["follow", "action", "5", "0", "-1", "10001", "x", ""]), max_size=3)
        | json_values)


def _not_self_action(req: dict) -> bool:
    """Never ask the daemon to reload, re-exec or stop itself."""
    return not ((req.get("action") in ("reload", "reexec") and req.get("service") in (None, "", "root"))
                or (req.get("action") in ("stop", "power-off", "reboot", "halt") and req.get("service") == "root"))


requests = st.fixed_dictionaries(
    {"action": actions},
    optional={"id": ids, "service": services, "args": args, "extra": json_values},
).filter(_not_self_action)


# --------------------------------------------------------------------------
# Random lines


@FUZZ
@given(st.lists(st.binary(max_size=300).map(lambda b: b.replace(b"\n", b" ")), min_size=1, max_size=4))
@example([b"\xff\xfe\x00", b"{", b"}", b"null", b"[]", b'"x"', b"\t \r"])
@example([b'{"action": "ping"}' + b"\x00", b'{"action": "\xc3\x28"}'])
def test_random_bytes(daemon: Supervisor, lines: list[bytes]) -> None:
    exchange(daemon, lines)


@FUZZ
@given(st.lists(json_values, min_size=1, max_size=4))
@example([{}, [], 0, "", None, {"action": None}, {"id": 1}])
def test_random_json_values(daemon: Supervisor, values: list[Any]) -> None:
    lines = [json.dumps(v).encode() for v in values]
    replies = exchange(daemon, lines)
    not_objects = sum(1 for v in values if not isinstance(v, dict))
    bad = sum(1 for r in replies if r["ok"] is False and r["error"]["code"] == "bad-request")
    assert bad >= not_objects, replies


def _request_lines(reqs: list[dict]) -> list[bytes]:
    return [json.dumps(r, ensure_ascii=bool(i % 2)).encode() for i, r in enumerate(reqs)]


def _check_ids(reqs: list[dict], replies: list[dict]) -> None:
    sent = sorted(json.dumps(r["id"]) for r in reqs if _valid_id(r.get("id")))
    got = {json.dumps(r["id"]) for r in replies}
    for s in sent:
        assert s in got, f"no reply carries the request id {s}: {replies}"


@FUZZ
@given(st.lists(requests, min_size=1, max_size=4))
@example([{"id": 10**40, "action": "status"}, {"id": "ünï\u2028cödé", "action": "ping"}])
@example([{"id": 1, "action": "status", "service": "fz-a", "args": [10001]},
          {"id": 2, "action": "log", "args": [3, "follow"]},
          {"id": 3, "action": "subscribe", "args": []},
          {"id": 4, "action": "doc", "service": "fz-b", "args": ["action", "nope"]}])
@example([{"id": 1, "action": "restart", "service": "fz-a"}, {"id": 2, "action": "stop", "service": "fz-b"},
          {"id": 3, "action": "disable", "service": "fz-c"}, {"id": 4, "action": "start", "service": "fz-c"},
          {"id": 5, "action": "enable", "service": "fz-c"}, {"id": 6, "action": "reload", "service": "fz-a"}])
def test_request_shaped(daemon: Supervisor, reqs: list[dict]) -> None:
    replies = exchange(daemon, _request_lines(reqs))
    _check_ids(reqs, replies)


@FUZZ
@given(st.lists(requests, min_size=1, max_size=4))
@example([{"id": 1, "action": "start", "service": "fz-c"}, {"id": 2, "action": "disable", "service": "fz-a"}])
def test_request_shaped_read_only(daemon: Supervisor, reqs: list[dict]) -> None:
    replies = exchange(daemon, _request_lines(reqs), ro=True)
    _check_ids(reqs, replies)
    for req in reqs:
        rid = req.get("id")
        if req.get("action") in WRITE_ACTIONS and _valid_id(rid) and [q.get("id") for q in reqs].count(rid) == 1:
            for reply in replies:
                if reply["id"] == rid and type(reply["id"]) is type(rid):
                    assert reply["ok"] is False, f"a write action succeeded on the status socket: {reply}"


# --------------------------------------------------------------------------
# Malformed connections


def test_overlong_line_is_refused_and_the_daemon_lives(daemon: Supervisor) -> None:
    conn = Conn(daemon.socket)
    try:
        junk = b'{"id": 1, "action": "ping", "args": ["' + b"x" * MAX_LINE_BYTES + b'"]}\n'
        try:
            conn.sock.sendall(junk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon may close before it has read everything
        obj = conn.read_obj(Deadline(10))
        assert obj is not None and obj["ok"] is False and obj["error"]["code"] == "line-too-long", obj
    finally:
        conn.close()
    assert daemon.request({"action": "ping"})["ok"] is True


def test_half_lines_and_hangups(daemon: Supervisor) -> None:
    for junk in (b'{"id": 1, "act', b"\xff" * 1000, b'{"id": 2, "action": "status"}'):
        conn = Conn(daemon.socket)
        conn.sock.sendall(junk)
        conn.close()
    # A client that sends requests and never reads the replies.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(daemon.socket))
    s.sendall(b'{"action": "status"}\n' * 200)
    s.close()
    assert daemon.request({"action": "ping"})["ok"] is True
    assert daemon.rstatus().keys() >= set(SERVICES)


def test_many_pipelined_requests(daemon: Supervisor) -> None:
    lines = [json.dumps({"id": i, "action": "status" if i % 2 else "ping"}).encode() for i in range(200)]
    replies = exchange(daemon, lines)
    codes = {r["error"]["code"] for r in replies if not r["ok"]}
    assert codes <= {"too-many-requests"}, codes


def test_daemon_still_serves(daemon: Supervisor) -> None:
    """Last of the shared-daemon tests: it answers on both sockets."""
    assert daemon.proc is not None and daemon.proc.poll() is None
    for ro in (False, True):
        assert daemon.request({"action": "ping"}, ro=ro)["ok"] is True
        assert set(daemon.rstatus(ro=ro)) == set(SERVICES)


# --------------------------------------------------------------------------
# Regressions: requests that once broke the daemon (each on a daemon of its own)


@pytest.mark.parametrize("arg", ["\u00b2", "\u0661\u0662" + "\u00b2", "9" * 5000])
def test_count_argument_of_odd_digits_is_a_bad_argument(daemon: Supervisor, arg: str) -> None:
    exchange(daemon, [json.dumps({"id": 1, "action": "status", "service": "fz-a", "args": [arg]}).encode()])


@pytest.mark.parametrize("ro", [False, True], ids=["control", "status"])
def test_deeply_nested_json_is_a_bad_request(sup: Supervisor, ro: bool) -> None:
    sup.start({"services": {"a": sleeper(sup.marker("a"))}})
    conn = Conn(sup.status_socket if ro else sup.socket)
    try:
        conn.sock.sendall(b"[" * 100_000 + b"]" * 100_000 + b"\n")
        obj = conn.read_obj(Deadline(10))
        assert obj is not None, "connection closed without a reply"
        _check_reply(obj)
    finally:
        conn.close()
    # the daemon still serves (a ping answers) and still stops cleanly on SIGTERM
    assert sup.proc is not None and sup.proc.poll() is None
    assert sup.request({"action": "ping"})["ok"] is True
    assert sup.stop(timeout=10) == 0
