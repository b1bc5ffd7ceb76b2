"""Issue 15: clients that are hostile, careless or just slow, on the control sockets.

NaN, infinities and huge numbers are bad requests (never invalid JSON back,
never a traceback in the log).
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
    base_env,
    python_for_other_users,
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
# Item 9: protocol bugs


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
