"""A private OpenSSH server on localhost, for the ``herd --host`` tests.

:class:`SSHServer` writes a host key, a client key, an ``sshd_config`` and a
client ``ssh_config`` into a temporary directory, and runs Debian's
``/usr/sbin/sshd -D -e`` on a free port of 127.0.0.1 (it needs root, for the
privilege separation sshd does; CI runs as root).  Key authentication only.
The client config defines aliases (``localhost``, ``alpha``, ``beta``) that
all reach this server as root, and ``dead``, a port where nothing listens.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from helpers import terminate, wait_until

SSHD = "/usr/sbin/sshd"
ALIASES = ("localhost", "alpha", "beta")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SSHServer:
    """One running sshd; ``config`` is the ssh_config file for clients."""

    def __init__(self, directory: Path) -> None:
        if os.geteuid() != 0:
            pytest.skip("a private sshd needs root (CI runs as root)")
        if not (shutil.which("ssh") and os.path.exists(SSHD)):
            pytest.fail("ssh/sshd missing: contrib/dev test installs openssh-server and openssh-client")
        self.dir = directory
        directory.mkdir(mode=0o700, exist_ok=True)
        for name in ("host_key", "user_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(directory / name)], check=True)
        (directory / "authorized_keys").write_text((directory / "user_key.pub").read_text())
        self.port = _free_port()
        self.log = directory / "sshd.log"
        sshd_config = directory / "sshd_config"
        sshd_config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {directory / 'host_key'}\n"
            f"AuthorizedKeysFile {directory / 'authorized_keys'}\nPidFile none\n"
            "UsePAM no\nStrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\nAllowStreamLocalForwarding no\nAllowTcpForwarding no\n"
            "X11Forwarding no\nPrintMotd no\n"
        )
        host_key = (directory / "host_key.pub").read_text().split()
        (directory / "known_hosts").write_text(f"sshd-test {host_key[0]} {host_key[1]}\n")
        dead = _free_port()
        stanzas = []
        for alias, port in [*((a, self.port) for a in ALIASES), ("dead", dead)]:
            stanzas.append(
                f"Host {alias}\n  HostName 127.0.0.1\n  Port {port}\n  User root\n"
                f"  IdentityFile {directory / 'user_key'}\n  IdentitiesOnly yes\n"
                f"  UserKnownHostsFile {directory / 'known_hosts'}\n  HostKeyAlias sshd-test\n"
                "  StrictHostKeyChecking yes\n  LogLevel ERROR\n"
            )
        self.config = directory / "ssh_config"
        self.config.write_text("\n".join(stanzas))
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(sshd_config)], stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        wait_until(self._listening, 10, f"sshd listening on port {self.port}")

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"sshd exited {self.proc.returncode}: {self.log.read_text()}")
        return "Server listening" in self.log.read_text(errors="replace")

    def close(self) -> None:
        terminate(self.proc)
