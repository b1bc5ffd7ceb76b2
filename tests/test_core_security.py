"""Sockets are created safely: tight modes, and no directory others control."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

from helpers import REPO, base_env


def _run(tmp: Path, sock_dir: Path) -> subprocess.CompletedProcess[str]:
    conf = tmp / "c.toml"
    conf.write_text('[services.s]\ncommand = ["sleep", "100"]\nauto-start = false\n')
    return subprocess.run(
        [sys.executable, "-m", "supervisor", "-c", str(conf), "-s", str(sock_dir / "rw.sock"),
         "--status-socket", str(sock_dir / "ro.sock"), "--state-dir", str(tmp / "st"),
         "--log-dir", str(tmp / "log")],
        cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=30)


def test_refuses_a_socket_directory_others_can_write(tmp_path: Path) -> None:
    shared = Path(tempfile.mkdtemp(prefix="svt-open-"))
    try:
        os.chmod(shared, 0o777)
        result = _run(tmp_path, shared)
        assert result.returncode == 1
        assert f"socket directory {shared} is writable by others" in result.stderr
        assert not (shared / "rw.sock").exists()
    finally:
        os.rmdir(shared)


def test_refuses_a_symlinked_socket_directory(tmp_path: Path) -> None:
    real = Path(tempfile.mkdtemp(prefix="svt-real-"))
    link = real.with_name(real.name + "-link")
    link.symlink_to(real)
    try:
        result = _run(tmp_path, link)
        assert result.returncode == 1
        assert "is not a directory" in result.stderr
    finally:
        link.unlink()
        os.rmdir(real)


def test_socket_directory_is_created_private_for_a_normal_user_path(tmp_path: Path) -> None:
    # A directory the daemon creates itself is 0755 as root (others must reach the
    # status socket) and 0700 otherwise; the sockets inside are 0600.
    base = Path(tempfile.mkdtemp(prefix="svt-new-"))
    sock_dir = base / "sub"
    try:
        conf = tmp_path / "c.toml"
        conf.write_text("")
        proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "-c", str(conf), "-s", str(sock_dir / "rw.sock"),
             "--status-socket", str(sock_dir / "ro.sock"), "--state-dir", str(tmp_path / "st"),
             "--log-dir", str(tmp_path / "log")],
            cwd=REPO, env={**base_env(), "NOTIFY_SOCKET": ""}, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stderr is not None
            for line in proc.stderr:  # the daemon logs "ready" once its sockets listen
                if '"ready"' in line or " ready " in line:
                    break
            mode = stat.S_IMODE(os.stat(sock_dir).st_mode)
            assert mode == (0o755 if os.getuid() == 0 else 0o700)
            for name in ("rw.sock", "ro.sock"):
                assert stat.S_IMODE(os.stat(sock_dir / name).st_mode) == 0o600
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    finally:
        for p in sorted(base.rglob("*"), reverse=True):
            p.unlink() if not p.is_dir() else p.rmdir()
        base.rmdir()
