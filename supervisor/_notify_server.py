"""sd_notify, server side: one datagram socket for every notify service.

Services get ``NOTIFY_SOCKET`` pointing here.  The kernel attaches the
sender's credentials to each datagram (``SO_PASSCRED``), so a message is
routed by the *sending pid*, never by what the message claims: a process that
belongs to no service (not its main process, not in its session, not among
its descendants) is ignored.  Anyone may write to the socket, so what is read
is rate-limited per sender and in total (`supervisor._notify_gate`).
"""

from __future__ import annotations

import math
import os
import socket
import stat
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Final

import structlog
import trio

from ._notify_gate import READ_BURST, READ_RATE, REPORT_EVERY, NotifyGate, TokenBucket

__all__ = ["NotifyServer", "bound_path", "parse_notify", "session_of", "ancestors"]

log = structlog.get_logger("supervisor.notify")

_CRED: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid
MAX_DATAGRAM: Final = 4096
#: Datagrams read per wake-up before the loop yields.
_BATCH: Final = 64


def bound_path(fd: int) -> Path:
    """The path a Unix socket handed over by a previous image is bound to."""
    sock = socket.socket(fileno=fd)
    try:
        return Path(sock.getsockname())
    finally:
        sock.detach()


def parse_notify(data: bytes) -> dict[str, str]:
    """``b"READY=1\\nSTATUS=up"`` → ``{"READY": "1", "STATUS": "up"}`` (bad lines skipped)."""
    fields: dict[str, str] = {}
    for raw in data.split(b"\n"):
        key, sep, value = raw.partition(b"=")
        if not sep or not key:
            continue
        try:
            fields[key.decode("ascii")] = value.decode("utf-8", errors="replace")
        except UnicodeDecodeError:
            continue
    return fields


def _stat_fields(pid: int) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rfind(b")") + 2:].split()


def session_of(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[3]) if fields else None


def ancestors(pid: int, limit: int = 64) -> list[int]:
    """Parent, grandparent, … of `pid` (stops at pid 1 or a vanished process)."""
    out: list[int] = []
    while len(out) < limit:
        fields = _stat_fields(pid)
        if not fields:
            break
        ppid = int(fields[1])
        if ppid <= 1:
            break
        out.append(ppid)
        pid = ppid
    return out


class NotifyServer:
    """Receives notify datagrams and hands (sender pid, fields) to `route`.

    `route` returns False when the sender belongs to no service: its next
    messages are then dropped unread for a while (see `_notify_gate`).
    """

    def __init__(self, path: Path, route: Callable[[int, dict[str, str]], bool | None], *,
                 fd: int | None = None) -> None:
        self.path = path
        self.route = route
        self.gate = NotifyGate()
        if fd is not None:  # handed over by the previous image (re-exec)
            os.set_inheritable(fd, False)
            self.sock = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
            return
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        except FileNotFoundError:
            pass
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock._sock.bind(str(path))
        # Anyone may send (services run as other users); the credentials decide.
        os.chmod(path, 0o666)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        raw = self.sock._sock
        space = socket.CMSG_SPACE(_CRED.size)
        reading = TokenBucket(READ_RATE, READ_BURST, trio.current_time())
        try:
            with self.sock:
                while True:
                    due = self.gate.pending_report()
                    with trio.move_on_at(math.inf if due is None else due):
                        await trio.lowlevel.wait_readable(self.sock)
                    now = trio.current_time()
                    if (report := self.gate.report(now)) is not None:
                        log.warning("notify messages dropped", interval=REPORT_EVERY, **report)
                    # What is not read now waits in the kernel, whose queue then blocks senders.
                    for _ in range(_BATCH):
                        if not reading.take(now):
                            break
                        try:
                            data, ancdata, _flags, _addr = raw.recvmsg(MAX_DATAGRAM, space)
                        except (BlockingIOError, InterruptedError):
                            break
                        self._receive(data, ancdata, now)
                    await trio.sleep(reading.wait(trio.current_time(), _BATCH))  # a batch, not one
        finally:
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def drain(self) -> None:
        """Read now what the kernel holds (up to a batch), outside the reading
        pace: a main process that exited while starting may have sent READY=1
        just before, and it must be heard before the exit is judged."""
        raw, space, now = self.sock._sock, socket.CMSG_SPACE(_CRED.size), trio.current_time()
        for _ in range(_BATCH):
            try:
                data, ancdata, _flags, _addr = raw.recvmsg(MAX_DATAGRAM, space)
            except (BlockingIOError, InterruptedError):
                return
            self._receive(data, ancdata, now)

    def _receive(self, data: bytes, ancdata: list[tuple[int, int, bytes]], now: float) -> None:
        pid = uid = None
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, uid, _gid = _CRED.unpack(payload[:_CRED.size])
        if not pid or uid is None or not self.gate.admit(pid, uid, now):
            return
        fields = parse_notify(data)
        if fields:
            delivered = self.route(pid, fields)
            self.gate.routed(pid, uid, delivered is not False, now)
