""""Did you mean …?" for a misspelt service, action or configuration key.

Standard library only (the daemon and ``herd`` both use it); `difflib` is
imported when a suggestion is needed, never on the fast path.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["did_you_mean"]


def did_you_mean(word: str, candidates: Iterable[str], *, cutoff: float = 0.6) -> str:
    """``" (did you mean 'x'?)"`` for the closest candidates (difflib ratio at
    least `cutoff`), or ``""``."""
    import difflib

    close = difflib.get_close_matches(word, sorted(set(candidates)), n=3, cutoff=cutoff)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"
