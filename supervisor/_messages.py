"""The human-readable lines of the reply to the request being served.

The control server sets `MESSAGES` for each request; the engine, the reload
and custom actions add lines with `say`.
"""

from __future__ import annotations

import contextvars

__all__ = ["MESSAGES", "say"]

#: Human-readable lines for the reply of the request being served.
MESSAGES: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("messages", default=None)


def say(text: str) -> None:
    """Add a line to the current request's reply `messages` (if any)."""
    messages = MESSAGES.get()
    if messages is not None:
        messages.append(text)
