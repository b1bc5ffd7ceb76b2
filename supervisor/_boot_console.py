"""As the init of a machine: services' output on the console until the log directory is writable.

Early in boot the log directory may not exist yet, or sit on a file system
still read-only or not mounted.  Until it is writable, every line a service
writes (and every note the supervisor makes about a service) is also
written to the console, as ``NAME[stream]: text``; the log files receive
those lines once the directory appears (`_logfile.LogFile` keeps what it
could not write yet, and writes it first).  The supervisor's own log goes
to the console (its stderr) all along.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import trio

from ._output import LogHub

__all__ = ["mirror_until_writable", "writable"]


def writable(directory: Path) -> bool:
    """Whether the log directory exists (or can be made) and can be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o750)
    except OSError:
        return False
    return os.access(directory, os.W_OK | os.X_OK)


async def mirror_until_writable(hub: LogHub, log_dir: Path, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Copy every service line of `hub` to stderr while `log_dir` is not writable."""
    if writable(log_dir):
        task_status.started()
        return
    console = sys.stderr
    console.write(f"supervisor: {log_dir} is not writable yet: services' output follows on the console\n")
    console.flush()
    with hub.follow(None, buffer=10000) as lines:
        task_status.started()
        async for line in lines:
            if writable(log_dir):
                console.write(f"supervisor: {log_dir} is writable: services' output goes to their log files\n")
                console.flush()
                return
            console.write(f"{line.service}[{line.stream}]: {line.line}\n")
            console.flush()
