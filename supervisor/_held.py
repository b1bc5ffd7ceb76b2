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
from collections.abc import Mapping, Sequence
from typing import Final

__all__ = ["EXIT_ABANDONED", "usable", "stub_argv", "release", "credentials"]

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
