"""Who holds a TCP socket on this host, from ``/proc`` (Linux).

The secret service (``services/_secret_service.py``) sends private keys to
whatever answers on a forward port of 127.0.0.1.  Any local user can listen
there first; these helpers tell whether a socket belongs to a given process:

* ``/proc/net/tcp`` and ``/proc/net/tcp6`` (this network namespace) list
  every TCP socket with its addresses, state, owner uid and inode;
* ``/proc/PID/fd/*`` of a process links to ``socket:[INODE]`` for each of
  its sockets (threads share the table, so the main pid is enough).

A socket belongs to the process when its inode is one of those links.  A
socket not yet accepted has inode 0 and belongs to no one.  `check_listener`
(before connecting) and `check_peer` (before sending) apply this to the
secrets port and QEMU, and name the holder when it is someone else.
Everything here reads small files and may be slow on a host with many
sockets or processes: call it from a worker thread.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import shlex
import socket
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import trio

__all__ = [
    "RecipientError",
    "SocketOwnerError",
    "TcpSocket",
    "accepting",
    "check_listener",
    "check_peer",
    "describe_holders",
    "listeners",
    "server_side",
    "socket_inodes",
    "tcp_sockets",
]

LISTEN, ESTABLISHED = 0x0A, 0x01
_TABLES = (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6))
_CMDLINE_MAX = 200


class SocketOwnerError(Exception):
    """``/proc`` could not be read (the message says which file and why)."""


class RecipientError(Exception):
    """The secrets would not reach the recipient, or /proc cannot tell (the
    message, for the user, names the holder)."""


@dataclass(frozen=True, slots=True)
class TcpSocket:
    """One line of ``/proc/net/tcp{,6}``; IPv4-mapped IPv6 addresses given as IPv4."""

    local: tuple[str, int]
    remote: tuple[str, int]
    state: int
    uid: int
    inode: int


def _address(text: str, family: int) -> tuple[str, int]:
    """``0100007F:2AFC`` → ("127.0.0.1", 11004): the words are in host byte order."""
    hexaddr, _, hexport = text.partition(":")
    words = [int(hexaddr[i:i + 8], 16) for i in range(0, len(hexaddr), 8)]
    packed = struct.pack(f"={len(words)}I", *words)
    addr = ipaddress.ip_address(socket.inet_ntop(family, packed))
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr), int(hexport, 16)


def tcp_sockets() -> list[TcpSocket]:
    """Every TCP socket of this network namespace (IPv6 too, when the host has it).

    Raises:
        SocketOwnerError: ``/proc/net/tcp`` cannot be read or parsed.
    """
    out: list[TcpSocket] = []
    for path, family in _TABLES:
        try:
            with open(path, encoding="ascii") as f:
                lines = f.read().splitlines()[1:]
        except FileNotFoundError:
            if family == socket.AF_INET6:
                continue  # no IPv6 on this host
            raise SocketOwnerError(f"cannot read {path}: no such file (is /proc mounted?)") from None
        except OSError as exc:
            raise SocketOwnerError(f"cannot read {path}: {exc.strerror}") from None
        for line in lines:
            fields = line.split()
            try:
                out.append(TcpSocket(local=_address(fields[1], family), remote=_address(fields[2], family),
                                     state=int(fields[3], 16), uid=int(fields[7]), inode=int(fields[9])))
            except (IndexError, ValueError) as exc:
                raise SocketOwnerError(f"cannot parse {path}: {line.strip()!r} ({exc})") from None
    return out


def listeners(host: str, port: int, table: list[TcpSocket]) -> list[TcpSocket]:
    """The listening sockets that a connection to IPv4 `host`:`port` may reach:
    bound to `host` or to any address (IPv4, or IPv6 when not v6-only, which
    ``/proc`` does not tell, so counted)."""
    return [s for s in table if s.state == LISTEN and s.local[1] == port
            and s.local[0] in (host, "0.0.0.0", "::")]


def server_side(client: tuple[str, int], server: tuple[str, int], table: list[TcpSocket]) -> list[TcpSocket]:
    """The far end of our connection `client` → `server`: the socket whose
    local address is `server` and whose remote address is `client`."""
    return [s for s in table if s.local == server and s.remote == client and s.state != LISTEN]


def socket_inodes(pid: int) -> set[int]:
    """The inodes of every socket process `pid` holds.

    Raises:
        SocketOwnerError: the process is gone or its descriptors are not readable.
    """
    d = f"/proc/{pid}/fd"
    try:
        names = os.listdir(d)
    except OSError as exc:
        raise SocketOwnerError(f"cannot list {d}: {exc.strerror}") from None
    out = set()
    for name in names:
        try:
            target = os.readlink(f"{d}/{name}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:[") and target.endswith("]"):
            out.add(int(target[8:-1]))
    return out


def accepting(sock: TcpSocket, pid: int) -> bool:
    """Whether `sock` is one of process `pid`'s descriptors (never for inode 0).

    Raises:
        SocketOwnerError: `pid`'s descriptors cannot be read.
    """
    return sock.inode != 0 and sock.inode in socket_inodes(pid)


def _user(uid: int) -> str:
    try:
        return f"user {pwd.getpwuid(uid).pw_name}, uid {uid}"
    except KeyError:
        return f"uid {uid}"


def _process(pid: int) -> str:
    """``pid 5678 (user nobody, uid 65534): CMDLINE``, as far as /proc tells
    (the command line quoted as a shell would, control characters escaped,
    cut after 200 characters)."""
    text = f"pid {pid}"
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8", errors="replace") as f:
            uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
        text += f" ({_user(uid)})"
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read(4096).rstrip(b"\0").decode("utf-8", "replace").split("\0")
    except OSError:
        args = [""]
    if args != [""]:
        # Quoted, and escaped: the holder chose it, it must not forge log lines.
        argv = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in shlex.join(args))
        text += ": " + (argv if len(argv) <= _CMDLINE_MAX else argv[:_CMDLINE_MAX] + "...")
    return text


def _pids_holding(inodes: set[int]) -> dict[int, list[int]]:
    """inode → the pids that hold it (those whose ``/proc/PID/fd`` can be read)."""
    out: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            held = socket_inodes(int(entry.name)) & inodes
        except SocketOwnerError:
            continue  # gone, or another user's while not root
        for inode in held:
            out.setdefault(inode, []).append(int(entry.name))
    return out


def describe_holders(socks: list[TcpSocket]) -> str:
    """Who holds `socks`: each process (pid, user, command line) or, when none
    is visible, the socket's owner uid from ``/proc/net/tcp``."""
    by_inode = _pids_holding({s.inode for s in socks if s.inode})
    parts = []
    for s in socks:
        pids = by_inode.get(s.inode, [])
        if pids:
            parts.extend(_process(pid) for pid in sorted(pids))
        else:
            parts.append(f"a socket of {_user(s.uid)} (no process holding it is visible here)")
    return "; ".join(dict.fromkeys(parts))


def check_listener(host: str, port: int, pid: int | None) -> None:
    """Every socket listening on `host`:`port` is process `pid`'s (none
    listening is fine: connecting is then refused, or checked after).  With
    `pid` None (before QEMU is spawned) nothing may listen there.

    Raises:
        RecipientError: another process listens there (named), or /proc cannot tell.
    """
    try:
        found = listeners(host, port, tcp_sockets())
        foreign = [s for s in found if pid is None or not accepting(s, pid)]
    except SocketOwnerError as exc:
        raise RecipientError(f"refusing to send secrets: cannot tell who listens on {host}:{port}: "
                             f"{exc}") from None
    if not foreign:
        return
    who = describe_holders(foreign)
    if pid is None:
        raise RecipientError(f"the secrets port {host}:{port} is already held by {who}; "
                             "QEMU not started (the holder would be sent the secrets)")
    raise RecipientError(f"refusing to send secrets: {host}:{port} is held by {who}, not by QEMU (pid {pid})")


def check_peer(sock: socket.socket | trio.socket.SocketType, pid: int) -> None:
    """Before sending on the connected `sock`: the socket that accepted the
    connection is one of process `pid`'s descriptors.

    Raises:
        RecipientError: it is not (its holder named), or /proc cannot tell.
    """
    try:
        client, server = sock.getsockname()[:2], sock.getpeername()[:2]
    except OSError as exc:
        raise RecipientError(f"refusing to send secrets: the connection is gone: {exc.strerror}") from None
    where = f"{server[0]}:{server[1]}"
    try:
        ends = server_side(client, server, tcp_sockets())
        foreign = [s for s in ends if not accepting(s, pid)]
    except SocketOwnerError as exc:
        raise RecipientError(f"refusing to send secrets: cannot tell who accepted the connection to "
                             f"{where}: {exc}") from None
    if not ends:
        raise RecipientError(f"refusing to send secrets: the connection to {where} (from port "
                             f"{client[1]}) is not in /proc/net/tcp; cannot tell who accepted it")
    if foreign:
        raise RecipientError(f"refusing to send secrets: the connection to {where} was accepted by "
                             f"{describe_holders(foreign)}, not by QEMU (pid {pid})")
