"""What outlives the supervisor process: the service records and the re-exec hand-over.

* ``STATE_DIR/services/``: each service's record, a journal of changes and
  a snapshot (`_journal`).  It keeps the operator's intent
  (``herd stop``/``disable``) across a supervisor restart, and the main PID
  with its start time, so a supervisor started after a crash re-adopts
  running services and never mistakes a reused PID.
* ``STATE_DIR/reexec.json``: written just before a re-exec (see `_reexec`);
  the new image reads it (its path arrives in ``SUPERVISOR_REEXEC_STATE``)
  to take over the open descriptors (sockets, pipes, pidfds), each
  service's record and the runtime history.  (An older image's
  ``reexec.toml`` is still read.)

Records in a directory that another user could write are ignored (with a
warning): such a user could make the supervisor adopt, and later signal, any
process.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from collections.abc import Callable
from typing import Any, Final

import psutil
import structlog
import tomli_w
import trio

from . import _fs, _journal, _proc

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
    """The service records under ``STATE_DIR/services`` (see `_journal`).

    Written off the respawn path: `mark` only notes that a service changed;
    the `run` task appends the records of the services that changed, all in
    one write (changes made meanwhile cost one line more, not one write per
    change).  `write_now` appends one at once (a new main process: crash
    recovery adopts by it); `flush` writes what is pending and compacts
    (before a re-exec, at shutdown).  Every write happens in the event
    loop's thread: an append to the page cache is cheaper than a hand-over
    to a worker thread, and the journal's order is the order of the changes.
    """

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "services"
        self.failed = False
        self._dirty: dict[str, Callable[[], dict[str, Any]]] = {}
        self._wake = trio.Event()
        self._journal = _journal.Journal(self.dir)

    def mark(self, name: str, record: Callable[[], dict[str, Any]]) -> None:
        """`name` changed; its record (built by `record` when written) is due."""
        self._dirty[name] = record
        self._wake.set()

    def _take(self) -> list[dict[str, Any]]:
        dirty, self._dirty = self._dirty, {}
        self._wake = trio.Event()
        return [build() for build in dirty.values()]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._wake.wait()
            self._write(self._take(), compact=False)

    def write_now(self, name: str, record: dict[str, Any]) -> None:
        """Write this record now (what crash recovery must find)."""
        self._dirty.pop(name, None)
        self._write([record], compact=False)

    def flush(self) -> None:
        """Write every pending record now, and compact the journal."""
        self._write(self._take(), compact=True)

    def _write(self, records: list[dict[str, Any]], *, compact: bool) -> None:
        try:
            if records:
                self._journal.append(records)
            if compact or self._journal.due():
                self._journal.compact()
            self.failed = False
        except OSError as exc:
            self._failed(exc)

    def _failed(self, exc: OSError) -> None:
        if not self.failed:  # say it once; the services run on regardless
            self.failed = True
            structlog.get_logger("supervisor.state").warning(
                "cannot save service state", path=str(self.dir), error=str(exc))

    def load(self) -> dict[str, dict[str, Any]]:
        """Every service's record, as the last supervisor left them (none when
        another user could have written them: logged); then the journal is
        opened (a torn last line cut off), to be appended to."""
        records = self._read()
        try:
            self._journal.open()
        except OSError as exc:
            self._failed(exc)
        return records

    def _read(self) -> dict[str, dict[str, Any]]:
        log = structlog.get_logger("supervisor.state")
        try:
            with _fs.opened_dir(self.dir) as dfd:
                why = _fs.writable_by_others(os.fstat(dfd))
                if why is not None:
                    log.warning("service records ignored: another user could have written them",
                                path=str(self.dir), why=why)
                    return {}
                records, legacy = _journal.read_records(self.dir, dfd)
        except OSError as exc:
            if not isinstance(exc, FileNotFoundError):
                log.warning("service records not read", path=str(self.dir), error=str(exc))
            return {}
        self._journal.take_over(records, legacy)
        return records

    def forget(self, name: str) -> None:
        self._dirty.pop(name, None)
        self._write([{"name": name, "forgotten": True}], compact=False)
