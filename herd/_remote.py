"""``herd --host [USER@]HOST[:SOCKET]``: reach a remote supervisor through OpenSSH.

Nothing of ours listens on the network.  ``herd`` runs ``ssh HOST`` with a
fixed remote command: a few lines of standard-library Python (:data:`BRIDGE`)
that read the socket path from the first line of their standard input,
connect to that Unix socket, and copy bytes both ways between the socket and
the ssh channel.  The control protocol then flows unchanged, so the local
``herd`` renders the replies exactly as it does for a local supervisor.

* The remote command is a constant: no word of the host string, the socket
  path or the action ever reaches a shell.  The socket path travels as data
  on the channel.
* The host string is checked before ssh runs: it cannot start with ``-`` (so
  it cannot be read as an ssh option), and ``ssh ... -- HOST`` ends ssh's
  options anyway.
* Authentication, host keys and aliases are ssh's: ``~/.ssh/config`` or the
  file named by ``$HERD_SSH_CONFIG`` (``ssh -F``).  ssh runs with
  ``BatchMode=yes``: it never prompts (use keys or an agent).

This module is imported only when ``--host`` is given.  The status page
(``statuspage``) reaches its hosts through :func:`ssh_argv` too.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Final, TextIO

from herd._args import Invocation, UsageError
from herd._client import Connection, HerdError, Unreachable, exchange
from herd.protocol import EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, exit_code_for

__all__ = [
    "BRIDGE",
    "BRIDGE_NO_SUPERVISOR",
    "DEFAULT_REMOTE_SOCKET",
    "DEFAULT_REMOTE_STATUS_SOCKET",
    "Host",
    "parse_host",
    "ssh_argv",
    "bridge_error",
    "RemoteConnection",
    "run_hosts",
]

#: The socket used on a remote host when neither ``HOST:SOCKET`` nor ``-s`` names one
#: (the default for a supervisor running as root).
DEFAULT_REMOTE_SOCKET: Final = "/run/supervisor/control.sock"
#: The read-only socket the status page uses by default on a remote host.
DEFAULT_REMOTE_STATUS_SOCKET: Final = "/run/supervisor/status.sock"

#: The bridge's exit status when nothing answers on the remote socket.
BRIDGE_NO_SUPERVISOR: Final = 3

#: Runs on the remote host (``python3 -c BRIDGE``).  First line of stdin: the
#: socket path.  Then stdin -> socket and socket -> stdout until either ends.
BRIDGE: Final = r"""
import os, socket, sys, threading
path = b""
while not path.endswith(b"\n"):
    c = os.read(0, 1)
    if not c:
        sys.exit(0)
    path += c
path = path[:-1]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(path)
except OSError as e:
    sys.stderr.write("herd-bridge: cannot connect to %s: %s\n" % (path.decode("utf-8", "replace"), e.strerror or e))
    sys.exit(3)
def up():
    try:
        while True:
            b = os.read(0, 65536)
            if not b:
                break
            s.sendall(b)
    except OSError:
        pass
    os._exit(0)
threading.Thread(target=up, daemon=True).start()
try:
    while True:
        b = s.recv(65536)
        if not b:
            break
        while b:
            b = b[os.write(1, b):]
except OSError:
    pass
os._exit(0)
"""

#: What a host name may contain: an ssh_config alias, a DNS name, an IPv4
#: address (an IPv6 address goes in brackets).
_HOST_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_USER_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_IPV6_RE: Final = re.compile(r"[0-9A-Fa-f:.]+")

#: Seconds allowed for ssh to connect, log in and bridge to the socket.
SSH_TIMEOUT: Final = 20.0


@dataclass(frozen=True, slots=True)
class Host:
    """A parsed ``[USER@]HOST[:SOCKET]``."""

    text: str
    host: str
    user: str | None = None
    socket: str | None = None

    def socket_or(self, default: str) -> str:
        """The remote socket: the one in the host string, else ``default``."""
        return self.socket or default


def parse_host(text: str) -> Host:
    """Parse ``[USER@]HOST[:SOCKET]`` (``[ADDR]`` for an IPv6 address).

    Raises:
        UsageError: the string is empty, starts with ``-``, holds a character a
            host name cannot hold, or SOCKET is not an absolute path.
    """
    if not text:
        raise UsageError("the --host value is empty")
    if text.startswith("-"):
        raise UsageError(f"refusing host {text!r}: a host may not start with '-'")
    if any(ord(ch) < 32 or ch in " \x7f" for ch in text):
        raise UsageError(f"refusing host {text!r}: it holds a space or a control character")
    user: str | None = None
    rest = text
    at = rest.find("@")
    colon = rest.find(":")
    if at >= 0 and (colon < 0 or at < colon):
        user, rest = rest[:at], rest[at + 1 :]
        if not _USER_RE.fullmatch(user):
            raise UsageError(f"refusing host {text!r}: bad user name {user!r}")
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0 or not _IPV6_RE.fullmatch(rest[1:end]):
            raise UsageError(f"refusing host {text!r}: bad bracketed address")
        host, rest = rest[1:end], rest[end + 1 :]
        if rest and not rest.startswith(":"):
            raise UsageError(f"refusing host {text!r}: expected ':SOCKET' after ']'")
    else:
        host, _, sock = rest.partition(":")
        rest = ":" + sock if _ else ""
        if not _HOST_RE.fullmatch(host):
            raise UsageError(f"refusing host {text!r}: bad host name {host!r}")
    path = rest[1:] if rest else None
    if path is not None and not path.startswith("/"):
        raise UsageError(f"refusing host {text!r}: the socket {path!r} is not an absolute path")
    return Host(text=text, host=host, user=user, socket=path)


def ssh_argv(host: Host, env: Mapping[str, str] | None = None) -> list[str]:
    """The ssh command line that runs :data:`BRIDGE` on ``host``.

    ``$HERD_SSH_CONFIG`` names an ssh_config file (``ssh -F``).
    """
    env = os.environ if env is None else env
    argv = ["ssh", "-T", "-x", "-a", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
    config = env.get("HERD_SSH_CONFIG")
    if config:
        argv += ["-F", config]
    if host.user:
        argv += ["-l", host.user]
    # A constant remote command: nothing from the command line is in it.
    argv += ["--", host.host, "exec python3 -c " + shlex.quote(BRIDGE)]
    return argv


def bridge_error(host: Host, sock: str, returncode: int | None, stderr: str, fallback: str | None = None) -> str:
    """A one-line reason for a failed connection to ``host``, from ssh's exit and stderr.

    ``fallback`` is used when neither ssh (exit status 255) nor the bridge (no
    supervisor) failed: the far end was reached, and ``fallback`` says what it did.
    """
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    if returncode == BRIDGE_NO_SUPERVISOR and last.startswith("herd-bridge:"):
        reason = last.rsplit(": ", 1)[-1]
        return f"{host.text}: no supervisor at {sock} ({reason}); is the supervisor running?"
    if returncode == 255:
        return f"{host.text}: ssh failed: {last or 'exit status 255'}"
    if fallback is not None:
        return fallback
    if last:
        return f"{host.text}: {last}"
    return f"{host.text}: the connection closed before the supervisor's greeting"


class RemoteConnection(Connection):
    """A :class:`Connection` whose far end is :data:`BRIDGE` under ``ssh HOST``."""

    def __init__(self, host: Host, sock: str, env: Mapping[str, str] | None = None) -> None:
        mine, theirs = socket.socketpair()
        super().__init__(host.text, mine)
        self.host = host
        self.remote_socket = sock
        self._stderr: IO[bytes] = tempfile.TemporaryFile()
        try:
            self._proc = subprocess.Popen(
                ssh_argv(host, env), stdin=theirs, stdout=theirs, stderr=self._stderr, close_fds=True
            )
        except OSError as exc:
            mine.close()
            self._stderr.close()
            raise Unreachable(f"{host.text}: cannot run ssh: {exc.strerror or exc}") from None
        finally:
            theirs.close()

    def greet(self, timeout: float = SSH_TIMEOUT) -> RemoteConnection:
        """Send the socket path and read the supervisor's hello.

        Raises:
            Unreachable: ssh failed, or no supervisor answers on the remote socket
                (the message names the host and says which).
            HerdError: the remote supervisor speaks another protocol.
        """
        try:
            self._sock.settimeout(timeout)
            self._sock.sendall(self.remote_socket.encode() + b"\n")
            self.hello = self._read_hello()
            self._sock.settimeout(None)
        except Unreachable as exc:
            message = exc.message if exc.message.startswith(self.host.text) else f"{self.host.text}: {exc.message}"
            raise Unreachable(self._failure(message)) from None
        except OSError:
            raise Unreachable(self._failure(f"{self.host.text}: no greeting within {timeout:g} s")) from None
        return self

    def _failure(self, fallback: str) -> str:
        try:
            code = self._proc.wait(5)
        except subprocess.TimeoutExpired:
            code = None
        self._stderr.seek(0)
        text = self._stderr.read(65536).decode("utf-8", "replace")
        return bridge_error(self.host, self.remote_socket, code, text, fallback)

    def close(self) -> None:
        """Close the channel and end ssh."""
        super().close()
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._stderr.close()


def _section(host: Host, index: int, out: TextIO) -> None:
    out.write(("\n" if index else "") + f"Host {host.text}:\n")


def _json_many(host: Host, conn: Connection, invocation: Invocation, out: TextIO) -> int:
    from herd import render

    status = EXIT_OK
    requests = [call.to_json(i + 1) for i, call in enumerate(invocation.calls)]
    for reply in exchange(conn, requests):
        if reply.get("ok") is True:
            out.write(render.json_line({"host": host.text, "result": reply.get("result")}) + "\n")
        else:
            error = reply.get("error") if isinstance(reply.get("error"), dict) else {}
            out.write(render.json_line({"host": host.text, "error": error}) + "\n")
            status = max(status, exit_code_for(str(error.get("code", "internal"))))
    return status


def run_hosts(invocation: Invocation, out: TextIO, *, color: bool = False,
              env: Mapping[str, str] | None = None) -> int:
    """Run ``invocation`` on each of its hosts; the worst exit status.

    One host: exactly the output of a local ``herd``.  Several hosts: one
    section per host (``Host NAME:`` then the usual text), or with ``--json``
    one object per reply, ``{"host": NAME, "result": …}`` or
    ``{"host": NAME, "error": {"code", "message"}}``.  A host that cannot be
    reached gets an error naming it (code ``unreachable`` in JSON); the
    others are still shown.

    Raises:
        HerdError: with one host, as a local ``herd`` would.
    """
    from herd.cli import run

    hosts = [parse_host(h) for h in invocation.hosts]
    default = invocation.socket or DEFAULT_REMOTE_SOCKET
    if len(hosts) == 1:
        conn = RemoteConnection(hosts[0], hosts[0].socket_or(default), env)
        with conn:
            conn.greet()
            return run(invocation, conn, out, color=color)
    if invocation.follow:
        raise HerdError(f"'{invocation.action}' follows one supervisor: give one --host", EXIT_USAGE)
    # Start every ssh first, so the hosts are reached in parallel.
    conns: list[RemoteConnection | HerdError] = []
    for host in hosts:
        try:
            conns.append(RemoteConnection(host, host.socket_or(default), env))
        except HerdError as exc:
            conns.append(exc)
    status = EXIT_OK
    try:
        for index, (host, conn) in enumerate(zip(hosts, conns)):
            if not invocation.json:
                _section(host, index, out)
            try:
                if isinstance(conn, HerdError):
                    raise conn
                conn.greet()
                if invocation.json:
                    status = max(status, _json_many(host, conn, invocation, out))
                else:
                    status = max(status, run(invocation, conn, out, color=color))
            except HerdError as exc:
                message = exc.message if exc.message.startswith(host.text) else f"{host.text}: {exc.message}"
                if invocation.json:
                    from herd import render

                    code = "unreachable" if exc.exit_status == EXIT_UNREACHABLE else "failed"
                    out.write(render.json_line({"host": host.text, "error": {"code": code, "message": message}}) + "\n")
                out.flush()
                print(f"herd: error: {message}", file=sys.stderr, flush=True)
                status = max(status, exc.exit_status)
            out.flush()
    finally:
        for conn in conns:
            if isinstance(conn, RemoteConnection):
                conn.close()
    return status

