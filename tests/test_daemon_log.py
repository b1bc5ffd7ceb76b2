"""The daemon's own log: UTC timestamps with their zone, and colour that honours NO_COLOR."""

from __future__ import annotations

import json
import os
import pty
import signal
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from helpers import Deadline, Supervisor, base_env, sleeper


def test_json_log_timestamps_are_utc_with_their_zone(sup: Supervisor) -> None:
    sup.start({"services": {"a": sleeper(sup.marker("a"))}})
    sup.herd("status", check=True)
    sup.stop()
    lines = [json.loads(line) for line in sup.stderr_path.read_text().splitlines() if line.startswith("{")]
    assert lines, sup.stderr_tail()
    now = datetime.now(timezone.utc)
    for line in lines:
        stamp = line["timestamp"]
        assert stamp.endswith("Z"), f"no UTC zone in {stamp!r}"
        when = datetime.fromisoformat(stamp)
        assert when.utcoffset() is not None and abs((now - when).total_seconds()) < 600, stamp


def console_log(tmp_path: Path, no_color: str | None) -> str:
    """The daemon's console log, written to a terminal (a pseudo-terminal), from start to stop."""
    sockdir = Path(os.path.realpath(tmp_path))
    config = tmp_path / "init.toml"
    config.write_text("")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_path = f"/tmp/svt-notify-{os.getpid()}-{no_color}"
    notify.bind(notify_path)
    env = base_env()
    env.pop("NO_COLOR", None)
    if no_color is not None:
        env["NO_COLOR"] = no_color
    env["NOTIFY_SOCKET"] = notify_path
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "-c", str(config), "-s", f"/tmp/svt-{os.getpid()}-log.sock",
             "--status-socket", f"/tmp/svt-{os.getpid()}-log-ro.sock", "--state-dir", str(sockdir / "state"),
             "--log-dir", str(sockdir / "log"), "--log-format", "console"],
            env=env, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal, start_new_session=True)
        os.close(terminal)
        notify.settimeout(30)
        while b"READY=1" not in notify.recv(4096).split(b"\n"):
            pass
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        out = b""
        deadline = Deadline(10)
        while not deadline.expired():
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the terminal's last writer is gone
                break
            if not chunk:
                break
            out += chunk
        return out.decode(errors="replace")
    finally:
        os.close(controller)
        notify.close()
        os.unlink(notify_path)


def test_console_log_is_coloured_on_a_terminal(tmp_path: Path) -> None:
    text = console_log(tmp_path, None)
    assert "shutting down" in text and "\x1b[" in text, text


def test_no_color_turns_the_colour_off(tmp_path: Path) -> None:
    text = console_log(tmp_path, "1")
    assert "shutting down" in text and "\x1b[" not in text, text
    stamp = text.split()[0]
    assert stamp.endswith("Z") and datetime.fromisoformat(stamp).utcoffset() is not None, text
