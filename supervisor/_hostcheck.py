"""Host checks: what a valid configuration needs from this machine.

A user, group, program or working directory that does not exist here makes a
service fail at its start.  `supervisor --check` reports these as errors
(``--no-host-checks`` skips them, for a file meant for another host); the
daemon logs each as a warning when it loads a configuration, and the start
then fails as it always did, with its reason.  What a service type creates at
start (`ServiceSpec.creates`) is not missing.  Some things cannot be known
for sure from here (ACLs can grant what mode bits deny): those are warnings.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

from .spec import ServiceSpec

if TYPE_CHECKING:
    from .config import Config

__all__ = ["Finding", "check_host", "log_findings"]


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing this host lacks, at a TOML key path."""

    path: str
    service: str  # "" for the [supervisor] table
    message: str
    warning: bool = False  # True: the start may fail; False: it will

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@cache
def _user(user: str | int) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(user) if isinstance(user, str) else pwd.getpwuid(user)
    except KeyError:
        return None


@cache
def _gid(group: str | int) -> int | None:
    try:
        return grp.getgrnam(group).gr_gid if isinstance(group, str) else grp.getgrgid(group).gr_gid
    except KeyError:
        return None


def _q(value: str | int) -> str:
    return f'"{value}"' if isinstance(value, str) else str(value)


def check_host(config: Config) -> list[Finding]:
    """Everything the services of `config` need and this host lacks.

    Only looks (passwd, group, stat, PATH): never creates or runs anything.
    """
    _user.cache_clear()
    _gid.cache_clear()
    out: list[Finding] = []
    settings = config.settings
    for key, group in (("socket-group", settings.socket_group),
                       ("status-socket-group", settings.status_socket_group)):
        if isinstance(group, str) and _gid(group) is None:  # a gid is used as it is
            out.append(Finding(f"supervisor.{key}", "", f"group {_q(group)} does not exist on this host"))
    for spec in config.services:
        out.extend(_check_service(spec))
    return out


def _check_service(spec: ServiceSpec) -> Iterator[Finding]:
    base = spec.source or f"services.{spec.name}"
    whose = "" if base == f"services.{spec.name}" else f" (service {spec.name})"

    def finding(key: str, message: str, warning: bool = False) -> Finding:
        return Finding(spec.key_path(key), spec.name, message + whose, warning)

    pw = None
    if spec.user is not None:
        pw = _user(spec.user)
        if pw is None and spec.user not in spec.creates.users:
            yield finding("user", f"user {_q(spec.user)} does not exist on this host")
    gid = None
    if spec.group is not None:
        gid = _gid(spec.group)
        if gid is None and spec.group not in spec.creates.groups:
            yield finding("group", f"group {_q(spec.group)} does not exist on this host")
    extra: list[int | None] = []
    for group in spec.supplementary_groups or ():
        extra.append(_gid(group))
        if extra[-1] is None and group not in spec.creates.groups:
            yield finding("supplementary-groups", f"group {_q(group)} does not exist on this host")
    for i, sock in enumerate(spec.sockets):
        if isinstance(sock.group, str) and _gid(sock.group) is None:
            yield finding(f"sockets[{i}].group", f"group {_q(sock.group)} does not exist on this host")
    if spec.directory not in spec.creates.directories:
        problem = _directory_problem(spec.directory)
        if problem is not None:
            yield finding("directory", *problem)
    if spec.command:
        identity = None
        if pw is not None and pw.pw_uid != 0 and (spec.group is None or gid is not None) and None not in extra:
            primary = gid if gid is not None else pw.pw_gid
            groups = extra if spec.supplementary_groups is not None else os.getgrouplist(pw.pw_name, primary)
            identity = (pw.pw_name, pw.pw_uid, {primary, *groups})
        problem = _program_problem(spec, identity)
        if problem is not None:
            yield finding("command", *problem)


def _stat(path: str, what: str) -> os.stat_result | tuple[str, bool]:
    """`path`'s status, or the finding (message, only maybe) when it has none."""
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return f"{what}{path} does not exist on this host", False
    except OSError as exc:
        return f"cannot check {what}{path}: {exc.strerror}", True


def _directory_problem(path: str) -> tuple[str, bool] | None:
    st = _stat(path, "directory ")
    if not isinstance(st, os.stat_result):  # (a stat_result is a tuple too)
        return st
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory", False
    return None


def _search_path(spec: ServiceSpec) -> str:
    """The PATH the service's command is looked up on (as spawn builds its environment)."""
    env = dict(spec.environment)
    if "PATH" in env:
        return env["PATH"]
    return os.defpath if spec.clear_environment else os.environ.get("PATH", os.defpath)


def _program_problem(spec: ServiceSpec, identity: tuple[str, int, set[int]] | None) -> tuple[str, bool] | None:
    """Why `spec.command` cannot run here (bool: only maybe), or None."""
    assert spec.command
    program = spec.command[0]
    if "/" not in program:
        search = _search_path(spec)
        found = shutil.which(program, path=search)
        if found is None:
            return f"{_q(program)} is not found on PATH ({search})", False
        program = found
    st = _stat(program, "")
    if not isinstance(st, os.stat_result):  # (a stat_result is a tuple too)
        return st
    if not stat.S_ISREG(st.st_mode):
        return f"{program} is not a regular file", False
    if not st.st_mode & 0o111:
        return f"{program} is not executable (mode {stat.S_IMODE(st.st_mode):04o})", False
    if identity is not None:
        denied = _denied(program, identity[1], identity[2])
        if denied is not None:
            return f"user {_q(identity[0])} may not run {program}: {denied}", True
    return None


def _denied(program: str, uid: int, gids: set[int]) -> str | None:
    """Why `uid` may not execute `program`, going by mode bits (no ACLs); None when it may."""
    real = os.path.realpath(program)
    for d in dict.fromkeys([*_ancestors(os.path.abspath(program)), *_ancestors(real)]):
        why = _lacks_x(d, uid, gids, "search")
        if why:
            return why
    return _lacks_x(real, uid, gids, "execute")


def _ancestors(path: str) -> list[str]:
    """``/a/b/c`` → ``/``, ``/a``, ``/a/b``."""
    out = []
    while path != "/":
        path = os.path.dirname(path)
        out.append(path)
    return out[::-1]


def _lacks_x(path: str, uid: int, gids: set[int], what: str) -> str | None:
    try:
        st = os.stat(path)
    except OSError:
        return None  # reported elsewhere, or not ours to judge
    shift = 6 if st.st_uid == uid else 3 if st.st_gid in gids else 0
    if st.st_mode >> shift & 1:
        return None
    return f"it cannot {what} {path} (mode {stat.S_IMODE(st.st_mode):04o}, owner {st.st_uid}:{st.st_gid})"


def log_findings(config: Config, log: Any) -> None:
    """One warning line per finding, naming the service and the key (daemon start, reload).

    Advisory only: a bug here must not keep the daemon (perhaps PID 1) from starting.
    """
    try:
        findings = check_host(config)
    except Exception:
        log.exception("host checks failed; services start unchecked")
        return
    for f in findings:
        event = "the service may fail to start" if f.warning else "the service will fail to start"
        fields = {"service": f.service} if f.service else {}
        log.warning(f"host check: {event}", key=f.path, problem=f.message, **fields)
