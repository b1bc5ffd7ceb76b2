"""Service output: pipes → timestamped lines → log file, ring buffer, followers.

Each service has one pipe for stdout and one for stderr, created once and
kept across restarts, so nothing a service writes between two runs is lost,
a re-exec hands the read ends over, and the keeper (docs/keeper.md) holds
duplicates that a supervisor started after a crash takes back.  The file
format, line cutting (`MAX_LINE`) and rotation are `_logfile`'s; what is
read is written to the file at once, an unfinished line too.

The recent lines kept in memory are bounded in lines *and* in bytes: per
service `RING_LINES` / `RING_BYTES`, for all services together (`herd log`
without a name) `HUB_LINES` / `HUB_BYTES`.

The log file is opened, rotated and reopened through `_fs`, so a service
user who owns the log directory cannot redirect the supervisor's writes with
a symlink.  A log file that cannot be written (or is refused) loses nothing
that is in memory: the lines stay in the rings, and a "supervisor" line
there (and a warning in the daemon's log) says why.
"""

from __future__ import annotations

import contextvars
import math
import os
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import structlog
import trio

from . import _fs
from ._logfile import MAX_LINE, LogFile, parse_line

__all__ = ["LogLine", "LogHub", "ServiceOutput", "MAX_LINE", "note", "CURRENT"]

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

#: The recent lines kept per service, and their text's total size at most.
RING_LINES: Final = 200
RING_BYTES: Final = 1024 * 1024
#: The recent lines kept for all services together (``herd log``).
HUB_LINES: Final = 5000
HUB_BYTES: Final = 8 * 1024 * 1024
#: What one kept line costs beyond its text (the objects around it), roughly.
_LINE_OVERHEAD: Final = 200

log = structlog.get_logger("supervisor.output")


@dataclass(frozen=True, slots=True)
class LogLine:
    time: float
    service: str
    stream: str  # "stdout" | "stderr" | "supervisor"
    line: str

    def to_json(self) -> dict[str, object]:
        return {"time": self.time, "service": self.service, "stream": self.stream, "line": self.line}


class Ring:
    """The last lines, at most `max_lines` of them and `max_bytes` in all."""

    def __init__(self, max_lines: int, max_bytes: int) -> None:
        self.max_lines, self.max_bytes = max_lines, max_bytes
        self._lines: deque[LogLine] = deque()
        self._bytes = 0

    @staticmethod
    def _cost(line: LogLine) -> int:
        return len(line.line) + _LINE_OVERHEAD

    def append(self, line: LogLine) -> None:
        self._lines.append(line)
        self._bytes += self._cost(line)
        while len(self._lines) > self.max_lines or (self._bytes > self.max_bytes and len(self._lines) > 1):
            self._bytes -= self._cost(self._lines.popleft())

    def recent(self, n: int) -> list[LogLine]:
        """The last `n` lines kept (fewer when fewer are kept), oldest first."""
        if n <= 0:
            return []
        n = min(n, len(self._lines))
        return [self._lines[i] for i in range(len(self._lines) - n, len(self._lines))]


class LogHub:
    """All services' recent lines, and the clients following them."""

    def __init__(self, max_lines: int = HUB_LINES, max_bytes: int = HUB_BYTES) -> None:
        self.lines = Ring(max_lines, max_bytes)
        self._followers: dict[trio.MemorySendChannel[LogLine], str | None] = {}
        self._queues: dict[Any, str | None] = {}  # followers' own queues (with a `put`)

    def add(self, line: LogLine) -> None:
        self.lines.append(line)
        for queue, service in self._queues.items():
            if service is None or service == line.service:
                queue.put(line)
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
        return self.lines.recent(n)

    @contextmanager
    def follow_into(self, service: str | None, queue: Any) -> Iterator[Any]:
        """Put every new line (of `service`, or of all) into `queue` (a Backlog),
        at once: nothing is in flight between the hub and the follower."""
        self._queues[queue] = service
        try:
            yield queue
        finally:
            self._queues.pop(queue, None)

    @contextmanager
    def follow(self, service: str | None, buffer: int = 1000) -> Iterator[trio.MemoryReceiveChannel[LogLine]]:
        send, recv = trio.open_memory_channel[LogLine](buffer)
        self._followers[send] = service
        try:
            yield recv
        finally:
            self._followers.pop(send, None)
            send.close()


class ServiceOutput:
    """One service's output: its pipes, its log file, its recent lines."""

    def __init__(self, service: str, path: Path, hub: LogHub, ring: int = RING_LINES, *,
                 max_size: int = 2 * 1024 * 1024, max_backups: int = 3) -> None:
        self.service = service
        self.path = path
        self.file = LogFile(path, max_size=max_size, max_backups=max_backups, on_error=self._report)
        self.hub = hub
        self.ring = Ring(ring, RING_BYTES)
        self._pipes: dict[str, tuple[int, int]] = {}
        self._seed_pending = False  # read the ring back from the file first (see reload_history)
        self._resting = False  # the service is stopped: the file is closed after each write
        #: told of every pipe made or closed (the keeper: see _keeper_link)
        self.on_pipe: Callable[[ServiceOutput, str, tuple[int, int] | None], None] | None = None

    @property
    def max_size(self) -> int:
        return self.file.max_size

    @max_size.setter
    def max_size(self, value: int) -> None:
        self.file.max_size = value

    @property
    def max_backups(self) -> int:
        return self.file.max_backups

    @max_backups.setter
    def max_backups(self, value: int) -> None:
        self.file.max_backups = value

    # -- pipes ---------------------------------------------------------------------

    def writers(self, nursery: trio.Nursery) -> tuple[int, int]:
        """Write ends for a child's stdout and stderr (pipes made on first use)."""
        self._resting = False
        for stream in ("stdout", "stderr"):
            if stream not in self._pipes:
                r, w = os.pipe2(os.O_CLOEXEC)
                self._pipes[stream] = (r, w)
                if self.on_pipe is not None:
                    self.on_pipe(self, stream, (r, w))
                nursery.start_soon(self._pump, stream, r)
        return self._pipes["stdout"][1], self._pipes["stderr"][1]

    @property
    def pipes(self) -> dict[str, tuple[int, int]]:
        """stream → (read end, write end), for the pipes made so far."""
        return dict(self._pipes)

    def resume(self, nursery: trio.Nursery) -> None:
        """Start reading pipes taken over (re-exec, or from the keeper after a crash)."""
        for stream, (r, _w) in self._pipes.items():
            nursery.start_soon(self._pump, stream, r)

    def handover(self) -> dict[str, object]:
        """The pipes and the bytes read but not yet written, for the next image (re-exec)."""
        return {
            "pipes": {stream: [r, w] for stream, (r, w) in self._pipes.items()},
            "partial": {stream: held.hex() for stream in self._pipes if (held := self.file.held(stream))},
        }

    def take_over(self, data: dict[str, object]) -> None:
        """Pipes (and held bytes) from a previous image or the keeper, before `resume`."""
        pipes = data.get("pipes") or {}
        partial = data.get("partial") or {}
        assert isinstance(pipes, dict) and isinstance(partial, dict)
        for stream, (r, w) in pipes.items():
            os.set_inheritable(r, False)
            os.set_inheritable(w, False)
            self._pipes[stream] = (r, w)
        for stream, hexed in partial.items():
            self.file.hold(stream, bytes.fromhex(hexed))

    async def _pump(self, stream: str, fd: int) -> None:
        async with trio.lowlevel.FdStream(fd) as pipe:
            while True:
                try:
                    data = await pipe.receive_some(65536)
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    break
                if not data:
                    break
                # written at once (an unfinished line too): a crash of ours
                # loses at most what this call has in hand
                for when, text in self.file.feed(stream, data):
                    self._keep(when, stream, text)
                if self._resting:  # a stopped service's last words (or a left-over process's)
                    self.file.close()
        for when, text in self.file.feed(stream, b"", final=True):
            self._keep(when, stream, text)
        if self._resting:
            self.file.close()

    def rest(self) -> None:
        """The service stopped: close its log file (reopened for each later line,
        then closed again) until it runs again."""
        self._resting = True
        self.file.close()

    def close(self) -> None:
        for stream, (r, w) in self._pipes.items():
            os.close(w)
            if self.on_pipe is not None:
                self.on_pipe(self, stream, None)
        self._pipes.clear()
        self.file.close()

    # -- lines ---------------------------------------------------------------------

    def note(self, text: str) -> None:
        """A line from the supervisor about this service (start, exit, …)."""
        now = datetime.now().astimezone()
        self.file.line("supervisor", text, now)
        if self._resting:
            self.file.close()
        self._keep(now, "supervisor", text)

    def _keep(self, now: datetime, stream: str, text: str) -> None:
        line = LogLine(now.timestamp(), self.service, stream, text)
        self.ring.append(line)
        self.hub.add(line)

    def recent(self, n: int) -> list[LogLine]:
        if self._seed_pending:
            self._seed()
        return self.ring.recent(n)

    def reload_history(self) -> None:
        """After a re-exec or a crash of ours: `recent` first reads back the
        lines the log file already holds (lazily, when first asked)."""
        self._seed_pending = True

    def _seed(self) -> None:
        self._seed_pending = False
        try:
            data = _fs.read_tail(self.path, RING_BYTES)
        except OSError:
            return
        lines = data.split(b"\n")
        if len(data) == RING_BYTES:
            lines = lines[1:]  # the first one is cut
        if not data.endswith(b"\n"):
            lines = lines[:-1]  # unfinished: it comes whole when it ends
        ring = Ring(self.ring.max_lines, self.ring.max_bytes)
        newer = self.ring.recent(self.ring.max_lines)
        first_new = newer[0].time if newer else math.inf
        for raw in lines:
            line = _parse_log_line(self.service, raw)
            if line is not None and line.time < first_new:
                ring.append(line)
        for line in newer:
            ring.append(line)
        self.ring = ring

    def _report(self, exc: OSError) -> None:
        # Reported once per failure streak (see LogFile); the service keeps running regardless.
        why = exc.strerror or str(exc)
        if exc.filename is not None and os.fspath(exc.filename) != str(self.path):
            why = f"{os.fspath(exc.filename)}: {why}"
        log.warning("log file not writable; output kept in memory only", service=self.service,
                    path=str(self.path), error=why)
        self._keep(datetime.now().astimezone(), "supervisor",
                   f"Cannot write the log file {self.path}: {why}. Output is kept in memory only "
                   f"(herd log {self.service}).")


def _parse_log_line(service: str, raw: bytes) -> LogLine | None:
    """A line of a log file (``TIME STREAM TEXT``) back as a LogLine."""
    parsed = parse_line(raw)
    if parsed is None:
        return None
    when, stream, text = parsed
    return LogLine(when.timestamp(), service, stream, text)
