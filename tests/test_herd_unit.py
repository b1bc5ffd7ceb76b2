"""Unit tests for the `herd` client: parsing, rendering, exit codes, wire I/O.

Plain synchronous tests; no daemon.  The wire tests use a fake server: a
thread with a plain Unix socket that sends the hello and canned replies.
"""

from __future__ import annotations

import json
import signal
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from herd import render
from herd._args import Call, UsageError, parse_args, socket_path
from herd.cli import main
from herd.protocol import (
    ERROR_CODES,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    exit_code_for,
)

ROOT = Path(__file__).resolve().parent.parent
NOW = 1_764_000_000.0  # the fixed "now" of the rendering tests


def svc(name: str, **fields: Any) -> dict[str, Any]:
    """A SVC object shaped as in docs/design-brief.md, stopped by default."""
    base: dict[str, Any] = {
        "name": name,
        "provides": [name],
        "requires": [],
        "state": "stopped",
        "enabled": True,
        "disabled-reason": None,
        "one-shot": False,
        "respawn": True,
        "auto-start": True,
        "pid": None,
        "since": None,
        "command": ["/usr/bin/sleep", "1000"],
        "ready": {"type": "started"},
        "status-text": None,
        "last-exit": None,
        "respawns": [],
        "startup-failures": [],
        "last-failure": None,
        "log-file": f"/var/log/supervisor/{name}.log",
        "actions": [],
        "documentation": "",
    }
    base.update(fields)
    return base


RUNNING = svc(
    "libvirtd",
    state="running",
    pid=1234,
    since=NOW - 300,
    provides=["libvirtd", "libvirt"],
    requires=["dbus-system"],
    command=["/usr/sbin/libvirtd", "--listen", "a b"],
    **{
        "status-text": "Running 3 domains",
        "recent-log": [
            {"time": NOW - 10, "service": "libvirtd", "stream": "stderr", "line": "it is disabled here"},
            {"time": NOW - 5, "service": "libvirtd", "stream": "stdout", "line": "ready"},
        ],
    },
)
STOPPED = svc(
    "virtlogd",
    since=NOW - 30,
    **{
        "last-exit": {"code": 0, "signal": None, "time": NOW - 30},
        "recent-log": [
            {"time": NOW - 31, "service": "virtlogd", "stream": "stdout", "line": "Running cleanup; disabled cache"},
        ],
    },
)
DISABLED = svc(
    "ganeti-noded",
    enabled=False,
    respawn=False,
    since=NOW - 7200,
    **{
        "disabled-reason": "respawning too fast",
        "respawns": [NOW - 7300, NOW - 7250],
        "last-exit": {"code": None, "signal": "SIGKILL", "time": NOW - 7200},
    },
)
FAILING = svc(
    "ganeti-wconfd",
    actions=["force-start"],
    **{
        "startup-failures": [NOW - 100, NOW - 60],
        "last-failure": "exited with code 1 while starting",
        "last-exit": {"code": 1, "signal": None, "time": NOW - 60},
    },
)
ONE_SHOT = svc("qemu-binfmt", **{"one-shot": True, "respawn": False})
STARTING = svc("hurd-vm", state="starting", pid=4321, provides=["hurd-vm", "childhurd"], ready={"type": "notify"})
STOPPING = svc("ganeti-rapi", state="stopping", pid=99)
ALL = [RUNNING, STOPPED, DISABLED, FAILING, ONE_SHOT, STARTING, STOPPING, svc("aaa-first", state="running", pid=1)]


# --- rendering: the summary ------------------------------------------------


def test_summary_sections_in_shepherd_order() -> None:
    text = render.render_summary(ALL)
    assert text == "\n".join(
        [
            "Started:",
            " + aaa-first",
            " + libvirtd",
            "Starting:",
            " ^ hurd-vm",
            "Stopped:",
            " - virtlogd",
            "Stopping:",
            " v ganeti-rapi",
            "One-shot:",
            " * qemu-binfmt",
            "Disabled:",
            " x ganeti-noded",
            "Failed to start:",
            " ! ganeti-wconfd",
        ]
    )


def test_summary_omits_empty_sections() -> None:
    text = render.render_summary([RUNNING, STOPPED])
    assert text == "Started:\n + libvirtd\nStopped:\n - virtlogd"
    assert render.render_summary([]) == ""


def test_summary_colour() -> None:
    plain = render.render_summary([FAILING, RUNNING])
    assert "\x1b[" not in plain
    coloured = render.render_summary([FAILING, RUNNING], color=True)
    assert "\x1b[1mStarted:\x1b[0m" in coloured
    assert "\x1b[1;31mFailed to start:\x1b[0m" in coloured


# --- rendering: one service ------------------------------------------------


def block(service: dict[str, Any], **kw: Any) -> str:
    return render.render_service(service, now=NOW, **kw)


def test_running_block() -> None:
    text = block(RUNNING)
    lines = text.splitlines()
    assert lines[0] == "Status of libvirtd:"
    assert lines[1].startswith("  It is running since ") and lines[1].endswith(" (5 minutes ago).")
    assert lines[2] == "  Running value is 1234."
    assert "  Command: /usr/sbin/libvirtd --listen 'a b'" in lines
    assert "  Status: Running 3 domains" in lines
    assert "  It is enabled." in lines
    assert "  Provides (libvirtd libvirt)." in lines
    assert "  Requires (dbus-system)." in lines
    assert "  Will be respawned." in lines
    assert "  Log file: /var/log/supervisor/libvirtd.log" in lines
    assert "  Recent messages (use '-n' to view more or less):" in lines
    assert lines[-1].endswith(" stdout: ready") and lines[-1].startswith("    ")


def test_stopped_block() -> None:
    text = block(STOPPED)
    assert text.splitlines()[1].startswith("  It is stopped since ")
    assert "(30 seconds ago)." in text
    assert "  Last exit: code 0 at " in text
    assert "  Will be respawned." in text


def test_disabled_block() -> None:
    text = block(DISABLED)
    assert "  It is stopped since " in text and "(2 hours ago)." in text
    assert "  It is disabled." in text
    assert "  Reason: respawning too fast." in text
    assert "  Will not be respawned." in text
    assert "  Last respawned on " in text
    assert "  Last exit: signal SIGKILL at " in text


def test_status_lines_never_contradict() -> None:
    # a respawning service that got disabled is not "Will be respawned."
    crashed = svc("crashy", enabled=False, respawn=True, **{"disabled-reason": "respawning too fast"})
    assert "  Will not be respawned." in block(crashed).splitlines()
    assert render.render_summary([crashed]) == "Disabled:\n x crashy"
    # a one-shot says so, and is never "Will be respawned."
    once = block(svc("once", **{"one-shot": True, "respawn": True}))
    assert "Will be respawned" not in once and "one-shot" in once
    # a timer between runs has no running value; during a run its PID
    timer = svc("tick", state="running", pid=None, timer={"schedule": "* * * * *"})
    assert "Running value" not in block(timer)
    assert "  Running value is 77." in block({**timer, "pid": 77}).splitlines()
    assert "Will be respawned" not in block(timer)


def test_failing_block() -> None:
    text = block(FAILING)
    assert "  It is stopped (failing)." in text
    assert "  Failed to start at " in text and "(1 minutes ago)" not in text
    assert "(60 seconds ago)." in text
    assert "  Last failure: exited with code 1 while starting." in text
    assert "  Custom actions: force-start." in text
    assert "  Last exit: code 1 at " in text


def test_one_shot_starting_stopping_blocks() -> None:
    assert "  It is stopped (one-shot)." in block(ONE_SHOT)
    starting = block(STARTING)
    assert "  It is starting.\n  Main PID: 4321." in starting
    assert "  Provides (hurd-vm childhurd)." in starting
    assert "  It is being stopped.\n  Main PID: 99." in block(STOPPING)


def test_block_colour() -> None:
    text = block(DISABLED, color=True)
    assert text.startswith("\x1b[1mStatus of ganeti-noded:\x1b[0m")
    assert "\x1b[1;35mstopped\x1b[0m" in text
    assert "\x1b[1;31mdisabled\x1b[0m" in text  # it was respawned: error colour
    assert "\x1b[1;31mfailing\x1b[0m" in block(FAILING, color=True)
    assert "\x1b[" not in block(DISABLED)


@pytest.mark.parametrize("service", ALL, ids=lambda s: s["name"])
def test_running_word_only_for_running_services(service: dict[str, Any]) -> None:
    text = block(service)
    assert ("Running" in text) == (service["state"] == "running")


@pytest.mark.parametrize("service", ALL, ids=lambda s: s["name"])
def test_disabled_word_only_for_disabled_services(service: dict[str, Any]) -> None:
    text = block(service)
    assert ("disabled" in text) == (service["enabled"] is False)


def test_free_text_is_recased_not_dropped() -> None:
    text = block(STOPPED)
    assert "stdout: running cleanup; Disabled cache" in text
    # a running, enabled service keeps "Running" but not "disabled"
    running = block(RUNNING)
    assert "stderr: it is Disabled here" in running


def test_detailed_status_blocks_separated() -> None:
    text = render.render_services([RUNNING, STOPPED], now=NOW)
    assert "\n\nStatus of virtlogd:" in text
    assert text.count("Status of ") == 2


# --- rendering: times and other results ------------------------------------


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (0, "0 seconds ago"),
        (1, "1 second ago"),
        (1.4, "1 second ago"),
        (119, "119 seconds ago"),
        (120, "2 minutes ago"),
        (7199, "120 minutes ago"),
        (7200, "2 hours ago"),
        (48 * 3600 - 1, "48 hours ago"),
        (48 * 3600, "2 days ago"),
        (-5, "0 seconds ago"),
    ],
)
def test_relative_time(seconds: float, expected: str) -> None:
    assert render.relative_time(seconds) == expected


def test_format_time_today_and_older() -> None:
    now = time.time()
    today = render.format_time(now - 1, now)
    assert today == f"{time.strftime('%X', time.localtime(now - 1))} (1 second ago)"
    old = render.format_time(now - 5 * 86400, now)
    assert old == f"{time.strftime('%c', time.localtime(now - 5 * 86400))} (5 days ago)"


def test_log_doc_ping_change_render() -> None:
    line = {"time": NOW, "service": "c", "stream": "stderr", "line": "boom"}
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(NOW))
    assert render.render_log([line]) == f"{stamp} c stderr: boom"
    doc = {"service": "w", "documentation": "Watcher.", "actions": [{"name": "trigger", "documentation": "Run now."}]}
    assert render.render_doc(doc) == "Watcher.\n\nCustom actions:\n  trigger: Run now."
    assert render.render_doc({"service": "w", "action": "trigger", "documentation": "Run now."}) == "trigger: Run now."
    assert render.render_ping({"pong": True, "version": "0.1.0", "pid": 7}) == "supervisor 0.1.0 answers, PID 7."
    assert render.render_change("start", "c", {"service": "c", "started": ["a", "c"]}) == (
        "Service a has been started.\nService c has been started."
    )
    assert render.render_change("start", "c", {"service": "c", "started": []}) == "Service c is already running."
    assert render.render_value({"x": 1}) == '{\n  "x": 1\n}'
    assert render.render_value(None) == ""


# --- exit codes ------------------------------------------------------------


def test_exit_code_mapping() -> None:
    assert exit_code_for("unknown-service") == EXIT_USAGE == 2
    assert exit_code_for("unknown-action") == 2
    assert exit_code_for("bad-arguments") == 2
    assert exit_code_for("start-failed") == EXIT_FAILED == 1
    assert exit_code_for("read-only") == 1
    assert exit_code_for("unsupported") == 1
    assert exit_code_for("no-such-code") == 1
    assert EXIT_UNREACHABLE == 3
    assert all(status in (1, 2) for status, _ in ERROR_CODES.values())


# --- argument parsing ------------------------------------------------------


def test_parse_status_forms() -> None:
    inv = parse_args(["status"])
    assert (inv.kind, inv.calls) == ("summary", (Call("summary"),))
    # --json prints every SVC object, as before `summary` existed
    assert parse_args(["--json", "status"]).calls == (Call("status"),)
    assert parse_args(["status", "root"]).kind == "summary"
    inv = parse_args(["status", "libvirtd", "-n", "5"])
    assert (inv.kind, inv.calls) == ("status", (Call("status", "libvirtd", (5,)),))
    assert parse_args(["status", "-n3", "x"]).calls == (Call("status", "x", (3,)),)
    assert parse_args(["status", "x", "--log-history=0"]).calls == (Call("status", "x", (0,)),)
    assert parse_args(["status", "x"]).calls == (Call("status", "x", ()),)


def test_parse_global_options() -> None:
    inv = parse_args(["-s", "/tmp/s", "--json", "status"])
    assert (inv.socket, inv.json) == ("/tmp/s", True)
    assert parse_args(["--socket=/a", "graph"]).socket == "/a"
    assert parse_args(["-s/b", "graph"]).socket == "/b"
    inv = parse_args(["status", "x", "--json", "--socket", "/c"])
    assert (inv.socket, inv.json) == ("/c", True)
    assert parse_args(["--help"]).show_help
    assert parse_args(["status", "-h"]).show_help


def test_parse_log() -> None:
    assert parse_args(["log"]).calls == (Call("log"),)
    assert parse_args(["log", "c", "-n", "20"]).calls == (Call("log", "c", (20,)),)
    inv = parse_args(["log", "-f", "c"])
    assert inv.follow and inv.calls == (Call("log", "c", (10, "follow")),)
    inv = parse_args(["log", "--follow", "-n", "0"])
    assert inv.follow and inv.calls == (Call("log", None, (0, "follow")),)


def test_parse_multiple_services() -> None:
    inv = parse_args(["start", "a", "b", "c"])
    assert inv.kind == "change"
    assert inv.calls == (Call("start", "a"), Call("start", "b"), Call("start", "c"))
    for action in ("stop", "restart", "enable", "disable"):
        assert parse_args([action, "x", "y"]).calls == (Call(action, "x"), Call(action, "y"))


def test_parse_custom_actions() -> None:
    inv = parse_args(["trigger", "ganeti-watcher"])
    assert (inv.kind, inv.calls) == ("custom", (Call("trigger", "ganeti-watcher"),))
    # arguments after the service go to the daemon verbatim, even option-like ones
    inv = parse_args(["--json", "frob", "svc", "-n", "5", "--json", "x"])
    assert inv.json and inv.calls == (Call("frob", "svc", ("-n", "5", "--json", "x")),)
    assert parse_args(["reexec", "virtlogd"]).calls == (Call("reexec", "virtlogd"),)
    assert parse_args(["force-start", "ganeti-wconfd"]).calls == (Call("force-start", "ganeti-wconfd"),)


def test_parse_root_actions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_args(["reload", "root"]).calls == (Call("reload", "root"),)
    assert parse_args(["reload", "root", "init.toml"]).calls == (
        Call("reload", "root", (str(tmp_path / "init.toml"),)),
    )
    assert parse_args(["reexec", "root"]).calls == (Call("reexec", "root"),)


def test_parse_other_builtins() -> None:
    assert parse_args(["doc", "w"]).calls == (Call("doc", "w"),)
    assert parse_args(["doc", "w", "action", "trigger"]).calls == (Call("doc", "w", ("action", "trigger")),)
    assert parse_args(["graph"]).calls == (Call("graph"),)
    assert parse_args(["detailed-status"]).calls == (Call("detailed-status"),)
    assert parse_args(["detailed-status", "-n", "2"]).calls == (Call("detailed-status", None, (2,)),)
    inv = parse_args(["events"])
    assert inv.follow and inv.calls == (Call("subscribe"),)
    assert Call("start", "a").to_json(3) == {"id": 3, "action": "start", "service": "a", "args": []}


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["start"],
        ["trigger"],
        ["status", "x", "-n"],
        ["status", "x", "-n", "many"],
        ["status", "x", "-n", "-1"],
        ["status", "-f"],
        ["log", "a", "b"],
        ["graph", "x"],
        ["doc"],
        ["doc", "w", "trigger"],
        ["reexec", "root", "extra"],
        ["reload", "root", "a", "b"],
        ["--bogus", "status"],
        ["-s"],
    ],
)
def test_parse_usage_errors(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        parse_args(argv)


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["start"]) == EXIT_USAGE
    assert capsys.readouterr().err.startswith("herd: error: ")


def test_socket_path_precedence() -> None:
    assert socket_path(parse_args(["-s", "/x", "status"]), {"SUPERVISOR_SOCKET": "/y"}) == "/x"
    assert socket_path(parse_args(["status"]), {"SUPERVISOR_SOCKET": "/y"}) == "/y"
    default = socket_path(parse_args(["status"]), {"HOME": "/h", "XDG_RUNTIME_DIR": "/r"})
    assert default.endswith("control.sock")


# --- subprocesses: import hygiene and no daemon -----------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_herd_does_not_import_trio() -> None:
    code = "import herd.cli, sys; print('trio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), check=True)
    assert out.stdout.strip() == "False"
    code = (
        "import herd.cli, sys; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('trio', 'structlog', 'psutil', 'supervisor', 'services')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), check=True)
    assert out.stdout.strip() == "[]"


def test_no_daemon_exits_3() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "herd", "-s", "/nonexistent/x", "status"],
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert proc.returncode == EXIT_UNREACHABLE
    assert proc.stdout == ""
    assert proc.stderr.startswith("herd: error: ") and "/nonexistent/x" in proc.stderr


# --- a fake server -----------------------------------------------------------

HELLO = {"hello": "supervisor", "protocol": 1, "version": "0.1.0", "read-only": False}
Handler = Callable[[dict[str, Any]], "list[dict[str, Any]] | None"]


class FakeServer:
    """A Unix socket server in a thread: sends ``hello``, then answers each
    request line with ``handler(request)`` (a list of objects to send, or
    None to hang up).  With ``close_after`` it hangs up after answering.

    ``batches`` records how the requests arrived: one list per ``recv``
    that completed at least one line.
    """

    def __init__(self, path: Path, handler: Handler, hello: dict[str, Any] | None = None, wait_for: int = 1, close_after: bool = False) -> None:
        self.path = path
        self.handler = handler
        self.hello = HELLO if hello is None else hello
        self.wait_for = wait_for
        self.close_after = close_after
        self.requests: list[dict[str, Any]] = []
        self.batches: list[list[dict[str, Any]]] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            conn.sendall((json.dumps(self.hello) + "\n").encode())
            buf = b""
            pending: list[dict[str, Any]] = []
            # Wait until `wait_for` requests arrived before answering any, so
            # the test proves they were all in flight at once.
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buf += chunk
                batch = []
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    batch.append(json.loads(line))
                if not batch:
                    continue
                self.batches.append(batch)
                self.requests.extend(batch)
                pending.extend(batch)
                if len(self.requests) < self.wait_for:
                    continue
                out = b""
                for req in reversed(pending):  # answer out of order
                    objs = self.handler(req)
                    if objs is None:
                        return
                    out += b"".join((json.dumps(o) + "\n").encode() for o in objs)
                pending.clear()
                try:
                    conn.sendall(out)
                except OSError:
                    return
                if self.close_after:
                    return

    def close(self) -> None:
        self.listener.close()
        self.thread.join(timeout=5)


@pytest.fixture
def fake_server(tmp_path: Path) -> Iterator[Callable[..., FakeServer]]:
    servers: list[FakeServer] = []

    def make(handler: Handler, **kw: Any) -> FakeServer:
        server = FakeServer(tmp_path / f"s{len(servers)}.sock", handler, **kw)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


def start_handler(req: dict[str, Any]) -> list[dict[str, Any]]:
    name = req["service"]
    if name == "nope":
        return [{"id": req["id"], "ok": False, "error": {"code": "unknown-service", "message": "no service provides 'nope'"}, "messages": []}]
    if name == "bad":
        return [{"id": req["id"], "ok": False, "error": {"code": "start-failed", "message": "service 'bad' failed to start"}, "messages": ["Service bad failed to start."]}]
    return [
        {"event": "state", "service": name, "from": "stopped", "to": "running", "pid": 1, "time": NOW, "reason": None},
        {"id": req["id"], "ok": True, "result": {"service": name, "started": [name], "state": "running", "pid": 10}, "messages": [f"Service {name} has been started."]},
    ]


def run_herd(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    status = main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_start_two_services_pipelined(fake_server: Callable[..., FakeServer], capsys: pytest.CaptureFixture[str]) -> None:
    server = fake_server(start_handler, wait_for=2)
    status, out, err = run_herd(capsys, ["-s", str(server.path), "start", "a", "b"])
    assert status == EXIT_OK and err == ""
    # both requests arrived in one write, before any reply was sent
    assert server.batches[0] == [
        {"id": 1, "action": "start", "service": "a", "args": []},
        {"id": 2, "action": "start", "service": "b", "args": []},
    ]
    # replies come back out of order, printed in command-line order
    assert out == "Service a has been started.\nService b has been started.\n"


def test_start_json_output(fake_server: Callable[..., FakeServer], capsys: pytest.CaptureFixture[str]) -> None:
    server = fake_server(start_handler, wait_for=3)
    status, out, err = run_herd(capsys, ["--json", "-s", str(server.path), "start", "a", "nope", "b"])
    assert status == EXIT_USAGE  # the worst of the replies: unknown service
    assert [json.loads(line) for line in out.splitlines()] == [
        {"service": "a", "started": ["a"], "state": "running", "pid": 10},
        {"code": "unknown-service", "message": "no service provides 'nope'"},
        {"service": "b", "started": ["b"], "state": "running", "pid": 10},
    ]
    assert err == ""


def test_start_failure_exits_1(fake_server: Callable[..., FakeServer], capsys: pytest.CaptureFixture[str]) -> None:
    server = fake_server(start_handler, wait_for=2)
    status, out, err = run_herd(capsys, ["-s", str(server.path), "start", "a", "bad"])
    assert status == EXIT_FAILED
    assert out == "Service a has been started.\nService bad failed to start.\n"
    assert err == "herd: error: service 'bad' failed to start\n"


def test_status_via_env_socket(
    fake_server: Callable[..., FakeServer], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def handler(req: dict[str, Any]) -> list[dict[str, Any]]:
        assert (req["action"], req["service"]) == ("summary", None)
        result = {"running": ["libvirtd"], "stopped": ["virtlogd"], "failed": []}
        return [{"id": req["id"], "ok": True, "result": result, "messages": []}]

    server = fake_server(handler)
    monkeypatch.setenv("SUPERVISOR_SOCKET", str(server.path))
    status, out, _ = run_herd(capsys, ["status"])
    assert status == EXIT_OK
    assert out == "Started:\n + libvirtd\nStopped:\n - virtlogd\n"


def test_status_from_a_daemon_without_summary(
    fake_server: Callable[..., FakeServer], capsys: pytest.CaptureFixture[str]
) -> None:
    # A daemon upgraded on disk but not yet re-executed knows no `summary`:
    # herd asks it for the full status on the same connection and prints the same.
    asked: list[str] = []

    def handler(req: dict[str, Any]) -> list[dict[str, Any]]:
        asked.append(req["action"])
        if req["action"] == "summary":
            error = {"code": "unknown-action", "message": "no action 'summary'"}
            return [{"id": req["id"], "ok": False, "error": error, "messages": []}]
        return [{"id": req["id"], "ok": True, "result": {"services": [RUNNING, STOPPED]}, "messages": []}]

    server = fake_server(handler)
    status, out, err = run_herd(capsys, ["-s", str(server.path), "status"])
    assert (status, err) == (EXIT_OK, "")
    assert out == "Started:\n + libvirtd\nStopped:\n - virtlogd\n"
    assert asked == ["summary", "status"]


def test_status_service_block(fake_server: Callable[..., FakeServer], capsys: pytest.CaptureFixture[str]) -> None:
    def handler(req: dict[str, Any]) -> list[dict[str, Any]]:
        assert (req["action"], req["service"], req["args"]) == ("status", "virtlogd", [3])
        return [{"id": req["id"], "ok": True, "result": {"services": [STOPPED]}, "messages": []}]

    server = fake_server(handler)
    status, out, _ = run_herd(capsys, ["-s", str(server.path), "status", "virtlogd", "-n", "3"])
    assert status == EXIT_OK
    assert out.startswith("Status of virtlogd:\n  It is stopped since ")
    assert "Running" not in out and "disabled" not in out


def test_unknown_service_exits_2(fake_server: Callable[..., FakeServer], capsys: pytest.CaptureFixture[str]) -> None:
    def handler(req: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"id": req["id"], "ok": False, "error": {"code": "unknown-service", "message": "no service provides 'x'"}}]

    server = fake_server(handler)
    status, out, err = run_herd(capsys, ["-s", str(server.path), "status", "x"])
    assert (status, out, err) == (EXIT_USAGE, "", "herd: error: no service provides 'x'\n")


def test_custom_action_request(fake_server: Callable[..., FakeServer], capsys: pytest.CaptureFixture[str]) -> None:
    def handler(req: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"id": req["id"], "ok": True, "result": {"echo": req}, "messages": ["Triggered."]}]

    server = fake_server(handler)
    status, out, _ = run_herd(capsys, ["-s", str(server.path), "trigger", "ganeti-watcher", "now", "-v"])
    assert (status, out) == (EXIT_OK, "Triggered.\n")
    assert server.requests == [{"id": 1, "action": "trigger", "service": "ganeti-watcher", "args": ["now", "-v"]}]


def test_connection_closed_before_reply_exits_3(
    fake_server: Callable[..., FakeServer], capsys: pytest.CaptureFixture[str]
) -> None:
    server = fake_server(lambda req: None)  # reads the request, hangs up
    status, out, err = run_herd(capsys, ["-s", str(server.path), "stop", "a"])
    assert (status, out) == (EXIT_UNREACHABLE, "")
    assert err.startswith("herd: error: ") and str(server.path) in err


def test_wrong_protocol_version(fake_server: Callable[..., FakeServer], capsys: pytest.CaptureFixture[str]) -> None:
    server = fake_server(lambda req: [], hello={"hello": "supervisor", "protocol": 2, "version": "9"})
    status, _, err = run_herd(capsys, ["-s", str(server.path), "status"])
    assert status == EXIT_FAILED and "protocol 2" in err


def test_too_many_clients_instead_of_hello(
    fake_server: Callable[..., FakeServer], capsys: pytest.CaptureFixture[str]
) -> None:
    refusal = {"id": None, "ok": False, "error": {"code": "too-many-clients", "message": "too many connections"}}
    server = fake_server(lambda req: [], hello=refusal)
    status, _, err = run_herd(capsys, ["-s", str(server.path), "status"])
    assert (status, err) == (EXIT_FAILED, "herd: error: too many connections\n")


def test_events_json_lines_until_closed(
    fake_server: Callable[..., FakeServer], capsys: pytest.CaptureFixture[str]
) -> None:
    event = {"event": "state", "service": "a", "from": "stopped", "to": "starting", "pid": None, "time": NOW, "reason": "start"}

    def handler(req: dict[str, Any]) -> list[dict[str, Any]]:
        assert req["action"] == "subscribe"
        return [{"id": req["id"], "ok": True, "result": {"subscribed": True}, "messages": []}, event]

    server = fake_server(handler, close_after=True)
    status, out, err = run_herd(capsys, ["-s", str(server.path), "events"])
    assert [json.loads(line) for line in out.splitlines()] == [event]
    # the server hung up: herd says so and exits 3
    assert status == EXIT_UNREACHABLE and str(server.path) in err


def test_events_overflow_is_printed_and_warned_about(
    fake_server: Callable[..., FakeServer], capsys: pytest.CaptureFixture[str]
) -> None:
    event = {"event": "state", "service": "a", "from": "stopped", "to": "starting", "pid": None, "time": NOW, "reason": "start"}
    overflow = {"event": "overflow", "stream": "state", "lost": 1234}

    def handler(req: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"id": req["id"], "ok": True, "result": {"subscribed": True}, "messages": []}, event, overflow, event]

    server = fake_server(handler, close_after=True)
    status, out, err = run_herd(capsys, ["-s", str(server.path), "events"])
    assert [json.loads(line) for line in out.splitlines()] == [event, overflow, event]
    assert err.startswith("herd: warning: 1234 state events lost (client too slow)\n"), err
    assert status == EXIT_UNREACHABLE


def test_log_follow_until_interrupted(fake_server: Callable[..., FakeServer]) -> None:
    history = {"time": NOW, "service": "c", "stream": "stdout", "line": "old"}
    live = {"event": "log", "time": NOW + 1, "service": "c", "stream": "stderr", "line": "new"}

    def handler(req: dict[str, Any]) -> list[dict[str, Any]]:
        assert (req["action"], req["service"], req["args"]) == ("log", "c", [10, "follow"])
        return [{"id": req["id"], "ok": True, "result": {"lines": [history]}, "messages": []}, live]

    server = fake_server(handler)
    proc = subprocess.Popen(
        [sys.executable, "-m", "herd", "-s", str(server.path), "log", "c", "-f"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        assert proc.stdout is not None
        first, second = proc.stdout.readline(), proc.stdout.readline()
        assert first.rstrip("\n").endswith(" c stdout: old")
        assert second.rstrip("\n").endswith(" c stderr: new")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == EXIT_OK
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_exchange_respects_window(fake_server: Callable[..., FakeServer]) -> None:
    from herd._client import Connection, exchange

    def handler(req: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"id": req["id"], "ok": True, "result": req["service"], "messages": []}]

    server = fake_server(handler)
    requests = [Call("start", f"s{i}").to_json(i + 1) for i in range(7)]
    with Connection.open(str(server.path)) as conn:
        assert conn.hello["protocol"] == 1
        replies = list(exchange(conn, requests, window=2))
    assert [r["result"] for r in replies] == [f"s{i}" for i in range(7)]
    assert server.batches[0] == requests[:2]
    assert all(len(batch) <= 2 for batch in server.batches)
