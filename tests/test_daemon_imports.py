"""What the running daemon never imports (issue 19: its memory).

structlog imports `asyncio`, trio imports `ssl` and `idna`; the daemon uses
none of them, and psutil only in a crash recovery's checks.  The daemon
defers them (supervisor/_lazy.py): together about 3 MiB of its image.  The
daemon runs here with ``PYTHONPROFILEIMPORTTIME=1``, so the interpreter
itself writes every module it imports, at start and at any time later, to
the daemon's stderr; the test drives starts, a respawn, the reads and a
re-exec (whose new image logs its imports too), then reads that list.
"""

from __future__ import annotations

import os
import signal

import pytest

from helpers import Supervisor, daemon_events, sleeper, wait_until

#: Never imported by a running daemon, nor by the image a re-exec starts.
NEVER = ("asyncio", "ssl", "_ssl", "_asyncio", "idna", "psutil")


def _imported(sup: Supervisor) -> list[str]:
    """Every module the daemon imported so far (the interpreter's own list)."""
    out = []
    for line in sup.stderr_path.read_text(errors="replace").splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            out.append(line.rsplit("|", 1)[1].strip())
    return out


def test_the_daemon_never_imports_what_it_does_not_use(sup: Supervisor, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    sup.start({"services": {"a": sleeper(sup.marker("a")),
                            "b": sleeper(sup.marker("b"), **{"respawn-delay": 0})}})
    wait_until(lambda: all(sup.status(n)["state"] == "running" for n in "ab"), 15, "a and b running")
    assert "trio" in _imported(sup), "no import list on the daemon's stderr"

    pid = sup.status("b")["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: sup.status("b").get("pid") not in (None, pid) and sup.status("b")["state"] == "running",
               15, "b respawned")
    sup.herd("detailed-status", check=True)
    sup.herd("log", "a", check=True)
    sup.herd("restart", "a", check=True)
    sup.herd("reexec", "root", check=True)
    wait_until(lambda: any(ev.get("event") == "resumed after re-exec" for ev in daemon_events(sup)),
               30, "the re-exec to resume")
    sup.herd("status", check=True)

    imported = _imported(sup)
    assert imported.count("trio") == 2, "the re-exec's new image logged no imports"
    assert not [m for m in imported if m in NEVER], sorted(set(imported) & set(NEVER))
