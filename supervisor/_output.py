"""Service output: pipes → timestamped lines → log file, ring buffer, followers.

Each service has one pipe for stdout and one for stderr, created once and
kept across restarts, so nothing a service writes between two runs is lost
and a re-exec can hand the read ends over.  The supervisor keeps only the
read ends: each spawn gets fresh write ends (the same pipe, opened again
through ``/proc/self/fd``), which are closed once the child has them.  When
the last writer is gone the unfinished last line is written out, and the
reader waits for the next spawn.  Lines longer than `MAX_LINE` are split;
bytes that are not UTF-8 are replaced.

At most `MAX_OPEN_LOGS` log files are open at once, whatever the number of
services: the least recently written one is closed, and opened again when
its service writes next.
"""

from __future__ import annotations

import contextvars
import os
from collections import OrderedDict, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final

import structlog
import trio

__all__ = ["LogLine", "LogHub", "OutputError", "ServiceOutput", "MAX_LINE", "MAX_OPEN_LOGS", "note", "CURRENT"]

#: The output of the service whose actor runs the current task (its hooks too).
CURRENT: contextvars.ContextVar["ServiceOutput | None"] = contextvars.ContextVar("service_output", default=None)


def note(text: str) -> bool:
    """For hooks and actions: add a line to the current service's log
    (stream "supervisor"), as `herd log` and `herd status` show it.  Returns
    False (and does nothing) outside a service's tasks."""
    output = CURRENT.get()
    if output is None:
        return False
    output.note(text)
    return True

MAX_LINE: Final = 64 * 1024
#: Log files open at once, across all services.
MAX_OPEN_LOGS: Final = 128
log = structlog.get_logger("supervisor.output")

#: The outputs whose log file is open, least recently written first.
_open_logs: OrderedDict[ServiceOutput, None] = OrderedDict()


@dataclass(frozen=True, slots=True)
class LogLine:
    time: float
    service: str
    stream: str  # "stdout" | "stderr" | "supervisor"
    line: str

    def to_json(self) -> dict[str, object]:
        return {"time": self.time, "service": self.service, "stream": self.stream, "line": self.line}


class LogHub:
    """All services' recent lines, and the clients following them."""

    def __init__(self, maxlen: int = 5000) -> None:
        self.lines: deque[LogLine] = deque(maxlen=maxlen)
        self._followers: dict[trio.MemorySendChannel[LogLine], str | None] = {}

    def add(self, line: LogLine) -> None:
        self.lines.append(line)
        for chan, service in list(self._followers.items()):
            if service is not None and service != line.service:
                continue
            try:
                chan.send_nowait(line)
            except trio.WouldBlock:  # a follower that does not keep up is dropped
                self._followers.pop(chan, None)
                chan.close()
            except trio.BrokenResourceError:
                self._followers.pop(chan, None)

    def recent(self, n: int) -> list[LogLine]:
        return list(self.lines)[-n:] if n > 0 else []

    @contextmanager
    def follow(self, service: str | None, buffer: int = 1000) -> Iterator[trio.MemoryReceiveChannel[LogLine]]:
        send, recv = trio.open_memory_channel[LogLine](buffer)
        self._followers[send] = service
        try:
            yield recv
        finally:
            self._followers.pop(send, None)
            send.close()


class OutputError(OSError):
    """A service's output pipes cannot be set up."""


class ServiceOutput:
    """One service's output: its pipes, its log file, its recent lines."""

    def __init__(self, service: str, path: Path, hub: LogHub, ring: int = 200, *,
                 max_size: int = 2 * 1024 * 1024, max_backups: int = 3) -> None:
        self.service = service
        self.path = path
        self.max_size = max_size
        self.max_backups = max_backups
        self._size = 0
        self.hub = hub
        self.ring: deque[LogLine] = deque(maxlen=ring)
        self._fd = -1
        self._write_failed = False
        self._pipes: dict[str, int] = {}  # the read end, per stream
        self._attached: dict[str, trio.Event] = {}  # set when a writer comes after the last went
        self._partial: dict[str, bytearray] = {}  # an unfinished last line, per stream

    # -- pipes ---------------------------------------------------------------------

    @contextmanager
    def writers(self, nursery: trio.Nursery) -> Iterator[tuple[int, int]]:
        """Write ends for a child's stdout and stderr, closed on leaving (pipes made on first use).

        Raises:
            OutputError: a pipe cannot be made or opened (out of descriptors).
        """
        ends: list[int] = []
        try:
            for stream in ("stdout", "stderr"):
                try:
                    if stream not in self._pipes:
                        r, w = os.pipe2(os.O_CLOEXEC)
                        self._pipes[stream] = r
                        nursery.start_soon(self._pump, stream, r)
                        ends.append(w)
                    else:
                        ends.append(os.open(f"/proc/self/fd/{self._pipes[stream]}",
                                            os.O_WRONLY | os.O_CLOEXEC))
                except OSError as exc:
                    raise OutputError(exc.errno, f"cannot open its {stream} pipe: {exc.strerror}") from None
                if stream in self._attached:
                    self._attached.pop(stream).set()
            yield ends[0], ends[1]
        finally:
            for fd in ends:
                os.close(fd)

    def resume(self, nursery: trio.Nursery) -> None:
        """Start reading pipes handed over by a previous image (re-exec)."""
        for stream, r in self._pipes.items():
            nursery.start_soon(self._pump, stream, r)

    def handover(self) -> dict[str, object]:
        """The pipes (read ends) and unfinished lines, for the next image (re-exec)."""
        return {
            "pipes": {stream: [r] for stream, r in self._pipes.items()},
            "partial": {stream: bytes(buf).hex() for stream, buf in self._partial.items() if buf},
        }

    def take_over(self, data: dict[str, object]) -> None:
        pipes = data.get("pipes") or {}
        partial = data.get("partial") or {}
        assert isinstance(pipes, dict) and isinstance(partial, dict)
        for stream, (r, *older) in pipes.items():
            os.set_inheritable(r, False)
            self._pipes[stream] = r
            for w in older:  # an image before 0.2 kept the write end too
                os.close(w)
        for stream, hexed in partial.items():
            self._partial[stream] = bytearray(bytes.fromhex(hexed))

    async def _pump(self, stream: str, fd: int) -> None:
        try:
            await self._read(stream, fd)
        finally:  # the read end is closed: never open its number again for a child
            if self._pipes.get(stream) == fd:
                del self._pipes[stream]

    async def _read(self, stream: str, fd: int) -> None:
        buf = self._partial.setdefault(stream, bytearray())
        async with trio.lowlevel.FdStream(fd) as pipe:
            while True:
                try:
                    data = await pipe.receive_some(65536)
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    break
                if data:
                    buf += data
                    self._split(stream, buf)
                    continue
                # Every writer is gone (the service's processes ended): finish the
                # last line, then wait for the next spawn to open the pipe again.
                if buf:
                    self.emit(stream, bytes(buf))
                    buf.clear()
                attached = self._attached[stream] = trio.Event()
                await attached.wait()

    def _split(self, stream: str, buf: bytearray) -> None:
        """Emit every complete line of `buf`, cutting lines at MAX_LINE bytes."""
        while True:
            i = buf.find(b"\n", 0, MAX_LINE + 1)
            if i >= 0:
                self.emit(stream, bytes(buf[:i]))
                del buf[:i + 1]
            elif len(buf) >= MAX_LINE:
                self.emit(stream, bytes(buf[:MAX_LINE]))
                del buf[:MAX_LINE]
            else:
                return

    def close(self) -> None:
        """At the end of the service (its readers are cancelled: they close the read ends)."""
        self._pipes.clear()
        self._close_log()

    def _close_log(self) -> None:
        _open_logs.pop(self, None)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # -- lines ---------------------------------------------------------------------

    def note(self, text: str) -> None:
        """A line from the supervisor about this service (start, exit, …)."""
        self.emit("supervisor", text.encode())

    def emit(self, stream: str, raw: bytes) -> None:
        now = datetime.now().astimezone()
        text = raw.rstrip(b"\r").decode("utf-8", errors="replace")
        line = LogLine(now.timestamp(), self.service, stream, text)
        self.ring.append(line)
        self.hub.add(line)
        self._write(f"{now.isoformat(timespec='microseconds')} {stream} {text}\n".encode())

    def recent(self, n: int) -> list[LogLine]:
        return list(self.ring)[-n:] if n > 0 else []

    def _write(self, data: bytes) -> None:
        if self.max_size and self._size and self._size + len(data) > self.max_size:
            self._rotate()
        if self._fd < 0 and not self._open():
            return
        _open_logs.move_to_end(self)
        try:
            written = os.write(self._fd, data)
            while written < len(data):  # a short write (signal, nearly full disk)
                written += os.write(self._fd, data[written:])
            self._size += len(data)
            self._write_failed = False
        except OSError as exc:
            self._report(exc)

    def _open(self) -> bool:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            self._size = os.fstat(self._fd).st_size
            _open_logs[self] = None
            while len(_open_logs) > MAX_OPEN_LOGS:  # the least recently written one goes
                next(iter(_open_logs))._close_log()
            return True
        except OSError as exc:
            self._report(exc)
            return False

    def _rotate(self) -> None:
        """NAME.log → NAME.log.1 → … → NAME.log.N (the oldest is dropped)."""
        self._close_log()
        self._size = 0
        try:
            if self.max_backups == 0:
                os.unlink(self.path)
                return
            for i in range(self.max_backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{i}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        except OSError as exc:
            self._report(exc)

    def _report(self, exc: OSError) -> None:
        # Reported once per failure streak; the service keeps running regardless.
        if not self._write_failed:
            self._write_failed = True
            log.warning("log file not writable", service=self.service, path=str(self.path),
                        error=exc.strerror or str(exc))

