"""What ``[libvirt]`` and ``[virtlog]`` share: libvirt's configuration files.

* Fields: a table of `Field` records (TOML key, kind, default, key in the
  ``.conf`` file) read strictly through `supervisor.Table` (`read_fields`)
  and rendered one ``key = value`` line each (`render`).
* The file format is libvirt's own (``src/util/virconf.c``): integers bare,
  booleans ``1``/``0``, lists ``["a","b"]``, strings quoted.  It has **no
  escape sequences**: a string is ``"…"`` (no ``"``), ``'…'`` (no ``'``) or
  ``\"\"\"…\"\"\"`` (may hold both quotes and newlines).  `quote` picks the form
  that keeps the value intact; a value no form can hold is a configuration error.
* Checks of the values libvirt parses (log filters and outputs, octal
  permissions, ports), with the rules of libvirt 9.0's own parsers.
* Run-time helpers for the services' hooks and actions: an atomic private
  file write, and a libvirt RPC keepalive probe (``PING`` → ``PONG``) that
  tells whether a daemon is serving clients (libvirtd enables its sockets only
  once its drivers are initialized; virtlogd once a re-exec is complete).
"""

from __future__ import annotations

import json
import os
import re
import select
import socket
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from supervisor import Table, replace_file

__all__ = ["Field", "read_fields", "render", "quote", "check_log_filters", "check_log_outputs",
           "file_outputs", "check_prefix", "write_private", "wait_serving", "Pidfd", "DaemonGone"]

#: Kinds of `Field`: how a value is read from TOML and written to the file.
#: ``str`` with ``min=1`` must not be empty; ``path`` is an absolute path; ``file``
#: is empty or an absolute path; ``optional-str`` is written commented out when empty.
KINDS = frozenset({"bool", "int", "str", "choice", "port", "perms", "list", "optional-str",
                   "log-filters", "log-outputs", "path", "file"})

UINT_MAX = 2**32 - 1
INT_MAX = 2**31 - 1


@dataclass(frozen=True, slots=True)
class Field:
    """One field of a seed record: its TOML key, kind, default and ``.conf`` key."""

    name: str  # TOML key: the seed's field name in kebab-case without "?"
    kind: str
    default: Any
    key: str | None = None  # key in the .conf file; None: `name` with "-" → "_"
    min: int | None = None
    max: int | None = None
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"field {self.name}: unknown kind {self.kind!r}")

    @property
    def conf_key(self) -> str:
        return self.key or self.name.replace("-", "_")


# -- libvirt's string syntax ------------------------------------------------------------


def quote(value: str) -> str | None:
    """`value` as a libvirt configuration string, or None when it cannot be one.

    libvirt reads ``"…"`` and ``'…'`` up to the next quote of the same kind or
    the end of the line, and ``\"\"\"…\"\"\"`` up to the next three double quotes;
    there are no escapes.
    """
    if "\0" in value:
        return None
    eol = "\n" in value or "\r" in value
    if '"' not in value and not eol:
        return f'"{value}"'
    if "'" not in value and not eol:
        return f"'{value}'"
    if '"""' not in value and not value.endswith('"'):
        return f'"""{value}"""'
    return None


UNQUOTABLE = ("cannot be written to a libvirt configuration file, whose strings have no escapes: "
              "a value may not contain a NUL character, and one that contains both ' and \" (or a "
              "line break) may not contain \"\"\" nor end with \"")


# -- checks of values libvirt parses ------------------------------------------------------


def _level(text: str) -> bool:
    return text.isascii() and text.isdigit() and 1 <= int(text) <= 4


def check_log_filters(value: str) -> str | None:
    """libvirt's ``virLogParseFilters``: space-separated ``LEVEL:[+]NAME``, LEVEL 1-4."""
    for item in value.split(" "):
        if not item:
            continue
        parts = item.split(":")
        if len(parts) < 2:
            return f'filter {json.dumps(item)} is not of the form LEVEL:NAME (e.g. "3:remote")'
        if not _level(parts[0]):
            return f"filter {json.dumps(item)}: the level must be 1 (debug) to 4 (error), got {json.dumps(parts[0])}"
        name = parts[1][1:] if parts[1].startswith("+") else parts[1]
        if not name:
            return f"filter {json.dumps(item)}: the name after the level is empty"
    return None


_DESTINATIONS = {"stderr": 2, "journald": 2, "syslog": 3, "file": 3}


def check_log_outputs(value: str) -> str | None:
    """libvirt's ``virLogParseOutputs``: ``L:stderr``, ``L:journald``, ``L:syslog:NAME``,
    ``L:file:PATH`` separated by spaces, L 1-4.  PATH must be absolute here (the
    daemons run in ``/``)."""
    for item in value.split(" "):
        if not item:
            continue
        parts = item.split(":")
        if len(parts) < 2:
            return f'output {json.dumps(item)} is not of the form LEVEL:DESTINATION (e.g. "3:stderr")'
        if not _level(parts[0]):
            return f"output {json.dumps(item)}: the level must be 1 (debug) to 4 (error), got {json.dumps(parts[0])}"
        want = _DESTINATIONS.get(parts[1])
        if want is None:
            return (f"output {json.dumps(item)}: unknown destination {json.dumps(parts[1])} "
                    "(known: stderr, syslog:NAME, file:PATH, journald)")
        if len(parts) != want:
            form = {"stderr": "L:stderr", "journald": "L:journald", "syslog": "L:syslog:NAME",
                    "file": "L:file:PATH"}[parts[1]]
            return f"output {json.dumps(item)} must have the form {form}"
        if parts[1] in ("syslog", "file") and not parts[2]:
            return f"output {json.dumps(item)}: the {'name' if parts[1] == 'syslog' else 'path'} is empty"
        if parts[1] == "file" and not parts[2].startswith("/"):
            return f"output {json.dumps(item)}: the file must be an absolute path"
    return None


def file_outputs(value: str) -> list[str]:
    """The files of the ``L:file:PATH`` outputs in a (valid) outputs string."""
    out = []
    for item in value.split(" "):
        parts = item.split(":")
        if len(parts) == 3 and parts[1] == "file":
            out.append(parts[2])
    return out


_PERMS = re.compile(r"^0?[0-7]{3}$")


def check_prefix(t: Table, key: str, value: str) -> None:
    if not value.startswith("/"):
        t.error(key, f"must be an absolute path (the installation prefix, e.g. \"/usr\"), got {json.dumps(value)}")


# -- reading and rendering fields -----------------------------------------------------------


def _read_one(t: Table, f: Field) -> Any:
    key = f.name
    if f.kind == "bool":
        return t.bool(key, f.default)
    if f.kind == "int":
        return t.int(key, f.default, min=f.min, max=f.max)
    if f.kind == "list":
        value = t.str_list(key, f.default)
        if f.choices:
            for i, item in enumerate(value):
                if item not in f.choices:
                    t.error(f"{key}[{i}]", f"expected one of {', '.join(json.dumps(c) for c in f.choices)}, "
                                           f"got {json.dumps(item)}")
                    return f.default
        for i, item in enumerate(value):
            if quote(item) is None:
                t.error(f"{key}[{i}]", UNQUOTABLE)
                return f.default
        return value
    if f.kind == "port":
        raw = t.raw(key, f.default)
        if isinstance(raw, int) and not isinstance(raw, bool):
            raw = str(raw)
        if not isinstance(raw, str):
            t.error(key, f"expected a port number or service name (a string), got {json.dumps(raw, default=str)}")
            return f.default
        problem = _check_port(raw)
        if problem:
            t.error(key, problem)
            return f.default
        return raw
    if f.kind == "choice":
        return t.choice(key, f.choices, f.default)
    value = t.str(key, f.default)
    if not isinstance(value, str) or value is f.default:
        return value
    if quote(value) is None:
        t.error(key, UNQUOTABLE)
        return f.default
    problem = None
    if f.kind == "perms" and not _PERMS.match(value):
        problem = f'expected an octal permission string like "0770", got {json.dumps(value)}'
    elif f.kind == "log-filters":
        problem = check_log_filters(value)
    elif f.kind == "log-outputs":
        problem = check_log_outputs(value)
    elif f.kind == "path" and not value.startswith("/"):
        problem = f"must be an absolute path, got {json.dumps(value)}"
    elif f.kind == "file" and value and not value.startswith("/"):
        problem = f'must be an absolute path (or "" for libvirt\'s default), got {json.dumps(value)}'
    elif f.kind == "str" and f.min and not value:
        problem = "must not be empty"
    if problem:
        t.error(key, problem)
        return f.default
    return value


def _check_port(value: str) -> str | None:
    if value.isascii() and value.isdigit():
        if 1 <= int(value) <= 65535:
            return None
        return f"port {value} is out of range (1-65535)"
    if value and re.match(r"^[A-Za-z][A-Za-z0-9_.+-]*$", value):
        try:
            socket.getservbyname(value, "tcp")
            return None
        except OSError:
            return f"{json.dumps(value)} is neither a port number (1-65535) nor a TCP service name in /etc/services"
    return f"expected a port number (1-65535) or a service name, got {json.dumps(value)}"


def read_fields(t: Table, fields: Iterable[Field]) -> dict[str, Any]:
    """Each field's value (the default when absent or wrong; errors recorded on `t`)."""
    return {f.name: _read_one(t, f) for f in fields}


def render_value(f: Field, value: Any) -> str:
    if f.kind == "bool":
        return "1" if value else "0"
    if f.kind == "int":
        return str(int(value))
    if f.kind == "list":
        return "[" + ",".join(_q(v) for v in value) + "]"
    return _q(str(value))


def _q(value: str) -> str:
    quoted = quote(value)
    assert quoted is not None, f"unquotable value passed validation: {value!r}"
    return quoted


def render(fields: Iterable[Field], values: Mapping[str, Any], header: str = "") -> str:
    """The file: one ``key = value`` line per field, in order; an empty optional
    list or optional string is written commented out."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    for f in fields:
        value = values[f.name]
        line = f"{f.conf_key} = {render_value(f, value)}"
        if (f.kind == "list" or f.kind == "optional-str") and not value:
            line = "# " + line
        lines.append(line)
    return "\n".join(lines) + "\n"


# -- files ----------------------------------------------------------------------------------


def write_private(path: Path, text: str, mode: int = 0o600) -> None:
    """Write `text` to `path` atomically (temporary file, fsync, rename), with `mode`.

    The directory is created (0755) when missing.  Readers see either the old
    file or the new one, never a partial one; no symlink another user could
    have planted is followed (`supervisor.replace_file`).

    Raises:
        OSError: the directory or the file could not be written.
    """
    replace_file(path, text.encode(), mode)


def make_dirs(paths: Iterable[str]) -> None:
    """``mkdir -p`` each path (new directories 0755); existing ones are left as they are."""
    for p in paths:
        os.makedirs(p, mode=0o755, exist_ok=True)


# -- the running daemon ----------------------------------------------------------------------


class DaemonGone(Exception):
    """The daemon's process exited while we waited for it."""


class Pidfd:
    """A process held by a pidfd: signals reach it and only it, even after PID reuse."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fd = os.pidfd_open(pid)  # ProcessLookupError when already gone

    def alive(self) -> bool:
        return not select.select([self.fd], [], [], 0)[0]

    def signal(self, signum: int) -> None:
        import signal as _signal

        _signal.pidfd_send_signal(self.fd, signum)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Pidfd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# libvirt RPC: a message is a 4-byte length (itself included) and a header of
# program, version, procedure, type, serial, status.  The keepalive program
# ("keep") answers PING with PONG on any client, before authentication.
_KEEPALIVE_PROGRAM = 0x6B656570
_KEEPALIVE_VERSION = 1
_PROC_PING, _PROC_PONG = 1, 2
_TYPE_MESSAGE = 2
_HEADER = struct.Struct(">IIIiiIi")
PING = _HEADER.pack(_HEADER.size, _KEEPALIVE_PROGRAM, _KEEPALIVE_VERSION, _PROC_PING, _TYPE_MESSAGE, 0, 0)


async def _ping_once(path: str) -> bool:
    """Connect, send PING, wait for PONG; False when the socket refuses or closes."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            await sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError):
            return False
        await sock.send(PING)
        buf = b""
        while True:
            while len(buf) < 4 or len(buf) < struct.unpack(">I", buf[:4])[0]:
                chunk = await sock.recv(65536)
                if not chunk:
                    return False
                buf += chunk
            length = struct.unpack(">I", buf[:4])[0]
            frame, buf = buf[:length], buf[length:]
            if len(frame) >= _HEADER.size:
                _, prog, _, proc_no, _, _, _ = _HEADER.unpack(frame[:_HEADER.size])
                if prog == _KEEPALIVE_PROGRAM and proc_no == _PROC_PONG:
                    return True
    except OSError:
        return False
    finally:
        sock.close()


async def wait_serving(path: str, proc: Pidfd | None = None, interval: float = 0.02) -> None:
    """Return once the daemon behind the Unix socket `path` answers a keepalive PING.

    A connection is queued by the kernel even while the daemon does not accept,
    so a plain connect proves nothing; the PONG does.  The caller bounds the
    wait (``trio.fail_after``).

    Raises:
        DaemonGone: `proc` exited meanwhile.
    """
    while True:
        if proc is not None and not proc.alive():
            raise DaemonGone(f"PID {proc.pid} exited")
        if await _ping_unless_gone(path, proc):
            return
        await trio.sleep(interval)


async def _ping_unless_gone(path: str, proc: Pidfd | None) -> bool:
    """One PING attempt, given up as soon as `proc` exits."""
    answered = False
    async with trio.open_nursery() as nursery:

        async def attempt() -> None:
            nonlocal answered
            answered = await _ping_once(path)
            nursery.cancel_scope.cancel()

        nursery.start_soon(attempt)
        if proc is not None:
            await trio.lowlevel.wait_readable(proc.fd)
            nursery.cancel_scope.cancel()
    return answered


def exec_marks(pid: int) -> tuple[str, ...] | None:
    """The address-space layout of `pid` from /proc/PID/stat (code, stack, argv and
    environment addresses).  execve(2) builds a new one, randomized: a change of
    these marks, under the same PID, means the process has executed again."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rfind(b")") + 2:].split()
    # fields 26-28 (startcode, endcode, startstack) and 48-51 (arg/env start and end),
    # counted from 1 over the whole line; `rest` starts at field 3.
    try:
        picked = [rest[i - 3] for i in (26, 27, 28, 48, 49, 50, 51)]
    except IndexError:
        return None
    return tuple(x.decode() for x in picked)
