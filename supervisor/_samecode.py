"""Is the code on disk still the code this process runs?  (A re-exec's shortcut.)

A re-exec first checks the new image in a child process (``--check``), which
starts an interpreter and imports the whole daemon: most of a re-exec's time.
When not one file this image was built from changed since it started, the
new image is this one, byte for byte, and the child would only repeat what
this process can check itself (the configuration in force, the host checks).

The fingerprint covers every file mapped into the process (the interpreter,
its libraries, every C extension), every module loaded, and every source
file of the supervisor's own packages (lazily imported ones included): path,
device, inode, size and modification time.  Any difference, or anything that
cannot be read, sends the re-exec back to the full check.
"""

from __future__ import annotations

import os
import sys
import time
from types import ModuleType
from typing import Final

__all__ = ["remember", "unchanged"]

#: The packages whose every source file counts, imported yet or not.
_PACKAGES: Final = ("supervisor", "services", "herd")

_at_start: dict[str, tuple[int, int, int, int, int]] | None = None
#: When this image began loading the supervisor (this module is imported early).
_STARTED_NS: Final = time.time_ns()


def _paths() -> set[str]:
    paths: set[str] = {sys.executable}
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.split(None, 5)
                if len(fields) == 6 and fields[5].startswith("/"):
                    paths.add(fields[5].rstrip("\n").removesuffix(" (deleted)"))
    except OSError:
        pass
    for module in list(sys.modules.values()):
        # a module's own dict, not getattr: that would import a deferred module (_lazy)
        path = module.__dict__.get("__file__") if isinstance(module, ModuleType) else getattr(module, "__file__", None)
        if isinstance(path, str):
            paths.add(path)
    for package in _PACKAGES:
        module = sys.modules.get(package)
        for base in getattr(module, "__path__", None) or []:
            for root, _dirs, files in os.walk(base):
                paths.update(os.path.join(root, f) for f in files if f.endswith(".py"))
    return paths


def _fingerprint() -> dict[str, tuple[int, int, int, int, int]]:
    out: dict[str, tuple[int, int, int, int, int]] = {}
    for path in _paths():
        try:
            st = os.stat(path)
        except OSError:
            out[path] = (-1, -1, -1, -1, -1)
            continue
        out[path] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return out


def remember() -> None:
    """Take the fingerprint of the code this image runs (at start, once the daemon is imported)."""
    global _at_start
    _at_start = _fingerprint()


def unchanged() -> bool:
    """True when every file of the fingerprint taken at start is as it was, and
    every file loaded since (a lazy import) was last changed before this image
    started (its inode change time: no write, rename or ``touch`` leaves that)."""
    if _at_start is None:
        return False
    now = _fingerprint()
    for path, stat in now.items():
        known = _at_start.get(path)
        if known is not None:
            if stat != known:
                return False
        elif stat[0] < 0 or stat[4] >= _STARTED_NS:
            return False
    return _at_start.keys() <= now.keys()
