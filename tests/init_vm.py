"""A QEMU guest booted from the init test image (contrib/guest/build-init), driven from the host.

`InitVM` starts qemu-system-x86_64 under TCG with the image's kernel and
initramfs, its serial console in a file, QMP on a unix socket, and the
guest's sshd forwarded to a free port of 127.0.0.1; `ssh` runs a command in
the guest as root (the image's test key); `console` is what the guest wrote
on its console so far, without colours.  Also used by contrib/guest/bench-boot.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
QEMU = "qemu-system-x86_64"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def build_image(cache: Path | None = None) -> Path:
    """The image's directory (built, or taken from the cache: `cache`, else .cache/guest).

    Raises:
        AssertionError: the build failed (with its output).
    """
    argv = [sys.executable, str(REPO / "contrib/guest/build-init"), *([str(cache)] if cache else [])]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, f"contrib/guest/build-init failed:\n{p.stdout}\n{p.stderr}"
    return Path(p.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class InitVM:
    """One guest: start, talk to it (ssh, QMP, console), stop."""

    def __init__(self, image: Path, workdir: Path, *, init: str | None = None, memory: int = 768) -> None:
        self.image, self.dir = image, workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.serial = self.dir / "serial.log"
        self.qmp_path = self.dir / "qmp.sock"
        self.port = free_port()
        append = "console=ttyS0 panic=-1 quiet" + (f" rdinit={init}" if init else "")
        self.argv = [QEMU, "-accel", "tcg", "-m", str(memory), "-smp", "1", "-nodefaults", "-display", "none",
                     "-kernel", str(image / "vmlinuz"), "-initrd", str(image / "initrd.gz"), "-append", append,
                     "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{self.port}-:22",
                     "-device", "rtl8139,netdev=n0", "-serial", f"file:{self.serial}",
                     "-qmp", f"unix:{self.qmp_path},server,nowait", "-monitor", "none"]
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    def start(self) -> None:
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=open(self.dir / "qemu.out", "wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def console(self) -> str:
        try:
            raw = self.serial.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""
        return _ANSI.sub("", raw).replace("\r", "")

    def ssh(self, command: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        key = self.image / "id_ed25519"
        argv = ["ssh", "-i", str(key), "-p", str(self.port), "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "BatchMode=yes",
                "-o", "ConnectTimeout=60", "-o", "IdentitiesOnly=yes", "root@127.0.0.1", command]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def status(self) -> list[dict[str, Any]] | None:
        """`herd --json status` in the guest: its services, or None when it cannot be had (yet)."""
        try:
            p = self.ssh("herd --json status")
        except subprocess.TimeoutExpired:
            return None
        if p.returncode != 0:
            return None
        return json.loads(p.stdout)["services"]

    def qmp(self, command: str, **arguments: Any) -> dict[str, Any]:
        """One QMP command on a fresh connection; its answer (events skipped).

        Raises:
            OSError: QMP is not reachable.
        """
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(60)
            s.connect(str(self.qmp_path))
            f = s.makefile("rw")
            f.readline()  # the greeting
            for cmd in ({"execute": "qmp_capabilities"}, {"execute": command, "arguments": arguments}):
                f.write(json.dumps(cmd) + "\n")
                f.flush()
                while True:
                    answer = json.loads(f.readline())
                    if "return" in answer or "error" in answer:
                        break
            return answer

    def exited(self) -> int | None:
        assert self.proc is not None
        return self.proc.poll()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def all_up(services: list[dict[str, Any]] | None) -> bool:
    """Every service is running, or (a one-shot) ran and exited 0."""
    if not services:
        return False
    for svc in services:
        if svc["one-shot"]:
            exit_ = svc.get("last-exit") or {}
            if svc["state"] != "stopped" or exit_.get("code") != 0:
                return False
        elif svc["state"] != "running":
            return False
    return True


def have_tools() -> str | None:
    """What is missing on this host to run the guest, or None."""
    for prog in (QEMU, "ssh", "ssh-keygen", "cpio", "dpkg-deb", "apt-get"):
        if shutil.which(prog) is None:
            return prog
    if not Path("/usr/sbin/sshd").exists():
        return "/usr/sbin/sshd (openssh-server)"
    return None
