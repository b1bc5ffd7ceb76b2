"""A service's log file: the line format, a streaming writer, rotation.

Standard library only (and `_fs`): the keeper (`_keeper`) writes the same
files with the same code while the supervisor is down.

Each line is ``TIME STREAM TEXT`` (TIME in ISO 8601 with microseconds and
the UTC offset, taken when the line's first byte was read).  Lines longer
than `MAX_LINE` bytes are cut at a UTF-8 character boundary; bytes that are
not UTF-8 are replaced; a CR before the newline is dropped.

What is read from a pipe is written at once, before anything else is done
with it, *including an unfinished line*: the file then ends without a
newline, and the next piece of the same stream continues that line (without
a new prefix).  So an unfinished line is never held only in a process's
memory, and whoever writes next — the same supervisor, the keeper after a
crash, the next supervisor, a re-executed one — finds it in the file and
completes it instead of repeating it (`LogFile` reads the file's last line
when it opens the file).  Only an incomplete UTF-8 character or a CR that may
precede a newline (at most 4 bytes) waits for the next read.  A line of the
*other* stream (or a supervisor note) in between ends the open line first;
the rest of the interrupted line then becomes a line of its own.

The file is opened, rotated and reopened through `_fs`, so a service user
who owns the log directory cannot redirect these writes with a symlink.
Rotation (``NAME.log`` → ``NAME.log.1`` → …) ends an open line in the old
file first, so every file holds whole lines.
"""

from __future__ import annotations

import codecs
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Final

from . import _fs

__all__ = ["LogFile", "OpenFiles", "MAX_LINE", "MAX_OPEN", "STREAMS", "parse_line", "char_boundary"]

#: The longest line kept whole (bytes); a longer one becomes several lines.
MAX_LINE: Final = 64 * 1024
#: The streams a log line can name.
STREAMS: Final = ("stdout", "stderr", "supervisor")
#: The log files a process keeps open at once (`OpenFiles`), however many services.
MAX_OPEN: Final = 128
#: After a log file could not be opened, the seconds before the next try.
REOPEN_DELAY: Final = 1.0
#: What a log file keeps, at most, of the lines it could not write yet (bytes;
#: the oldest whole lines go first): written once the file can be opened.
BACKLOG: Final = 1024 * 1024
#: How much of the file's end is read back to find an unfinished last line.
_TAIL: Final = MAX_LINE + 256


def stamp(when: datetime) -> str:
    return when.isoformat(timespec="microseconds")


def parse_line(raw: bytes) -> tuple[datetime, str, str] | None:
    """A log file line (``TIME STREAM TEXT``, no newline) as its parts, or None."""
    parts = raw.decode("utf-8", errors="replace").split(" ", 2)
    if len(parts) < 2 or parts[1] not in STREAMS:
        return None
    try:
        when = datetime.fromisoformat(parts[0])
    except ValueError:
        return None
    return when, parts[1], parts[2] if len(parts) > 2 else ""


def char_boundary(buf: bytes | bytearray, limit: int) -> int:
    """Where to cut `buf` (longer than `limit`) at most `limit` bytes in, so
    that no UTF-8 character is split (`limit` itself when it is not UTF-8)."""
    for cut in range(limit, max(limit - 4, -1), -1):
        if buf[cut] & 0xC0 != 0x80:  # not a continuation byte: a character begins here
            return cut
    return limit


class _Stream:
    """One stream's unfinished line: undecoded bytes, its length, its text."""

    __slots__ = ("decoder", "cr", "length", "text", "since")

    def __init__(self) -> None:
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.cr = False  # a CR held back: a newline may follow
        self.length = 0  # bytes of the unfinished line so far
        self.text: list[str] = []  # its text, for whole lines in memory
        self.since: datetime | None = None  # when its first byte was read

    def pristine(self) -> bool:
        return self.length == 0 and not self.text and not self.cr and not self.held()

    def held(self) -> bytes:
        """Bytes read but not written yet (a partial character, a CR)."""
        return self.decoder.getstate()[0] + (b"\r" if self.cr else b"")

    def pieces(self, data: bytes, final: bool = False) -> list[tuple[str, bool]]:
        """`data` as pieces of lines: (text, ends a line)."""
        text = self.decoder.decode(data, final)
        if self.cr:
            text, self.cr = "\r" + text, False
        if text.endswith("\r") and not final:
            text, self.cr = text[:-1], True
        parts = text.split("\n")
        out: list[tuple[str, bool]] = []
        for i, part in enumerate(parts):
            ends = i < len(parts) - 1
            if ends and part.endswith("\r"):
                part = part[:-1]
            raw = part.encode()
            while self.length + len(raw) > MAX_LINE:
                cut = char_boundary(raw, MAX_LINE - self.length)
                out.append((raw[:cut].decode(), True))
                raw, self.length = raw[cut:], 0
            if ends:
                out.append((raw.decode(), True))
                self.length = 0
            elif raw:
                out.append((raw.decode(), False))
                self.length += len(raw)
        if final and self.length:
            out.append(("", True))
            self.length = 0
        return out


class LogFile:
    """One service's log file, written as a stream of pieces (see the module).

    `feed` and `line` never raise: a file that cannot be written is reported
    through `on_error` (once per failure streak) and tried again after
    `REOPEN_DELAY`.  What could not be opened meanwhile (a log directory not
    there yet, early in boot) is kept, up to `BACKLOG` bytes, and written
    first when the file opens.
    """

    def __init__(self, path: Path, *, max_size: int = 2 * 1024 * 1024, max_backups: int = 3,
                 on_error: Callable[[OSError], None] | None = None, collect: bool = True) -> None:
        self.path = path
        self.max_size = max_size
        self.max_backups = max_backups
        self.on_error = on_error
        self.collect = collect  # assemble whole lines (for the rings in memory)
        self._fd = -1
        self._size = 0
        self._open_stream: str | None = None  # whose line the file ends with, unfinished ("": unknown)
        self._streams: dict[str, _Stream] = {}
        self._failed = False
        self._retry_at = 0.0  # after a failed open, the next try (monotonic clock)
        self._backlog = bytearray()  # lines formatted while the file could not be opened
        self._back_stream: str | None = None  # whose line the backlog ends with, unfinished
        self._left: tuple[int, int, str | None] | None = None  # closed by `close`: (inode, size, open stream)

    # -- input ---------------------------------------------------------------------

    def feed(self, stream: str, data: bytes, now: datetime | None = None, *,
             final: bool = False) -> list[tuple[datetime, str]]:
        """Write what a pipe gave (`final`: it is closed); return the lines
        it completed, each with the time its first byte was read."""
        now = now or datetime.now().astimezone()
        st = self._streams.get(stream)
        if st is None:
            st = self._streams[stream] = _Stream()
        self._ready()  # first: an unfinished line left in the file is continued
        pieces = st.pieces(data, final)
        self._put(stream, pieces, now)
        if not self.collect:
            return []
        done: list[tuple[datetime, str]] = []
        for text, ends in pieces:
            if st.since is None:
                st.since = now
            st.text.append(text)
            if ends:
                done.append((st.since, "".join(st.text)))
                st.text, st.since = [], None
        return done

    def line(self, stream: str, text: str, now: datetime) -> None:
        """Write one whole line (a supervisor note)."""
        self._ready()
        self._put(stream, [(text, True)], now)

    def unfinished(self, stream: str) -> bool:
        """`stream` has an unfinished line (or bytes held back): a final
        `feed` would end it."""
        st = self._streams.get(stream)
        return st is not None and not st.pristine()

    def held(self, stream: str) -> bytes:
        st = self._streams.get(stream)
        return st.held() if st is not None else b""

    def hold(self, stream: str, data: bytes) -> None:
        """Bytes a previous image read but had not written (re-exec): fed first."""
        if data:
            st = self._streams.setdefault(stream, _Stream())
            st.decoder.decode(data.rstrip(b"\r"))
            st.cr = data.endswith(b"\r")

    @property
    def is_open(self) -> bool:
        return self._fd >= 0

    def close(self) -> None:
        """Close the file (opened again by the next write, which goes on
        with an unfinished line of ours if nobody wrote meanwhile)."""
        if self._fd >= 0:
            try:
                self._left = (os.fstat(self._fd).st_ino, self._size, self._open_stream)
            except OSError:
                self._left = None
            os.close(self._fd)
            self._fd = -1

    # -- the file ------------------------------------------------------------------

    def _ready(self) -> bool:
        if self._fd >= 0:
            return True
        if time.monotonic() < self._retry_at:
            return False
        if not self._in_dir(self._open_in):
            return False
        if self._backlog:
            self._write_backlog()
        return True

    def _keep_back(self, stream: str, pieces: list[tuple[str, bool]], now: datetime) -> None:
        """While the file cannot be opened: keep the lines (see `BACKLOG`)."""
        prefix = f"{stamp(now)} {stream} ".encode()
        buf = self._backlog
        for text, ends in pieces:
            if self._back_stream != stream:
                buf += (b"\n" if self._back_stream is not None else b"") + prefix
            buf += text.encode()
            if ends:
                buf += b"\n"
            self._back_stream = None if ends else stream
        if len(buf) > BACKLOG:
            cut = buf.find(b"\n", len(buf) - BACKLOG)
            del buf[:cut + 1 if cut >= 0 else len(buf)]
            if cut < 0:
                self._back_stream = None

    def _write_backlog(self) -> None:
        data = (b"\n" if self._open_stream is not None else b"") + self._backlog
        if self._write(data):
            self._open_stream = self._back_stream
            self._backlog.clear()
            self._back_stream = None

    def _in_dir(self, action: Callable[[int], None]) -> bool:
        """Run `action` on the log directory's descriptor (resolved safely)."""
        try:
            with _fs.opened_dir(self.path.parent, create=True) as dfd:
                action(dfd)
            return True
        except OSError as exc:
            self._fail(exc)
            return False

    def _open_in(self, dfd: int) -> None:
        self._fd = _fs.open_append(dfd, self.path.name, self.path, read=True)
        st = os.fstat(self._fd)
        self._size = st.st_size
        left, self._left = self._left, None
        if left is not None and left[:2] == (st.st_ino, st.st_size):  # as we left it
            self._open_stream = left[2]
            return
        self._open_stream = None
        if self._size:
            self._adopt(os.pread(self._fd, min(self._size, _TAIL), max(0, self._size - _TAIL)))

    def _adopt(self, tail: bytes) -> None:
        """The file ends with an unfinished line: continue it if it is one of
        ours that this process has no newer piece of; else end it first."""
        if tail.endswith(b"\n"):
            return
        self._open_stream = ""  # unknown: whatever comes next ends it first
        i = tail.rfind(b"\n")
        if i < 0 and len(tail) < self._size:
            return
        parsed = parse_line(tail[i + 1:])
        if parsed is None or parsed[1] == "supervisor":
            return
        when, stream, text = parsed
        st = self._streams.setdefault(stream, _Stream())
        if not st.pristine():
            return
        self._open_stream = stream
        fields = tail[i + 1:].split(b" ", 2)
        st.length = len(fields[2]) if len(fields) > 2 else 0
        if self.collect:
            st.text, st.since = [text], when

    def _put(self, stream: str, pieces: list[tuple[str, bool]], now: datetime) -> None:
        if not pieces:
            return
        if self._fd < 0:
            self._open_stream = None  # not known until the file is read again
            self._keep_back(stream, pieces, now)
            return
        prefix = f"{stamp(now)} {stream} ".encode()
        buf = bytearray()
        for text, ends in pieces:
            raw = text.encode()
            if (self.max_size and self._size + len(buf)
                    and self._size + len(buf) + len(prefix) + len(raw) + 2 > self.max_size):
                if self._open_stream is not None:
                    buf += b"\n"  # every file holds whole lines
                    self._open_stream = None
                if not self._write(buf) or not self._rotate():
                    return
                buf.clear()
            if self._open_stream != stream:
                if self._open_stream is not None:
                    buf += b"\n"
                buf += prefix
            buf += raw
            if ends:
                buf += b"\n"
            self._open_stream = None if ends else stream
        self._write(buf)

    def _write(self, data: bytes | bytearray) -> bool:
        try:
            view = memoryview(data)
            while view:  # a short write (signal, nearly full disk)
                n = os.write(self._fd, view)
                self._size += n
                view = view[n:]
            self._failed = False
            return True
        except OSError as exc:
            os.close(self._fd)
            self._fd = -1
            self._fail(exc)
            return False

    def _rotate(self) -> bool:
        """NAME.log → NAME.log.1 → … → NAME.log.N (the oldest is dropped).

        Renames and the new file's creation happen relative to the one
        directory descriptor: a symlink planted meanwhile is moved, never
        followed."""
        self.close()
        self._size, self._left = 0, None
        return self._in_dir(self._rotate_in)

    def _rotate_in(self, dfd: int) -> None:
        name = self.path.name
        try:
            if self.max_backups == 0:
                os.unlink(name, dir_fd=dfd)
            else:
                for i in range(self.max_backups - 1, 0, -1):
                    try:
                        os.replace(f"{name}.{i}", f"{name}.{i + 1}", src_dir_fd=dfd, dst_dir_fd=dfd)
                    except FileNotFoundError:
                        pass
                os.replace(name, f"{name}.1", src_dir_fd=dfd, dst_dir_fd=dfd)
        except FileNotFoundError:  # removed meanwhile: just begin a new one
            pass
        self._open_in(dfd)

    def _fail(self, exc: OSError) -> None:
        self._retry_at = time.monotonic() + REOPEN_DELAY
        if not self._failed:
            self._failed = True
            if self.on_error is not None:
                self.on_error(exc)


class OpenFiles:
    """At most `limit` log files open at once: when one more is written, the
    least recently written one is closed (and opened again when next written)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: OrderedDict[LogFile, None] = OrderedDict()

    def used(self, f: LogFile) -> None:
        """`f` was just written (or closed)."""
        if not f.is_open:
            self._open.pop(f, None)
            return
        self._open[f] = None
        self._open.move_to_end(f)
        while len(self._open) > self.limit:
            self._open.popitem(last=False)[0].close()

    def close_all(self) -> None:
        while self._open:
            self._open.popitem(last=False)[0].close()
