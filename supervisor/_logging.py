"""The supervisor's own log, through structlog.

Readable console lines on a terminal, JSON lines otherwise (or as asked).
Console lines are coloured only on a terminal and when ``NO_COLOR`` is unset
or empty (https://no-color.org).  Timestamps are UTC, ISO 8601 with their
zone (``2026-11-30T07:45:01.123456Z``).  The renderer is chosen once, at
configuration; below-level calls are no-ops.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

import structlog

__all__ = ["configure_logging"]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def colour(out: TextIO) -> bool:
    """Whether to colour what goes to `out`: a terminal, and ``NO_COLOR`` unset or empty."""
    return out.isatty() and not os.environ.get("NO_COLOR")


def configure_logging(fmt: str | None = None, level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog for the daemon.

    `fmt` is "console", "json", or None for console on a terminal and JSON otherwise.
    """
    out = stream or sys.stderr
    if fmt is None:
        fmt = "console" if out.isatty() else "json"
    renderer: structlog.typing.Processor
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=colour(out))
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=True,
    )
