"""The service records on disk: a snapshot and a journal of changes.

``STATE_DIR/services/`` holds (docs/configuration.md, `state-dir`):

* ``journal``: each change of a service's record appended as one line, a
  JSON object with the record's fields (``"name"`` among them).  Changes
  gathered in one pass go in one ``write(2)`` (``O_APPEND``, never through a
  symlink: see `_fs`); no temporary file, no rename, no fsync (the page
  cache outlives a SIGKILL of the supervisor);
* ``snapshot``: every service's latest record, one line each, as of the last
  compaction: when the journal outgrows ``COMPACT_MIN`` and four times the
  snapshot, and at each `flush` (a clean shutdown, a re-exec).  The snapshot
  is replaced atomically (temp + rename), then the journal is emptied;
* ``NAME.toml``: one record per service, as versions before the journal
  wrote them; read first, folded into the snapshot and removed at the first
  compaction.

Reading takes ``NAME.toml``, then ``snapshot``, then ``journal``, in order;
a service's last record wins.  A line without its final newline (a write cut
short by a SIGKILL) is ignored, as is a line that is not a JSON object with
a string ``"name"``; ``{"name": N, "forgotten": true}`` removes N's record.
A crash between the snapshot's rename and the journal's truncation leaves
journal lines that the snapshot already holds: reading gives the same.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any, Final

from . import _fs

__all__ = ["Journal", "read_dir", "read_records", "JOURNAL", "SNAPSHOT"]

JOURNAL: Final = "journal"
SNAPSHOT: Final = "snapshot"
#: The journal is compacted once it is this big (256 KiB) and four times the snapshot.
COMPACT_MIN: Final = 1 << 18
_READ_MAX: Final = 1 << 30


def encode(record: dict[str, Any]) -> bytes:
    """One journal line (JSON, ASCII, newline-terminated; what JSON cannot
    hold, a date from a TOML record say, as a string)."""
    return json.dumps(record, separators=(",", ":"), default=str).encode() + b"\n"


def _parse_lines(data: bytes, into: dict[str, dict[str, Any]]) -> None:
    """Apply each complete, well-formed line of `data` to `into`, in order."""
    lines = data.split(b"\n")
    for line in lines[:-1]:  # the last piece has no newline: torn (or empty)
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("name"), str):
            continue
        if rec.get("forgotten") is True:
            into.pop(rec["name"], None)
        else:
            into[rec["name"]] = rec


def read_records(directory: Path, dfd: int) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Every service's latest record in `directory` (opened as `dfd`), and
    the names of the legacy ``NAME.toml`` files read.  Files that are
    symlinks or not regular are skipped.

    Raises:
        OSError: the directory cannot be listed.
    """
    records: dict[str, dict[str, Any]] = {}
    legacy = sorted(n for n in os.listdir(dfd) if n.endswith(".toml") and not n.startswith("."))
    for name in legacy:
        try:
            data = tomllib.loads(_read(dfd, name, directory).decode())
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
            continue
        if isinstance(data.get("name"), str):
            records[data["name"]] = data
    for _ in range(10):  # a compaction between the two reads: read again
        latest = dict(records)
        before = _inode(dfd, SNAPSHOT)
        for name in (SNAPSHOT, JOURNAL):
            try:
                _parse_lines(_read(dfd, name, directory), latest)
            except OSError:
                continue
        if _inode(dfd, SNAPSHOT) == before:
            break
    return latest, legacy


def _inode(dfd: int, name: str) -> int | None:
    try:
        return os.stat(name, dir_fd=dfd, follow_symlinks=False).st_ino
    except OSError:
        return None


def read_dir(directory: Path) -> dict[str, dict[str, Any]]:
    """Every service's latest record in `directory` ({} if it cannot be read):
    for tools (contrib/bench/soak.py)."""
    try:
        with _fs.opened_dir(directory) as dfd:
            return read_records(directory, dfd)[0]
    except OSError:
        return {}


def _read(dfd: int, name: str, directory: Path) -> bytes:
    fd = _fs.open_in(dfd, name, os.O_RDONLY, directory / name)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            if sum(map(len, chunks)) > _READ_MAX:
                raise OSError(f"{directory / name}: larger than {_READ_MAX} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


class Journal:
    """The writer's side: append records, compact now and then.

    `latest` holds each service's last record as its journal line: what the
    next snapshot is made of.
    """

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.latest: dict[str, bytes] = {}
        self.legacy: list[str] = []  # NAME.toml files to remove at the next compaction
        self._fd: int | None = None
        self._size = 0  # where the last complete line ends
        self._due_at = COMPACT_MIN  # the journal's size that calls for a compaction

    def take_over(self, records: dict[str, dict[str, Any]], legacy: list[str]) -> None:
        """What `read_records` found: kept in the next snapshot."""
        self.latest = {name: encode(rec) for name, rec in records.items()}
        self._due_at = max(COMPACT_MIN, 4 * sum(map(len, self.latest.values())))
        self.legacy = legacy

    def append(self, records: list[dict[str, Any]]) -> None:
        """Append these records (with their "name") in one write.

        Raises:
            OSError: the journal cannot be opened (`_fs.UnsafePath`: a
                symlink, say) or written; a partial line is cut off again.
        """
        lines = []
        for rec in records:
            line = encode(rec)
            if rec.get("forgotten") is True:
                self.latest.pop(rec["name"], None)
            else:
                self.latest[rec["name"]] = line
            lines.append(line)
        data = b"".join(lines)
        fd = self.open()
        try:
            _fs.write_all(fd, data)
        except OSError:
            self._cut(fd)
            raise
        self._size += len(data)

    def due(self) -> bool:
        return self._size > self._due_at

    def compact(self) -> None:
        """Write every latest record to the snapshot, then empty the journal.

        Raises:
            OSError: the snapshot cannot be written (the journal stays).
        """
        data = b"".join(self.latest.values())
        self._due_at = 2 * self._size  # should it fail: not again at each write
        with _fs.opened_dir(self.dir, create=True, mode=0o700) as dfd:
            _fs.replace_in(dfd, SNAPSHOT, data, 0o600, self.dir / SNAPSHOT)
            for name in self.legacy:  # the snapshot holds them now
                try:
                    os.unlink(name, dir_fd=dfd)
                except FileNotFoundError:
                    pass
            self.legacy = []
            try:  # (a journal that cannot be opened holds nothing the snapshot lacks)
                os.ftruncate(self.open(), 0)
                self._size = 0
            except OSError:
                pass
        self._due_at = max(COMPACT_MIN, 4 * len(data))

    def open(self) -> int:
        """The journal, opened for appending (once).

        Raises:
            OSError: it cannot be opened (`_fs.UnsafePath`: a symlink, say).
        """
        if self._fd is None:
            with _fs.opened_dir(self.dir, create=True, mode=0o700) as dfd:
                fd = _fs.open_append(dfd, JOURNAL, self.dir / JOURNAL, 0o600, read=True)
            os.fchmod(fd, 0o600)
            self._size = _complete_end(fd)
            self._cut(fd)
            self._fd = fd
        return self._fd

    def _cut(self, fd: int) -> None:
        """Drop whatever follows the last complete line (a torn write)."""
        try:
            if os.fstat(fd).st_size != self._size:
                os.ftruncate(fd, self._size)
        except OSError:
            pass


def _complete_end(fd: int) -> int:
    """Where the last complete line of the file ends (0: none)."""
    end = os.fstat(fd).st_size
    while end > 0:
        start = max(0, end - 65536)
        chunk = os.pread(fd, end - start, start)
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        end = start
    return 0
