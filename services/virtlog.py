"""``[virtlog]``: Guix's ``virtlog-service-type`` → service ``virtlogd`` (``docs/service-libvirt.md``).

virtlogd keeps the console logs of libvirt's guests; libvirtd's QEMU driver
cannot start a guest without it.  Before each start the supervisor writes
``STATE_DIR/libvirt/virtlogd.conf`` (mode 0600, atomically) from the table and
runs ``PREFIX/sbin/virtlogd -f CONF`` (absolute: virtlogd re-executes
``argv[0]``), handing it its two sockets (socket activation) unless
``socket-activation = false``.  ``herd reexec virtlogd`` (alias ``herd reload virtlogd``) sends
SIGUSR1: virtlogd re-executes its binary in place, same PID, keeping its
clients and open logs; the action returns once it serves again.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import trio

from supervisor import (
    ActionContext,
    ActionSpec,
    BuildContext,
    ProtocolError,
    ReadySpec,
    ServiceSpec,
    ServiceType,
    SocketSpec,
    Table,
)

from . import _health
from . import _libvirt_conf as conf
from ._libvirt_conf import UINT_MAX, Field

__all__ = ["FIELDS", "SERVICE_TYPES", "Settings", "read_settings", "render"]

#: The seed's ``virtlog-configuration`` fields, in Guix's order of ``virtlogd.conf``.
FIELDS: tuple[Field, ...] = (
    Field("log-level", "int", 3, min=1, max=4),
    Field("log-filters", "log-filters", "3:remote 4:event"),
    Field("log-outputs", "log-outputs", "3:stderr"),
    Field("max-clients", "int", 1024, min=0, max=UINT_MAX),
    Field("max-size", "int", 2 * 1024 * 1024, min=0, max=2**63 - 1),
    Field("max-backups", "int", 3, min=0, max=UINT_MAX),
)
#: How long `herd reexec virtlogd` waits for virtlogd to serve again.
REEXEC_TIMEOUT = 15.0


def runtime_dir() -> str:
    """Where virtlogd puts its sockets: fixed as root, per user otherwise (libvirt's rule)."""
    if os.geteuid() == 0:
        return "/run/libvirt"
    base = os.environ.get("XDG_RUNTIME_DIR") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "libvirt")


@dataclass(frozen=True, slots=True)
class Settings:
    """The ``[virtlog]`` table, validated."""

    values: tuple[tuple[str, Any], ...]
    prefix: str = "/usr"
    auto_start: bool = True
    conf_path: str = ""
    #: ``socket-activation``: the supervisor binds virtlogd's sockets and hands them over.
    activation: bool = True

    def get(self, name: str) -> Any:
        return dict(self.values)[name]

    @property
    def binary(self) -> str:
        return f"{self.prefix.rstrip('/') or ''}/sbin/virtlogd"

    @property
    def socket(self) -> str:
        return os.path.join(runtime_dir(), "virtlogd-sock")

    @property
    def admin_socket(self) -> str:
        return os.path.join(runtime_dir(), "virtlogd-admin-sock")

    def sockets(self) -> tuple[SocketSpec, ...]:
        """With socket activation: virtlogd's two sockets, mode 0600 as libvirt's units have them."""
        if not self.activation:
            return ()
        return (SocketSpec("virtlogd.socket", path=self.socket, mode=0o600),
                SocketSpec("virtlogd-admin.socket", path=self.admin_socket, mode=0o600))

    @property
    def restart_state(self) -> str:
        # virtlogd's state file between the two halves of a re-exec
        base = "/run" if os.geteuid() == 0 else runtime_dir()
        return os.path.join(base, "virtlogd-restart-exec.json")


def read_settings(t: Table, state_dir: Path) -> Settings:
    """Validate the table; errors are recorded on `t`, each naming its key path."""
    values = conf.read_fields(t, FIELDS)
    prefix = t.str("libvirt", "/usr", nonempty=True)
    conf.check_prefix(t, "libvirt", prefix)
    auto_start = t.bool("auto-start", True)
    activation = t.bool("socket-activation", True)
    t.finish()
    path = Path(os.path.abspath(state_dir)) / "libvirt" / "virtlogd.conf"
    return Settings(values=tuple(values.items()), prefix=prefix, auto_start=auto_start, conf_path=str(path),
                    activation=activation)


def render(s: Settings) -> str:
    """``virtlogd.conf``: Guix's six lines, in its order."""
    header = ("virtlogd.conf: written by the supervisor from the [virtlog] table before each start\n"
              "of virtlogd. Edits here are overwritten.")
    return conf.render(FIELDS, dict(s.values), header)


class Virtlogd:
    """Hooks and actions of one ``[virtlog]`` configuration."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.reexecs: list[float] = []  # times virtlogd re-executed since it was started

    def to_record(self) -> dict[str, Any]:  # TypeState: kept across a re-exec or crash of ours
        return {"reexecs": list(self.reexecs)}

    def from_record(self, data: dict[str, Any]) -> None:
        self.reexecs = [float(t) for t in data.get("reexecs", []) if isinstance(t, (int, float))]

    async def prepare(self, spec: ServiceSpec) -> None:
        """Before each start: directories of file log outputs, then the config file."""
        s = self.settings
        self.reexecs = []  # a new process: it has not re-executed yet
        conf.make_dirs(os.path.dirname(p) for p in conf.file_outputs(s.get("log-outputs")))
        conf.write_private(Path(s.conf_path), render(s))

    async def reexec(self, ctx: ActionContext, args: list[Any]) -> Any:
        """SIGUSR1, then wait until virtlogd has executed again and answers on its socket."""
        if args:
            raise ProtocolError("bad-arguments", f"{ctx.service} reexec takes no arguments")
        if ctx.pid is None:
            raise RuntimeError(f"{ctx.service} is not running")
        s = self.settings
        try:
            proc = conf.Pidfd(ctx.pid)
        except ProcessLookupError:
            raise RuntimeError(f"{ctx.service} (PID {ctx.pid}) is not running") from None
        with proc:
            before = conf.exec_marks(proc.pid)
            started = trio.current_time()
            proc.signal(signal.SIGUSR1)
            try:
                with trio.fail_after(REEXEC_TIMEOUT):
                    await self._wait_exec(proc, before)
                    await conf.wait_serving(s.socket, proc)
            except trio.TooSlowError:
                raise RuntimeError(f"virtlogd (PID {proc.pid}) did not serve again on {s.socket} within "
                                   f"{REEXEC_TIMEOUT:g} s of SIGUSR1") from None
            except conf.DaemonGone:
                raise RuntimeError(f"virtlogd (PID {proc.pid}) exited during the re-exec; the supervisor "
                                   "respawns it as it would after any exit") from None
            elapsed = trio.current_time() - started
        now = time.time()
        self.reexecs.append(now)
        ctx.say(f"virtlogd re-executed itself in place: PID {proc.pid} unchanged, serving again on "
                f"{s.socket} after {elapsed:.2f} s.")
        return {"service": ctx.service, "pid": proc.pid, "re-executed": now, "seconds": round(elapsed, 3),
                "socket": s.socket}

    async def _wait_exec(self, proc: conf.Pidfd, before: tuple[str, ...] | None) -> None:
        """Until the process has run execve(2): a new address-space layout, or
        virtlogd's hand-over file written and consumed."""
        seen_state = False
        while True:
            if not proc.alive():
                raise conf.DaemonGone(f"PID {proc.pid} exited")
            marks = conf.exec_marks(proc.pid)
            if before is not None and marks is not None and marks != before:
                return
            if os.path.exists(self.settings.restart_state):
                seen_state = True
            elif seen_state:
                return
            await trio.sleep(0.005)

    def details(self, spec: ServiceSpec) -> dict[str, Any]:
        s = self.settings
        last = self.reexecs[-1] if self.reexecs else None
        return {
            "config-file": s.conf_path,
            "socket": s.socket,
            "re-executed": (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last)) if last else "never"),
            "re-exec-count": len(self.reexecs),
        }


def _documentation(s: Settings) -> str:
    return (
        "Run the virtlog daemon (virtlogd), which keeps the console logs of libvirt's guests; "
        "libvirtd's QEMU driver needs it to start a guest.\n"
        f"Command: {s.binary} -f {s.conf_path}\n"
        f"Configuration: {s.conf_path}, written (mode 0600, atomically) from [virtlog] before each "
        f"start: log_level = {s.get('log-level')}, log_outputs = \"{s.get('log-outputs')}\", "
        f"max_clients = {s.get('max-clients')}, max_size = {s.get('max-size')}, "
        f"max_backups = {s.get('max-backups')}.\n"
        f"Socket: {s.socket} (libvirt fixes it for root)"
        + ("; bound by the supervisor and handed over (socket activation), so clients wait instead of "
           "being refused while virtlogd restarts" if s.activation else "")
        + ". Ready when virtlogd says so (sd_notify).\n"
        "`herd reexec virtlogd` (or `herd reload virtlogd`) makes virtlogd re-execute its binary in "
        "place (SIGUSR1), e.g. after an upgrade: same PID, clients and open logs kept; the action "
        "returns once it answers on its socket again, and `herd status virtlogd` shows when."
    )


def build(t: Table, ctx: BuildContext) -> list[ServiceSpec]:
    """``[virtlog]`` → ``virtlogd``; never raises, never writes."""
    if not t.ok:
        return []
    health = _health.choice(t)  # (before read_settings finishes the table)
    return [_spec(read_settings(t, ctx.settings.state_dir), t.path, health)]


def implied(prefix: str, ctx: BuildContext) -> list[ServiceSpec]:
    """``virtlogd`` with the seed's defaults, for a ``[libvirt]`` without ``[virtlog]``
    (libvirtd's QEMU driver needs it); it runs from libvirt's `prefix`, and its
    errors name ``[libvirt]``'s keys."""
    s = read_settings(Table({}, "virtlog", []), ctx.settings.state_dir)
    spec = _spec(replace(s, prefix=prefix), "libvirt", lambda default: default)
    return [replace(spec, documentation=spec.documentation + "\nBrought along by [libvirt] with the defaults "
                                                            "of [virtlog]; add a [virtlog] table to configure it.",
                    keys=(("command", "libvirt"),))]


def _spec(s: Settings, source: str, health: _health.Choice) -> ServiceSpec:
    impl = Virtlogd(s)
    doc = ("Make virtlogd re-execute its binary in place (SIGUSR1), keeping its clients and open logs, "
           "and wait until it serves again; the PID stays the same.")
    return ServiceSpec(
        name="virtlogd",
        command=(s.binary, "-f", s.conf_path),
        documentation=_documentation(s),
        auto_start=s.auto_start,
        ready=ReadySpec("notify"),
        health=health(_health.libvirt_rpc(s.socket, _health.VIRTLOGD)),
        sockets=s.sockets(),
        actions=(ActionSpec("reexec", doc, impl.reexec),
                 ActionSpec("reload", "The same as reexec (virtlogd has no other way to reload).", impl.reexec)),
        prepare_hook=impl.prepare,
        details_hook=impl.details,
        type_state=impl,
        parameters=(s, render(s)),
        source=source,
        keys=(("command", "libvirt"),),
    )


SERVICE_TYPES = [ServiceType(
    table="virtlog", build=build,
    documentation="virtlogd, libvirt's log daemon for guest consoles (Guix's virtlog-service-type).",
)]
