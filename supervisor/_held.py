"""A held start: the child waits in a fixed stub until the supervisor has put
it in its cgroup and set its limits, and only then executes the command.

A ``preexec_fn`` makes `subprocess.Popen` fork the whole daemon and run
Python in the child: at 1000 services that is 5 ms per spawn on an idle
machine and about 50 under load, against well under 1 for vfork+exec (the
daemon then pays copy-on-write faults on every page it writes next).  So the
child is started by vfork+exec, running no Python, as the stub ``/bin/sh -c
SCRIPT``, its stdin the read end of a pipe.  Before `spawn` returns, the
supervisor writes the child's pid to the service's ``cgroup.procs``, sets its
resource limits with prlimit(2), and writes one line to the pipe: the stub
then executes the command, keeping its pid, with its real stdin.  Its
command never runs outside the cgroup, and since nothing else runs in the
daemon between the fork and the move, a stop that races the start finds the
child in the cgroup.  If the supervisor dies or gives up before the line,
the stub reads end of file and exits 111 without running the command.

The script is fixed; the command and its arguments are the stub's
arguments, never part of it.  Where a shell would change what the command
sees, `usable` says no and the caller keeps the ``preexec_fn``: names in the
environment that are not shell names (``sh`` drops them).  ``sh`` sets
``PWD``: the script puts back the value the command was given, or unsets it.

Where the helper ``_cgspawn`` was compiled at install (setup.py, contrib/dev:
supervisor/_cgspawn.c), no stub is needed: the command is born in the
cgroup (`Birth`), by clone3(CLONE_INTO_CGROUP) from that helper, as our
child (CLONE_PARENT), its limits set by the helper's child before it
executes the command.  The move writes a pid to ``cgroup.procs``, and the
kernel then makes the writer wait for an RCU grace period (measured 13 ms
on this 2-core host under load): most of a respawn's time.

A user, group or supplementary groups would make Popen fork the daemon
(CPython uses vfork only when the child keeps our credentials): the command
is run through util-linux ``setpriv`` instead (`credentials`), with numeric
ids, its environment untouched, the saved ids set too, as Popen would.
"""

from __future__ import annotations

import functools
import os
import re
import resource
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

__all__ = ["EXIT_ABANDONED", "usable", "stub_argv", "release", "credentials", "Birth", "BornFailed"]

#: How the stub exits when it is never released (s6's "system" exit code).
EXIT_ABANDONED: Final = 111

_SCRIPT: Final = (f'read -r _ || exit {EXIT_ABANDONED}; if [ "$1" ]; then export PWD="$2"; else unset PWD; fi; '
                  'shift 2; exec "$@" ')
_STDIN_NULL: Final = _SCRIPT + "</dev/null"
_STDIN_IS_STDOUT: Final = _SCRIPT + "<&1"  # an inetd connection: stdin and stdout are one socket
_SH: Final = "/bin/sh"
_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def usable(env: Mapping[str, str]) -> bool:
    """The stub passes this environment on unchanged (and there is a ``/bin/sh``)."""
    return all(_NAME.match(name) for name in env) and os.access(_SH, os.X_OK)


def stub_argv(command: Sequence[str], env: Mapping[str, str], *, stdin_is_stdout: bool) -> list[str]:
    """The stub's command line: it waits for `release`, then executes `command`
    with stdin /dev/null, or its stdout when `stdin_is_stdout`."""
    pwd = env.get("PWD")
    script = _STDIN_IS_STDOUT if stdin_is_stdout else _STDIN_NULL
    return [_SH, "-c", script, "sh", "" if pwd is None else "1", pwd or "", *command]


def release(pid: int, pipe: int, cgroup_procs: int | None,
            limits: Sequence[tuple[int, int, int]]) -> None:
    """Move the waiting stub `pid` into the cgroup (`cgroup_procs`: its
    ``cgroup.procs``, open for writing), set its `limits` (resource, soft,
    hard; negative is unlimited), then let it run the command through `pipe`
    (the write end, which the caller closes).

    Raises:
        OSError: the move or a limit failed (the stub is still held: closing
            `pipe` makes it exit without running the command).
    """
    if cgroup_procs is not None:
        os.write(cgroup_procs, b"%d" % pid)
    inf = resource.RLIM_INFINITY
    for res, soft, hard in limits:
        resource.prlimit(pid, res, (inf if soft < 0 else soft, inf if hard < 0 else hard))
    try:
        os.write(pipe, b"\n")
    except BrokenPipeError:
        pass  # the stub was killed meanwhile: its exit is seen on its pidfd


@functools.cache
def _setpriv() -> str | None:
    return shutil.which("setpriv", path=os.defpath + ":/usr/sbin:/sbin")


def credentials(*, user: int | None = None, group: int | None = None,
                extra_groups: Sequence[int] | None = None) -> list[str] | None:
    """An exec wrapper that takes Popen's `user`, `group` and `extra_groups`
    (numbers; an absent one is kept), then executes the command; None where
    there is no ``setpriv``."""
    path = _setpriv()
    if path is None:
        return None
    argv = [path]
    if user is not None:
        argv.append(f"--reuid={int(user)}")
    if group is not None:
        argv.append(f"--regid={int(group)}")
    if extra_groups is None:
        argv.append("--keep-groups")
    elif extra_groups:
        argv.append("--groups=" + ",".join(str(int(g)) for g in extra_groups))
    else:
        argv.append("--clear-groups")
    return [*argv, "--"]


#: Compiled at install from _cgspawn.c; absent, the stub is moved instead.
_HELPER: Final = Path(__file__).with_name("_cgspawn")
_EXIT_NO_CLONE: Final = 111


@functools.cache
def _kernel_has_clone3() -> bool:
    try:
        major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (5, 7)  # clone3 with CLONE_INTO_CGROUP


class Birth:
    """One start straight into a cgroup through the helper: its command line
    and descriptors, then the pid it reports.  `possible` says whether there
    is a helper to use; it is turned off for good when the kernel refuses."""

    possible: bool = True

    def __init__(self, cgroup_procs: int) -> None:
        """`cgroup_procs`: the cgroup's ``cgroup.procs``, open (its directory is used).

        Raises:
            OSError: the directory cannot be opened.
        """
        path = os.path.dirname(os.readlink(f"/proc/self/fd/{cgroup_procs}"))
        self.dir = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._read, self.write = os.pipe2(os.O_CLOEXEC)

    @classmethod
    def available(cls) -> bool:
        """There is a helper, and the kernel takes it (SUPERVISOR_CGSPAWN=0 in
        the supervisor's environment turns it off: processes are moved)."""
        return (cls.possible and _kernel_has_clone3() and os.access(_HELPER, os.X_OK)
                and os.environ.get("SUPERVISOR_CGSPAWN") != "0")

    def argv(self, command: Sequence[str], limits: Sequence[tuple[int, int, int]]) -> list[str]:
        """The helper's command line: `command` with these limits (resource, soft, hard)."""
        numbers = [str(int(x)) for limit in limits for x in limit]
        return [str(_HELPER), str(self.dir), str(self.write), *numbers, "--", *command]

    def child_pid(self, helper: subprocess.Popen[bytes]) -> int:
        """The pid of the process born, once the helper has exited.

        Raises:
            BornFailed: it could not set a limit or execute the command
                (`step` says which); it has been reaped.
            OSError: the helper failed (its reason is on the service's stderr).
        """
        os.close(self.write)
        self.write = -1
        chunks = []
        while chunk := os.read(self._read, 64):
            chunks.append(chunk)
        code = helper.wait()
        if code == _EXIT_NO_CLONE:
            type(self).possible = False  # an old kernel, or refused: move stubs from now on
        report = b"".join(chunks).decode()
        if code != 0 or not report:
            raise OSError(f"the cgroup helper exited with {code}")
        if report.startswith("!"):
            step, errno, pid = report[1:].split()
            os.waitpid(int(pid), 0)
            raise BornFailed(step, int(errno))
        return int(report)

    def close(self) -> None:
        for fd in (self.dir, self._read, self.write):
            if fd >= 0:
                os.close(fd)
        self.dir = self._read = self.write = -1


class BornFailed(OSError):
    """The child born in the cgroup failed to set a limit or execute the
    command (``step``: "limit" or "exec"; errno as OSError's)."""

    def __init__(self, step: str, errno: int) -> None:
        super().__init__(errno, os.strerror(errno))
        self.step = step
