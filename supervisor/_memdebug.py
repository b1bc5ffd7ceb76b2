"""A debug aid, off by default: where the daemon's memory is.

With ``SUPERVISOR_MEMDEBUG=DIR`` in its environment the daemon starts
`tracemalloc` (``SUPERVISOR_MEMDEBUG_FRAMES``, default 1, frames per
allocation) and writes a report into DIR at each re-exec (the image that
goes), once a re-exec'd image has taken the hand-over, and at shutdown:
the Python objects alive, by line, and their peak; glibc's heap
(`mallinfo2`: in use, free but kept); the process's mappings by kind
(``/proc/self/smaps``: heap, anonymous, files); pymalloc's arenas
(`sys._debugmallocstats`).  The environment is inherited across a re-exec,
so every image reports.  Tracing slows the daemon and costs memory: never
in production (docs/configuration.md, "Memory").
"""

from __future__ import annotations

import ctypes
import io
import os
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from pathlib import Path

__all__ = ["ENV", "dump", "mallinfo", "smaps", "start"]

ENV = "SUPERVISOR_MEMDEBUG"
FRAMES_ENV = "SUPERVISOR_MEMDEBUG_FRAMES"
_TOP = 40


def start() -> None:
    """Start tracing if ``SUPERVISOR_MEMDEBUG`` names a directory."""
    if os.environ.get(ENV) and not tracemalloc.is_tracing():
        try:
            frames = int(os.environ.get(FRAMES_ENV, "1"))
        except ValueError:
            frames = 1
        tracemalloc.start(max(1, frames))


def dump(label: str) -> Path | None:
    """Write a report named after `label` (if tracing); return its path.

    Never raises: a debug aid must not take the daemon down.
    """
    where = os.environ.get(ENV)
    if not where or not tracemalloc.is_tracing():
        return None
    try:
        path = Path(where) / f"memdebug-{os.getpid()}-{time.time():.3f}-{label}.txt"
        out = io.StringIO()
        current, peak = tracemalloc.get_traced_memory()
        out.write(f"{label}: traced {current / 2**20:.2f} MiB now, peak {peak / 2**20:.2f} MiB\n")
        out.write(f"mallinfo2: {mallinfo()}\n")
        out.write(f"mappings (kB): {smaps()}\n\n")
        snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
        key = "traceback" if tracemalloc.get_traceback_limit() > 1 else "lineno"
        for stat in snap.statistics(key)[:_TOP]:
            out.write(f"{stat.size / 1024:10.1f} KiB {stat.count:8d} blocks  "
                      f"{' <- '.join(str(f) for f in stat.traceback)}\n")
        out.write("\n" + _pymalloc_stats())
        path.write_text(out.getvalue())
        tracemalloc.reset_peak()
        return path
    except Exception:  # noqa: BLE001 - a debug aid never fails the daemon
        return None


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
        "keepcost")]


def mallinfo() -> dict[str, int]:
    """glibc's heap in KiB: `arena` (brk heap), `hblkhd` (mmapped blocks),
    `uordblks` (in use), `fordblks` (free, kept); {} without glibc."""
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return {}
    fn.restype = _Mallinfo2
    info = fn()
    return {name: getattr(info, name) // 1024 for name in ("arena", "hblkhd", "uordblks", "fordblks", "keepcost")}


def smaps(pid: int | str = "self") -> dict[str, int]:
    """Resident kB of the process's mappings by kind: heap, anon, stack, files."""
    kinds: Counter[str] = Counter()
    name = "?"
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                head = line.split()
                if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                    name = head[5] if len(head) > 5 else "[anon]"
                    name = name if name.startswith("[") else "files"
                elif head[0] == "Rss:":
                    kinds[name] += int(head[1])
    except OSError:
        return {}
    return dict(kinds.most_common())


def _pymalloc_stats() -> str:
    """`sys._debugmallocstats` (it writes to the C stderr), its summary lines."""
    with tempfile.TemporaryFile() as tmp:
        saved = os.dup(2)
        try:
            sys.stderr.flush()
            os.dup2(tmp.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        lines = tmp.read().decode(errors="replace").splitlines()
    keep = ("# arenas", "# bytes in", "Total", "arenas")
    return "\n".join(line for line in lines if line.lstrip().startswith(keep)) + "\n"
