"""Modules imported on first use, not at start (issue 19: the daemon's memory).

Our libraries import at their top modules the daemon never calls: structlog
imports `asyncio` (for its ``a*`` methods and its bridge to `logging`),
trio imports `ssl` (for `trio.SSLStream`) and `idna` (for host names in
`getaddrinfo`); psutil is needed only by a crash recovery's or a re-exec's
checks.  Together about 3 MiB of a 21 MiB image, and 40 ms of its start.

`defer` puts a stand-in into `sys.modules` before those libraries are
imported: their ``import asyncio`` binds the stand-in, and the first
attribute read from it imports the real module, which replaces the stand-in
in `sys.modules`; the stand-in forwards every later read to it.  So a
library that does use one of them still works, it only pays on first use.
A module imported before `defer` is left alone.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any, Final

__all__ = ["UNUSED", "Deferred", "defer"]

#: What the daemon imports (through its libraries) and does not use.
UNUSED: Final = ("asyncio", "ssl", "idna", "psutil")


class Deferred(types.ModuleType):
    """A module's stand-in until its first attribute read."""

    def __getattr__(self, attr: str) -> Any:
        """Import the real module (once) and read `attr` from it.

        Raises:
            ImportError: the real module cannot be imported.
            AttributeError: it has no `attr`.
        """
        name = self.__name__
        real = sys.modules.get(name)
        if real is None or isinstance(real, Deferred):
            sys.modules.pop(name, None)
            try:
                real = importlib.import_module(name)
            except BaseException:
                sys.modules.setdefault(name, self)
                raise
        return getattr(real, attr)


def defer(*names: str) -> None:
    """Stand-ins for the modules `names` not imported yet (see the module's docstring)."""
    for name in names:
        if name not in sys.modules:
            # its __spec__ is None: the import system finds nothing being initialized
            sys.modules[name] = Deferred(name)
