"""The status page over plain HTTP: what it serves, what it refuses, write actions.

A real daemon, the page's own process (``python -m statuspage``), raw HTTP.
The browser test (test_statuspage_browser.py) checks the rendering.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


from helpers import SLEEP, Supervisor, base_env, wait_until
from sshd import SSHServer
from statuspage_proc import StatusPage


def simple(sup: Supervisor) -> dict:
    return {"services": {
        "db": {"command": [SLEEP, "1000000"], "environment": {"SVTEST_MARKER": sup.marker("db")}},
        "web": {"command": [SLEEP, "1000000"], "requires": ["db"],
                "environment": {"SVTEST_MARKER": sup.marker("web")}},
    }}


def running(sup: Supervisor) -> Supervisor:
    wait_until(lambda: all(s["state"] == "running" for s in sup.status().values()), 15, "the services running")
    return sup


def rows(state: dict, host: int = 0) -> list[tuple]:
    return [(s["name"], s["state"], s["pid"], s["enabled"]) for s in state["hosts"][host]["services"]]


def herd_rows(sup: Supervisor) -> list[tuple]:
    return [(s["name"], s["state"], s["pid"], s["enabled"])
            for s in sup.herd("status", json=True, check=True).data["services"]]


def raw(page: StatusPage, data: bytes, timeout: float = 30.0) -> bytes:
    """Send raw bytes; everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", page.port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def test_page_served_fast_from_the_package_alone(sup: Supervisor) -> None:
    running(sup.start(simple(sup)))
    page = StatusPage("-s", str(sup.status_socket))
    try:
        for path, ctype in [("/", "text/html"), ("/app.js", "text/javascript"), ("/app.css", "text/css"),
                            ("/favicon.svg", "image/svg+xml")]:
            started = time.monotonic()
            status, headers, body = page.request("GET", path)
            elapsed = time.monotonic() - started
            assert status == 200 and headers["content-type"].startswith(ctype)
            assert elapsed < 1.0, f"{path} took {elapsed:.3f} s"
            assert "default-src 'none'" in headers["content-security-policy"]
            assert headers["x-content-type-options"] == "nosniff"
            # Nothing is fetched from elsewhere (the SVG namespace is a name, not a fetch).
            text = body.decode().replace("http://www.w3.org/2000/svg", "")
            assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text), path
        wait_until(lambda: page.state()["hosts"][0]["connected"], 10, "the page connected to the supervisor")
        wait_until(lambda: rows(page.state()) == herd_rows(sup), 10, "/api/state to match herd --json status")
        state = page.state()
        assert state["writes"] is False and state["csrf"] is None
        host = state["hosts"][0]
        assert host["supervisor"]["read-only"] is True  # it talks to the read-only socket
        assert host["supervisor"]["pid"] == sup.herd("ping", json=True, check=True).data["pid"]
        assert sorted(host["edges"]) == [["web", "db"]]
    finally:
        page.close()


def test_event_stream_pushes_changes(sup: Supervisor) -> None:
    running(sup.start(simple(sup)))
    page = StatusPage("-s", str(sup.status_socket))
    try:
        wait_until(lambda: page.state()["hosts"][0]["connected"], 10, "the page connected")
        with socket.create_connection(("127.0.0.1", page.port), timeout=30) as s:
            s.sendall(f"GET /events HTTP/1.1\r\nHost: 127.0.0.1:{page.port}\r\n\r\n".encode())
            buf = b""
            while b"event: host" not in buf:
                buf += s.recv(65536)
            assert b"Content-Type: text/event-stream" in buf
            old = sup.status("web")["pid"]
            sup.herd("restart", "web", check=True)
            new = sup.status("web")["pid"]
            deadline = time.monotonic() + 15
            while b'"name":"web"' not in buf or not re.search(
                    rb'"name":"web"[^{}]*"state":"running"[^{}]*"pid":' + str(new).encode(), buf):
                assert time.monotonic() < deadline, "no event with the restarted web"
                buf += s.recv(65536)
            assert old != new
    finally:
        page.close()


HOSTILE = [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n", 421),
    (b"GET / HTTP/1.1\r\n\r\n", 421),
    (b"GET / HTTP/1.1\r\nHost: {host}\r\nHost: evil.example\r\n\r\n", 400),
    (b"GET /../../etc/passwd HTTP/1.1\r\nHost: {host}\r\n\r\n", 404),
    (b"GET /%2e%2e/%2e%2e/etc/passwd HTTP/1.1\r\nHost: {host}\r\n\r\n", 404),
    (b"GET /static/app.js HTTP/1.1\r\nHost: {host}\r\n\r\n", 404),
    (b"GET /%ff HTTP/1.1\r\nHost: {host}\r\n\r\n", 400),
    (b"GET http://evil.example/ HTTP/1.1\r\nHost: {host}\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\nHost: {host}\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: {host}\r\nX-Bad\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: {host}\r\nX: " + b"a" * 20000 + b"\r\n\r\n", 431),
    (b"DELETE / HTTP/1.1\r\nHost: {host}\r\n\r\n", 405),
    (b"POST /api/action HTTP/1.1\r\nHost: {host}\r\nContent-Length: 2\r\n\r\n{}", 403),
    (b"POST /login HTTP/1.1\r\nHost: {host}\r\nContent-Length: 10\r\n\r\ntoken=abcd", 403),
    (b"POST /api/action HTTP/1.1\r\nHost: {host}\r\nContent-Length: 99999999\r\n\r\n", 413),
    (b"POST /api/action HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n", 411),
    (b"POST /api/action HTTP/1.1\r\nHost: {host}\r\nContent-Length: -1\r\n\r\n", 411),
    (b"GET / HTTP/1.1\r\nHost: {host}\r\nX: a\x00b\r\n\r\n", 400),
    (b"GET /events\x00 HTTP/1.1\r\nHost: {host}\r\n\r\n", 400),
]


def test_hostile_requests_are_refused(sup: Supervisor) -> None:
    running(sup.start(simple(sup)))
    before = herd_rows(sup)
    page = StatusPage("-s", str(sup.status_socket))
    try:
        for request_bytes, expected in HOSTILE:
            answer = raw(page, request_bytes.replace(b"{host}", f"127.0.0.1:{page.port}".encode()))
            assert status_of(answer) == expected, (request_bytes[:80], answer[:300])
            # Still serving, and nothing changed.
            assert page.request("GET", "/")[0] == 200
        assert herd_rows(sup) == before
        assert page.proc.poll() is None
    finally:
        page.close()


def test_a_slow_client_does_not_hold_up_others(sup: Supervisor) -> None:
    running(sup.start(simple(sup)))
    page = StatusPage("-s", str(sup.status_socket))
    try:
        with socket.create_connection(("127.0.0.1", page.port), timeout=30) as slow:
            slow.sendall(b"GET / HTTP/1.1\r\nHo")
            started = time.monotonic()
            assert page.request("GET", "/")[0] == 200
            assert time.monotonic() - started < 1.0
            answer = slow.recv(65536)  # the server gives up on it (after 10 s)
            assert status_of(answer) == 408
    finally:
        page.close()


def page_main(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "statuspage", "--listen", "127.0.0.1:0", *args],
                          env=base_env(), capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)


def test_token_file_must_be_the_operators_alone(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token-0123456789abcdef\n")
    os.chmod(token, 0o644)
    cp = page_main("--allow-writes", "--token-file", str(token))
    assert cp.returncode == 2 and str(token) in cp.stderr and "chmod 600" in cp.stderr
    os.chmod(token, 0o600)
    link = tmp_path / "link"
    link.symlink_to(token)
    cp = page_main("--allow-writes", "--token-file", str(link))
    assert cp.returncode == 2 and str(link) in cp.stderr
    short = tmp_path / "short"
    short.write_text("abc\n")
    os.chmod(short, 0o600)
    cp = page_main("--allow-writes", "--token-file", str(short))
    assert cp.returncode == 2 and "16" in cp.stderr
    cp = page_main("--allow-writes")
    assert cp.returncode == 2 and "--token-file" in cp.stderr
    cp = page_main("--token-file", str(token))
    assert cp.returncode == 2 and "--allow-writes" in cp.stderr
    cp = page_main("--host", "-oProxyCommand=touch x")
    assert cp.returncode == 2 and "may not start with '-'" in cp.stderr
    cp = page_main("--listen", "example.com:80")
    assert cp.returncode == 2


def test_write_actions_need_the_token_a_session_and_csrf(sup: Supervisor, tmp_path: Path) -> None:
    running(sup.start(simple(sup)))
    token = tmp_path / "token"
    token.write_text("s3cret-token-0123456789abcdef\n")
    os.chmod(token, 0o600)
    page = StatusPage("-s", str(sup.status_socket), "--allow-writes", "--token-file", str(token),
                      "--control-socket", str(sup.socket))
    try:
        origin = f"http://127.0.0.1:{page.port}"
        wait_until(lambda: page.state()["hosts"][0]["services"], 10, "the page's services")
        assert page.state()["writes"] is True and page.state()["csrf"] is None
        old = sup.status("web")["pid"]
        body = json.dumps({"host": "local", "action": "restart", "service": "web"}).encode()
        jtype = {"Content-Type": "application/json"}

        assert page.request("POST", "/api/action", body, jtype)[0] == 403  # no session
        status, _, _ = page.request("POST", "/login", b"token=wrong-token-0123456789abc",
                                    {"Content-Type": "application/x-www-form-urlencoded"})
        assert status == 403
        status, _, _ = page.request("POST", "/login", b"token=s3cret-token-0123456789abcdef",
                                    {"Content-Type": "application/x-www-form-urlencoded",
                                     "Origin": "http://evil.example"})
        assert status == 403  # login from another site
        status, headers, _ = page.request("POST", "/login", b"token=s3cret-token-0123456789abcdef",
                                          {"Content-Type": "application/x-www-form-urlencoded", "Origin": origin})
        assert status == 303
        cookie = headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        jar = {"Cookie": cookie.split(";")[0]}
        status, _, raw_state = page.request("GET", "/api/state", headers=jar)
        csrf = json.loads(raw_state)["csrf"]
        assert csrf and json.loads(raw_state)["actions"] == ["start", "stop", "restart", "enable", "disable"]

        def post(payload: bytes, **extra: str) -> tuple[int, bytes]:
            hdrs = {**jtype, **jar, "X-CSRF-Token": csrf, "Origin": origin}
            hdrs.update({k.replace("_", "-"): v for k, v in extra.items()})
            status, _, answer = page.request("POST", "/api/action", payload, hdrs)
            return status, answer

        assert post(body, **{"X_CSRF_Token": "forged"})[0] == 403
        assert post(body, Origin="http://evil.example")[0] == 403
        assert post(body, Sec_Fetch_Site="cross-site")[0] == 403
        assert post(body, Content_Type="text/plain")[0] == 415
        for bad in ({"host": "local", "action": "reexec", "service": "root"},
                    {"host": "local", "action": "stop", "service": "root"},
                    {"host": "local", "action": "restart", "service": "nonesuch"},
                    {"host": "elsewhere", "action": "restart", "service": "web"},
                    {"host": "local", "action": "restart", "service": "web", "args": ["x"]}):
            assert post(json.dumps(bad).encode())[0] == 400, bad
        assert post(b"not json")[0] == 400
        assert sup.status("web")["pid"] == old  # nothing of that reached the supervisor

        status, answer = post(body)
        assert status == 200 and json.loads(answer)["ok"] is True, answer
        new = sup.status("web")
        assert new["state"] == "running" and new["pid"] != old
        status, answer = post(json.dumps({"host": "local", "action": "stop", "service": "db"}).encode())
        assert json.loads(answer)["result"]["stopped"] == ["web", "db"]
        # A session ends with logout.
        status, _, _ = page.request("POST", "/logout", b"", {**jar, "X-CSRF-Token": csrf, "Origin": origin})
        assert status == 303
        assert post(json.dumps({"host": "local", "action": "start", "service": "db"}).encode())[0] == 403
        assert sup.status("db")["state"] == "stopped"
    finally:
        page.close()


def test_several_hosts_through_ssh(make_sup: Callable[[], Supervisor], sshd: SSHServer, tmp_path: Path) -> None:
    a, b = make_sup(), make_sup()
    running(a.start({"services": {"alpha-svc": {"command": [SLEEP, "1000000"]}}}))
    running(b.start({"services": {"beta-svc": {"command": [SLEEP, "1000000"]}}}))
    page = StatusPage("--no-local", "--host", f"alpha:{a.status_socket}", "--host", f"beta:{b.status_socket}",
                      "--host", f"dead:{a.status_socket}", "--host", f"alpha:{tmp_path}/none.sock",
                      env={"HERD_SSH_CONFIG": str(sshd.config)})
    try:
        def settled() -> dict | None:
            state = page.state()
            hosts = state["hosts"]
            ok = hosts[0]["services"] and hosts[1]["services"] and hosts[2]["error"] and hosts[3]["error"]
            return state if ok else None

        state = wait_until(settled, 60, "both reachable hosts shown, both others explained")
        labels = [h["host"] for h in state["hosts"]]
        assert labels == [f"alpha:{a.status_socket}", f"beta:{b.status_socket}", f"dead:{a.status_socket}",
                          f"alpha:{tmp_path}/none.sock"]
        assert rows(state, 0) == herd_rows(a) and rows(state, 1) == herd_rows(b)
        assert state["hosts"][0]["remote"] is True and state["hosts"][0]["connected"] is True
        assert not state["hosts"][2]["connected"] and "ssh failed" in state["hosts"][2]["error"]
        assert f"no supervisor at {tmp_path}/none.sock" in state["hosts"][3]["error"]
        # Live through ssh too.
        old = a.status("alpha-svc")["pid"]
        a.herd("restart", "alpha-svc", check=True)
        new = a.status("alpha-svc")["pid"]
        assert new != old
        wait_until(lambda: rows(page.state(), 0) == herd_rows(a), 15, "the restart seen through ssh")
    finally:
        page.close()


def test_page_reconnects_when_the_supervisor_is_back(make_sup: Callable[[], Supervisor]) -> None:
    a = make_sup()
    running(a.start(simple(a)))
    page = StatusPage("-s", str(a.status_socket))
    try:
        first = wait_until(lambda: page.state()["hosts"][0]["supervisor"]["pid"], 10, "the page connected")
        assert a.stop() == 0
        down = wait_until(lambda: (h := page.state()["hosts"][0])["error"] and not h["connected"] and h,
                          15, "the page to see the supervisor down")
        assert str(a.status_socket) in down["error"]
        # A new supervisor on the same sockets (a new epoch): the page comes back to it by itself.
        b = make_sup()
        args = [str(a.socket) if x == str(b.socket) else str(a.status_socket) if x == str(b.status_socket) else x
                for x in b.daemon_args()]
        b.start(simple(b), args=args)
        pid = a.herd("ping", json=True, check=True).data["pid"]
        assert pid != first
        wait_until(lambda: (h := page.state()["hosts"][0])["connected"] and h["supervisor"]["pid"] == pid,
                   30, "the page connected to the new supervisor")
        now = wait_until(lambda: all(r[1] == "running" for r in herd_rows(a)) and herd_rows(a), 15,
                         "the new supervisor's services running")  # `a` names the sockets b now serves
        wait_until(lambda: rows(page.state()) == now, 15, "the new services shown")
        assert page.state()["hosts"][0]["error"] is None
    finally:
        page.close()
