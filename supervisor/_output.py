"""Service output: pipes → timestamped lines → log file, ring buffer, followers.

Each service has one pipe for stdout and one for stderr, created once and
kept across restarts, so nothing a service writes between two runs is lost,
a re-exec hands the read ends over, and the keeper (docs/keeper.md) holds
duplicates that a supervisor started after a crash takes back.  Only the
read ends are kept (by us, by the keeper, and by the service: its guards):
each spawn gets new write ends of the same pipes (`writers`), which the
daemon closes once the child has them.  So a pipe reaches its end when the
service and everything it left running are gone: its reader writes out the
last, unfinished line and stops, until the next spawn starts it again.  The
file format, line cutting (`MAX_LINE`) and rotation are `_logfile`'s; what
is read is written to the file at once, an unfinished line too.  At most
`_logfile.MAX_OPEN` log files are open at once.

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

from . import _fs, _guard
from ._logfile import MAX_LINE, MAX_OPEN, LogFile, OpenFiles, parse_line
from ._proc import SpawnError

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
#: The streams with a pipe, in the order `ServiceOutput.writers` gives them.
STREAMS: Final = ("stdout", "stderr")
#: How much is read from a pipe at a time.
READ_SIZE: Final = 65536
#: The log files open at once (`MAX_OPEN`): the least recently written one
#: is closed (and opened again when next written).
_OPEN_LOGS = OpenFiles(MAX_OPEN)

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
        self._pipes: dict[str, int] = {}  # stream → read end
        self._pumps: set[str] = set()  # the streams being read
        self._seed_pending = False  # read the ring back from the file first (see reload_history)
        self._resting = False  # the service is stopped: the file is closed after each write
        #: told of every pipe made (its read end) or closed (None) (the keeper: see _keeper_link)
        self.on_pipe: Callable[[ServiceOutput, str, int | None], None] | None = None

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

    @contextmanager
    def writers(self, nursery: trio.Nursery) -> Iterator[tuple[int, int]]:
        """Write ends for a child's stdout and stderr, closed on leaving: pass
        them to the child in the block.  The pipes are made on first use and
        kept (their read ends only); each call opens new write ends of the
        same pipes, and starts reading them again if every earlier writer is
        gone.

        Raises:
            _proc.SpawnError: a pipe cannot be made or opened (out of descriptors).
        """
        self._resting = False
        ends: list[int] = []
        try:
            for stream in STREAMS:
                ends.append(self._writer(stream))
                self._read(nursery, stream)
            yield ends[0], ends[1]
        finally:
            for fd in ends:
                os.close(fd)

    def _writer(self, stream: str) -> int:
        """A new write end of `stream`'s pipe (made now if there is none).

        Raises:
            _proc.SpawnError: it cannot be made or opened.
        """
        try:
            r = self._pipes.get(stream)
            if r is not None:
                return _guard.reopen(r, os.O_WRONLY)
            r, w = os.pipe2(os.O_CLOEXEC)
        except OSError as exc:
            raise SpawnError(f"cannot open the {stream} pipe of {self.service}: {exc.strerror or exc}") from None
        os.set_blocking(r, False)  # the write end, the child's, stays blocking
        self._pipes[stream] = r
        if self.on_pipe is not None:
            self.on_pipe(self, stream, r)
        return w

    @property
    def pipes(self) -> dict[str, int]:
        """stream → read end, for the pipes made so far."""
        return dict(self._pipes)

    @property
    def reading(self) -> bool:
        """A pipe still has a writer (or unread data): its reader runs."""
        return bool(self._pumps)

    def resume(self, nursery: trio.Nursery) -> None:
        """Start reading pipes taken over (re-exec, or from the keeper after a crash)."""
        for stream in self._pipes:
            self._read(nursery, stream)

    def handover(self) -> dict[str, object]:
        """The pipes' read ends and the bytes read but not yet written, for the next image (re-exec)."""
        return {
            "pipes": {stream: [r] for stream, r in self._pipes.items()},
            "partial": {stream: held.hex() for stream in self._pipes if (held := self.file.held(stream))},
        }

    def take_over(self, data: dict[str, object]) -> None:
        """Pipes (and held bytes) from a previous image, the keeper or the
        service itself, before `resume`: stream → [read end, …] (a write end
        after it, as an image before this one kept, is closed)."""
        pipes = data.get("pipes") or {}
        partial = data.get("partial") or {}
        assert isinstance(pipes, dict) and isinstance(partial, dict)
        for stream, (r, *older) in pipes.items():
            for fd in older:
                os.close(fd)
            os.set_inheritable(r, False)
            os.set_blocking(r, False)
            self._pipes[stream] = r
        for stream, hexed in partial.items():
            self.file.hold(stream, bytes.fromhex(hexed))

    def _read(self, nursery: trio.Nursery, stream: str) -> None:
        """Read `stream`'s pipe, unless it is read already (one reader per pipe)."""
        if stream in self._pipes and stream not in self._pumps:
            self._pumps.add(stream)
            nursery.start_soon(self._pump, stream, self._pipes[stream])

    async def _pump(self, stream: str, fd: int) -> None:
        """Read the pipe until every writer is gone (the service and whatever
        it left running): then write out the last, unfinished line and stop;
        the next spawn starts reading again.  The read end stays ours (`close`)."""
        try:
            while True:
                if self._pipes.get(stream) != fd:  # closed meanwhile (`close`)
                    return
                try:
                    data = os.read(fd, READ_SIZE)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(fd)
                    continue
                except OSError as exc:  # not expected of a pipe's read end
                    log.error("cannot read a pipe", service=self.service, stream=stream, error=str(exc))
                    break
                if not data:  # every writer is gone
                    break
                # written at once (an unfinished line too): a crash of ours
                # loses at most what this call has in hand
                self._feed(stream, data)
            if self.file.unfinished(stream):
                self._feed(stream, b"", final=True)
        except trio.ClosedResourceError:  # closed under us (`close`)
            pass
        finally:
            self._pumps.discard(stream)

    def _feed(self, stream: str, data: bytes, *, final: bool = False) -> None:
        for when, text in self.file.feed(stream, data, final=final):
            self._keep(when, stream, text)
        self._written()

    def _written(self) -> None:
        if self._resting:  # a stopped service's last words (or a left-over process's)
            self.file.close()
        _OPEN_LOGS.used(self.file)

    def rest(self) -> None:
        """The service stopped: close its log file (reopened for each later line,
        then closed again) until it runs again."""
        self._resting = True
        self.file.close()

    def close(self) -> None:
        """The service is gone: close its pipes (their readers stop) and its log file."""
        for stream, r in self._pipes.items():
            try:
                trio.lowlevel.notify_closing(r)
            except RuntimeError:  # outside trio
                pass
            os.close(r)
            if self.on_pipe is not None:
                self.on_pipe(self, stream, None)
        self._pipes.clear()
        self.file.close()
        _OPEN_LOGS.used(self.file)

    # -- lines ---------------------------------------------------------------------

    def note(self, text: str) -> None:
        """A line from the supervisor about this service (start, exit, …)."""
        now = datetime.now().astimezone()
        self.file.line("supervisor", text, now)
        self._written()
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
