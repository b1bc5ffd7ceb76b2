"""`herd`: the command-line client of the supervisor.

The package is standard library only and imports nothing heavy at import
time: :mod:`herd.protocol` is shared with the daemon, :mod:`herd.cli` is the
``herd`` program and :mod:`herd.render` turns protocol results into text.
"""

from __future__ import annotations

__all__: list[str] = []
