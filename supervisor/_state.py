"""What outlives the supervisor process: per-service records and the re-exec hand-over.

* ``STATE_DIR/services/NAME.toml``: one small file per service, rewritten
  atomically (temp + rename, never through a symlink: see `_fs`) when the
  service changes.  It keeps the
  operator's intent (``herd stop``/``disable``) across a supervisor restart,
  and the main PID with its start time, so a supervisor started after a
  crash re-adopts running services and never mistakes a reused PID.
* ``STATE_DIR/reexec.json``: written just before a re-exec (see `_reexec`); the new image
  reads it (its path arrives in ``SUPERVISOR_REEXEC_STATE``) to take over the
  open descriptors (sockets, pipes, pidfds) and the runtime history.

The records are TOML, written with tomli-w and read with tomllib.  Records in a
directory that another user could write are ignored (with a warning): such a
user could make the supervisor adopt, and later signal, any process.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
import threading
from collections.abc import Callable
from typing import Any, Final

import psutil
import structlog
import tomli_w
import trio

from . import _fs, _threads, _proc

__all__ = ["REEXEC_ENV", "StateStore", "same_process", "write_atomic", "read_toml"]

REEXEC_ENV: Final = "SUPERVISOR_REEXEC_STATE"


def write_atomic(path: Path, data: dict[str, Any], mode: int = 0o600, dir_mode: int = 0o700) -> None:
    """Replace `path` with `data` as TOML (see `_fs.replace_file`; not fsynced:
    records change at every state change, and a lost one only loses an intent).

    Raises:
        OSError: the file cannot be written, or its directory could be
            redirected by another user (`_fs.UnsafePath`).
    """
    _fs.replace_file(path, tomli_w.dumps(_clean(data)).encode(), mode, sync=False, dir_mode=dir_mode)


def read_toml(path: Path) -> dict[str, Any] | None:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return None


def _clean(value: Any) -> Any:
    """TOML has no null: drop None values (recursively)."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value if v is not None]
    return value


def same_process(pid: int, start_ticks: int | None) -> bool:
    """True when `pid` is alive (not a zombie) and started at exactly `start_ticks`."""
    if not pid or not isinstance(start_ticks, int) or isinstance(start_ticks, bool):
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
    except (psutil.Error, OSError):
        return False
    return _proc.start_ticks(pid) == start_ticks


class StateStore:
    """The per-service records under ``STATE_DIR/services``.

    Written off the respawn path: `mark` only notes that a service changed;
    the `run` task writes the records of the services that changed, in a
    worker thread (changes made while a batch is written cost one write
    more, not one per change).  `flush` writes what is pending at once (before
    a re-exec, at shutdown).
    """

    #: How long changes are gathered before they are written.
    COALESCE: Final = 0.0

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "services"
        self.failed = False
        self._dirty: dict[str, Callable[[], dict[str, Any]]] = {}
        self._wake = trio.Event()
        # Records are numbered as they are built; a write never replaces a
        # newer one (the writer thread and `write_now` may overlap).
        self._seq = 0
        self._written: dict[str, int] = {}
        self._lock = threading.Lock()

    def mark(self, name: str, record: Callable[[], dict[str, Any]]) -> None:
        """`name` changed; its record (built by `record` when written) is due."""
        self._dirty[name] = record
        self._wake.set()

    def _take(self) -> list[tuple[str, int, dict[str, Any]]]:
        dirty, self._dirty = self._dirty, {}
        self._wake = trio.Event()
        return [(name, self._next(), build()) for name, build in dirty.items()]

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._wake.wait()
            if self.COALESCE:
                await trio.sleep(self.COALESCE)
            batch = self._take()
            await _threads.run_sync(self._write_all, batch)

    def write_now(self, name: str, record: dict[str, Any]) -> None:
        """Write this record now, in this thread (what crash recovery must find)."""
        self._dirty.pop(name, None)
        self._write_all([(name, self._next(), record)])

    def flush(self) -> None:
        """Write every pending record now (in this thread)."""
        self._write_all(self._take())

    def _write_all(self, batch: list[tuple[str, int, dict[str, Any]]]) -> None:
        for name, seq, record in batch:
            with self._lock:
                if self._written.get(name, 0) > seq:
                    continue  # a newer record of it is on disk already
                self._written[name] = seq
                self.save(name, record)

    def load(self) -> dict[str, dict[str, Any]]:
        records: dict[str, dict[str, Any]] = {}
        try:
            with _fs.opened_dir(self.dir) as dfd:
                why = _fs.writable_by_others(os.fstat(dfd))
            paths = sorted(self.dir.glob("*.toml"))
        except OSError as exc:
            if not isinstance(exc, FileNotFoundError):
                structlog.get_logger("supervisor.state").warning(
                    "service records not read", path=str(self.dir), error=str(exc))
            return records
        if why is not None:
            structlog.get_logger("supervisor.state").warning(
                "service records ignored: another user could have written them", path=str(self.dir), why=why)
            return records
        for path in paths:
            data = read_toml(path)
            if data and isinstance(data.get("name"), str):
                records[data["name"]] = data
        return records

    def save(self, name: str, record: dict[str, Any]) -> None:
        try:
            write_atomic(self.dir / f"{name}.toml", record)
            self.failed = False
        except OSError as exc:
            if not self.failed:  # say it once; the service runs on regardless
                self.failed = True
                structlog.get_logger("supervisor.state").warning(
                    "cannot save service state", service=name, error=str(exc))

    def forget(self, name: str) -> None:
        self._dirty.pop(name, None)
        try:
            _fs.unlink_file(self.dir / f"{name}.toml")
        except OSError:
            pass
