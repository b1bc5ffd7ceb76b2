"""herd on a terminal: what a start or stop waits for, and what Ctrl-C leaves.

While change requests wait for their replies, a thread polls ``status`` on
a second connection once a second and keeps one line on stderr up to date:
``libvirtd: waiting for READY=1 (4 s of 30)`` (the SVC field ``waiting``,
docs/protocol.md).  Only on a terminal: the plain output never changes.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TextIO

from herd._client import Connection, HerdError, exchange

__all__ = ["Progress", "interrupted_message", "waiting_line"]

#: Seconds between polls; nothing is shown before the first one.
INTERVAL = 1.0

_GOING_ON = {"start": "starting", "stop": "stopping", "restart": "restarting",
             "enable": "enabling", "disable": "disabling"}


def waiting_line(services: Sequence[dict[str, Any]], now: float) -> str:
    """One line naming each service in transition and what it waits for."""
    parts = []
    for svc in services:
        wait = svc.get("waiting")
        if not isinstance(wait, dict):
            continue
        try:
            elapsed = max(0, int(now - float(wait.get("since") or now)))
            timeout = f" of {float(wait['timeout']):g}" if wait.get("timeout") is not None else ""
        except (TypeError, ValueError):
            elapsed, timeout = 0, ""
        parts.append(f"{svc.get('name')}: waiting for {wait.get('for')} ({elapsed} s{timeout})")
    return "; ".join(parts)


def interrupted_message(pending: Sequence[tuple[str, str | None]]) -> str:
    """What Ctrl-C leaves going on in the daemon, for the calls not answered yet."""
    if not pending:
        return "interrupted"
    what = ", ".join(f"{_GOING_ON[a]} {s}" if a in _GOING_ON else f"with {a} {s or ''}".rstrip()
                     for a, s in pending)
    undo = "; ".join(f"herd {'start' if a == 'stop' else 'stop'} {s} to cancel"
                     for a, s in pending if a in ("start", "stop", "restart") and s)
    return f"interrupted; the daemon goes on {what}" + (f" ({undo})" if undo else "")


class Progress:
    """The progress line on ``err`` (a terminal) while requests wait."""

    def __init__(self, path: str, err: TextIO, *, interval: float = INTERVAL) -> None:
        self.path = path
        self.err = err
        self.interval = interval
        self._stop = threading.Event()
        self._shown = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="herd-progress", daemon=True)

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.clear()

    def clear(self) -> None:
        with self._lock:
            self._clear()

    def _clear(self) -> None:
        if self._shown:
            self.err.write("\r\x1b[K")
            self.err.flush()
            self._shown = False

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Clear the line and keep it away while the block prints."""
        with self._lock:
            self._clear()
            yield

    def _show(self, line: str) -> None:
        try:
            width = os.get_terminal_size(self.err.fileno()).columns
        except (OSError, ValueError, AttributeError):
            width = 0
        width = width if width > 10 else 80  # (a pseudo-terminal may have no size)
        if len(line) >= width:  # a wrapped line could not be rewritten in place
            line = line[: max(width - 2, 1)] + "…"
        with self._lock:
            if self._stop.is_set():
                return
            self.err.write("\r\x1b[K" + line)
            self.err.flush()
            self._shown = bool(line)

    def _run(self) -> None:
        try:
            with Connection.open(self.path) as conn:
                n = 0
                while not self._stop.wait(self.interval):
                    n += 1
                    reply = next(exchange(conn, [{"id": n, "action": "status", "service": None, "args": []}]))
                    result = reply.get("result") if isinstance(reply.get("result"), dict) else {}
                    self._show(waiting_line(result.get("services") or [], time.time()))
        except (HerdError, OSError, StopIteration):
            return  # the progress line is a convenience: the main request reports errors
