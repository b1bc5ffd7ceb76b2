"""Giving freed memory back to the system (glibc), so that RSS returns.

Python hands every block over 512 bytes to glibc's malloc.  Freed, that
memory stays in the process unless it lies at the top of the heap, and
two habits of glibc make it stay after the daemon's big, short-lived
buffers (the replies queued for clients that do not read, a re-exec's
hand-over) are gone:

* the mmap threshold grows: once a block bigger than 128 KiB that glibc
  had mmapped is freed, later blocks up to that size come from the heap,
  where a small block allocated after them pins them;
* free memory in the middle of the heap is returned only by
  ``malloc_trim``.

`configure` fixes the mmap threshold (big blocks stay mmapped: unmapped as
they are freed), and `released` calls ``malloc_trim(0)`` once enough big
buffers have been dropped since the last time.  Elsewhere than glibc both
do nothing.
"""

from __future__ import annotations

import ctypes
from typing import Final

__all__ = ["MMAP_THRESHOLD", "TRIM_AFTER", "configure", "released", "trim"]

#: Blocks at least this big are mmapped, and unmapped when freed (glibc's
#: default, but fixed: glibc otherwise raises it after each big free).
MMAP_THRESHOLD: Final = 128 * 1024
#: `released` trims once this many bytes of big buffers were dropped.
TRIM_AFTER: Final = 1024 * 1024
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3

_released = 0


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols: libc's among them
        libc.malloc_trim, libc.mallopt  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def configure() -> None:
    """Fix the mmap threshold (and with it the trim threshold) at start."""
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD)


def trim() -> None:
    """Return every free page of the heap to the system now."""
    global _released
    _released = 0
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def released(size: int) -> None:
    """`size` bytes of big buffers were just freed: trim once they add up
    to `TRIM_AFTER` (a trim walks the heap: not for every small free)."""
    global _released
    _released += size
    if _released >= TRIM_AFTER:
        trim()
