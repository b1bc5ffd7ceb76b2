"""PID 1 never exits: what happens when the supervisor, as init, would.

The kernel panics when PID 1 exits.  `run_as_init` runs the supervisor's
main function; whatever ends it (a returned status, an exception, a
configuration that cannot be loaded) ends in `emergency`: the reason on the
console, then an interactive shell on the console if the machine has one
(/bin/sh).  PID 1 reaps every process meanwhile; when the shell exits, the
machine reboots.  Without a shell, the machine is halted (the reason stays
on the console).
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Final, NoReturn

__all__ = ["SHELLS", "emergency", "run_as_init"]

#: The shells tried, in order, for the emergency shell.
SHELLS: Final = ("/bin/sh", "/usr/bin/sh", "/bin/busybox")


def _say(text: str) -> None:
    try:
        os.write(2, f"supervisor: {text}\n".encode(errors="replace"))
    except OSError:
        pass


def run_as_init(main: Callable[[], int]) -> NoReturn:
    """Run `main` as PID 1; never return (see the module's docstring)."""
    try:
        rc = main()
        why = f"the supervisor ended (status {rc})"
    except BaseException as exc:  # noqa: BLE001 - PID 1 must survive everything
        traceback.print_exc()
        why = f"the supervisor failed: {type(exc).__name__}: {exc}"
    emergency(why)


def _shell_child(shell: str) -> NoReturn:
    try:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        os.setsid()
        fd = os.open("/dev/console", os.O_RDWR)
        try:
            import fcntl
            import termios
            fcntl.ioctl(fd, termios.TIOCSCTTY, 1)
        except OSError:
            pass
        for target in (0, 1, 2):
            os.dup2(fd, target)
        argv = [shell, "sh", "-i"] if shell.endswith("busybox") else [shell, "-i"]
        os.execv(shell, argv)
    except BaseException:  # noqa: BLE001
        pass
    os._exit(127)


def emergency(why: str) -> NoReturn:
    """Say `why`, run an emergency shell on the console, reap; reboot after it."""
    _say(why)
    shell = next((s for s in SHELLS if os.access(s, os.X_OK)), None)
    if shell is not None:
        _say(f"starting an emergency shell ({shell}); the machine reboots when it exits")
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _shell_child(shell)
        while True:
            try:
                done, _status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            if done == pid:
                break
        _go_down("reboot")
    _say("no shell to start: halting")
    _go_down("halt")


def _go_down(how: str) -> NoReturn:
    from . import pid1

    try:
        pid1.reboot(how)
    except BaseException:  # noqa: BLE001
        pass
    while True:  # reboot(2) failed (not PID 1 of a machine?): stay, never exit
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            time.sleep(3600)
        except BaseException:  # noqa: BLE001
            time.sleep(1)
