"""``[libvirt]``: Guix's ``libvirt-service-type`` → service ``libvirtd`` (``docs/service-libvirt.md``).

Every field of the seed's ``libvirt-configuration``, its type and default.
Before each start the supervisor creates ``unix-sock-dir`` (and the ``libvirt``
group when ``unix-sock-group`` names it and it is missing), then writes
``STATE_DIR/libvirt/libvirtd.conf`` (mode 0600, atomically) and runs
``PREFIX/sbin/libvirtd -f CONF``.  With socket activation (the default) the
supervisor holds libvirtd's sockets (read-write, read-only, admin; TCP and TLS
when it listens) and hands them over; without it, ``--listen`` is passed when
``listen`` is true (by default: ``listen-tcp``, as Guix).  libvirtd is ready
when it says so (sd_notify); a stop signals only libvirtd itself
(``kill-mode = "process"``) so that guests keep running; it requires
``virtlogd``, which a ``[libvirt]`` without ``[virtlog]`` brings along.
``herd reload libvirtd`` sends SIGHUP once the drivers are initialized.
"""

from __future__ import annotations

import grp
import json
import os
import shutil
import signal
import socket
import stat
from dataclasses import dataclass
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
from . import virtlog
from ._libvirt_conf import INT_MAX, UINT_MAX, Field

__all__ = ["FIELDS", "SERVICE_TYPES", "Settings", "read_settings", "render", "TLS_DEFAULTS"]

AUTH = ("none", "sasl", "polkit")
#: The group the service type owns: created (``groupadd --system``) when missing.
OWN_GROUP = "libvirt"
#: libvirtd's built-in TLS files (root), used when the field is "".
TLS_DEFAULTS = {
    "key-file": "/etc/pki/libvirt/private/serverkey.pem",
    "cert-file": "/etc/pki/libvirt/servercert.pem",
    "ca-file": "/etc/pki/CA/cacert.pem",
}
TLS_WHAT = {"key-file": "server key", "cert-file": "server certificate", "ca-file": "CA certificate",
            "crl-file": "certificate revocation list"}
MACHINE_ID = "/etc/machine-id"
#: How long `herd reload libvirtd` waits for the drivers to be initialized.
RELOAD_WAIT = 60.0
_SUN_PATH_MAX = 107  # bytes of a Unix socket path, without the NUL


def _uint(name: str, default: int, lo: int = 0) -> Field:
    return Field(name, "int", default, min=lo, max=UINT_MAX)


def default_mdns_name() -> str:
    return f"Virtualization Host {socket.gethostname()}"


def fields(mdns_name: str) -> tuple[Field, ...]:
    """The seed's ``libvirt-configuration`` fields, in Guix's order (the order of the file)."""
    return (
        Field("listen-tls", "bool", True),
        Field("listen-tcp", "bool", False),
        Field("tls-port", "port", "16514"),
        Field("tcp-port", "port", "16509"),
        Field("listen-addr", "str", "0.0.0.0", min=1),
        Field("mdns-adv", "bool", False),
        Field("mdns-name", "str", mdns_name),
        Field("unix-sock-group", "str", "root", min=1),
        Field("unix-sock-ro-perms", "perms", "0777"),
        Field("unix-sock-rw-perms", "perms", "0770"),
        Field("unix-sock-admin-perms", "perms", "0700"),  # seed: "0777" (see the docs' deviations)
        Field("unix-sock-dir", "path", "/var/run/libvirt"),
        Field("auth-unix-ro", "choice", "polkit", choices=AUTH),
        Field("auth-unix-rw", "choice", "polkit", choices=AUTH),
        Field("auth-tcp", "choice", "sasl", choices=AUTH),
        Field("auth-tls", "choice", "none", choices=AUTH),
        Field("access-drivers", "list", (), choices=("polkit", "nop")),
        Field("key-file", "file", ""),
        Field("cert-file", "file", ""),
        Field("ca-file", "file", ""),
        Field("crl-file", "file", ""),
        Field("tls-no-sanity-cert", "bool", False, key="tls_no_sanity_certificate"),
        Field("tls-no-verify-cert", "bool", False, key="tls_no_verify_certificate"),
        Field("tls-allowed-dn-list", "list", ()),
        Field("sasl-allowed-usernames", "list", (), key="sasl_allowed_username_list"),
        Field("tls-priority", "str", "NORMAL"),
        _uint("max-clients", 5000),
        _uint("max-queued-clients", 1000),
        _uint("max-anonymous-clients", 20),
        _uint("min-workers", 5),
        _uint("max-workers", 20, lo=1),
        _uint("prio-workers", 5),
        _uint("max-requests", 20),
        _uint("max-client-requests", 5),
        _uint("admin-min-workers", 1),
        _uint("admin-max-workers", 5),
        _uint("admin-max-clients", 5),
        _uint("admin-max-queued-clients", 5),
        _uint("admin-max-client-requests", 5),
        Field("log-level", "int", 3, min=1, max=4),
        Field("log-filters", "log-filters", "3:remote 4:event"),
        Field("log-outputs", "log-outputs", "3:stderr"),
        Field("audit-level", "int", 1, min=0, max=2),
        Field("audit-logging", "bool", False),
        Field("host-uuid", "optional-str", ""),
        Field("host-uuid-source", "choice", "smbios", choices=("smbios", "machine-id")),
        Field("keepalive-interval", "int", 5, min=-1, max=INT_MAX),
        _uint("keepalive-count", 5),
        Field("admin-keepalive-interval", "int", 5, min=-1, max=INT_MAX),
        _uint("admin-keepalive-count", 5),
        _uint("ovs-timeout", 5),
    )


FIELDS = fields("Virtualization Host <hostname>")  # for documentation and tests; build uses the real name


@dataclass(frozen=True, slots=True)
class Settings:
    """The ``[libvirt]`` table, validated."""

    values: tuple[tuple[str, Any], ...]
    mdns_default: str
    prefix: str = "/usr"
    requirement: tuple[str, ...] = ()
    auto_start: bool = True
    conf_path: str = ""
    #: ``listen``: whether libvirtd opens its network sockets at all (Guix's
    #: ``--listen``, passed when ``listen-tcp`` is true; the default here too).
    network: bool = False
    #: ``socket-activation``: the supervisor binds the sockets and hands them over.
    activation: bool = True

    def get(self, name: str) -> Any:
        return dict(self.values)[name]

    @property
    def binary(self) -> str:
        return f"{self.prefix.rstrip('/')}/sbin/libvirtd"

    @property
    def tls(self) -> bool:
        """Whether libvirtd really listens with TLS (and so reads its certificates)."""
        return self.network and bool(self.get("listen-tls"))

    @property
    def tcp(self) -> bool:
        return self.network and bool(self.get("listen-tcp"))

    @property
    def listen(self) -> bool:
        """Whether libvirtd has network sockets."""
        return self.tls or self.tcp

    def socket(self, suffix: str = "") -> str:
        return os.path.join(self.get("unix-sock-dir"), f"libvirt{suffix}")

    @property
    def command(self) -> tuple[str, ...]:
        # libvirtd refuses --listen beside activation sockets
        flag = self.network and not self.activation
        return (self.binary, "-f", self.conf_path, *(("--listen",) if flag else ()))

    def sockets(self) -> tuple[SocketSpec, ...]:
        """With socket activation: the sockets, named as libvirt's systemd units name them.

        The Unix sockets get their modes here; their group is set before each
        start (`Libvirtd.prepare`), once the group surely exists.
        """
        if not self.activation:
            return ()
        queued = max(1, self.get("max-queued-clients"))
        out = [SocketSpec("libvirtd.socket", path=self.socket("-sock"),
                          mode=int(self.get("unix-sock-rw-perms"), 8), backlog=queued),
               SocketSpec("libvirtd-ro.socket", path=self.socket("-sock-ro"),
                          mode=int(self.get("unix-sock-ro-perms"), 8), backlog=queued),
               SocketSpec("libvirtd-admin.socket", path=self.socket("-admin-sock"),
                          mode=int(self.get("unix-sock-admin-perms"), 8),
                          backlog=max(1, self.get("admin-max-queued-clients")))]
        for kind, on, port in (("tcp", self.tcp, "tcp-port"), ("tls", self.tls, "tls-port")):
            if on:
                out.append(SocketSpec(f"libvirtd-{kind}.socket", backlog=queued,
                                      address=_host_port(self.get("listen-addr"), self.get(port))))
        return tuple(out)


def _host_port(host: str, port: str) -> str:
    """``host:port`` for the supervisor's TCP socket (a service name → its number)."""
    number = int(port) if port.isdigit() else socket.getservbyname(port, "tcp")
    return f"[{host}]:{number}" if ":" in host else f"{host}:{number}"


# -- validation beyond the field kinds ---------------------------------------------------------


def _uuid_bytes(text: str) -> bytes | None:
    """libvirt's ``virUUIDParse``: 16 hex pairs, '-' or ' ' allowed between pairs."""
    cur = text.lstrip()
    out = bytearray()
    i = 0
    while len(out) < 16:
        if i >= len(cur):
            return None
        if cur[i] in "- ":
            i += 1
            continue
        pair = cur[i:i + 2]
        if len(pair) < 2 or any(c not in "0123456789abcdefABCDEF" for c in pair):
            return None
        out.append(int(pair, 16))
        i += 2
    return bytes(out) if not cur[i:].strip() else None


def _check_host_uuid(t: Table, value: str) -> None:
    if not value:
        return
    raw = _uuid_bytes(value)
    if raw is None:
        t.error("host-uuid", f'expected a UUID like "8b2ae9d2-3c4f-4f6e-9a8b-0c1d2e3f4a5b", got {json.dumps(value)}')
    elif len(set(raw)) == 1:
        t.error("host-uuid", f"{json.dumps(value)}: all its bytes are the same (e.g. all one digit), "
                             "which libvirtd rejects as not a real UUID")


def _check_machine_id(t: Table, values: dict[str, Any]) -> None:
    """host-uuid-source = "machine-id" (and no host-uuid): libvirtd exits unless it reads one."""
    if values["host-uuid-source"] != "machine-id" or values["host-uuid"]:
        return
    try:
        with open(MACHINE_ID, encoding="ascii", errors="replace") as f:
            text = f.read().strip()
    except (FileNotFoundError, NotADirectoryError):
        t.error("host-uuid-source", f'"machine-id" reads {MACHINE_ID}, which does not exist')
        return
    except OSError:
        return
    raw = _uuid_bytes(text)
    if raw is None or len(set(raw)) == 1:
        t.error("host-uuid-source", f'"machine-id": {MACHINE_ID} does not hold a valid UUID')


def _check_tls_files(t: Table, values: dict[str, Any], network: bool) -> None:
    """When libvirtd listens with TLS, it exits at start unless its key, certificate and CA exist."""
    if not (network and values["listen-tls"]):
        return
    for key in ("key-file", "cert-file", "ca-file", "crl-file"):
        named = values[key]
        path = named or TLS_DEFAULTS.get(key)
        if path is None:  # no CRL named: none is loaded
            continue
        try:
            os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            whose = "" if named else f' (libvirtd\'s default when {key} is "")'
            t.error(key, f"libvirtd listens with TLS (listen-tls and listen are true), but the "
                         f"{TLS_WHAT[key]} {path}{whose} does not exist; create it, name another "
                         "file, or set listen-tls = false")
        except OSError:
            pass  # e.g. not readable by this user (supervisor --check as non-root): libvirtd runs as root


def read_settings(t: Table, state_dir: Path, mdns_default: str | None = None, *,
                  host_checks: bool = True) -> Settings:
    """Validate the table; errors are recorded on `t`, each naming its key path.

    Without `host_checks`, the files libvirtd reads here (the machine id, the
    TLS files) are not looked for.
    """
    mdns_default = mdns_default if mdns_default is not None else default_mdns_name()
    values = conf.read_fields(t, fields(mdns_default))
    prefix = t.str("libvirt", "/usr", nonempty=True)
    conf.check_prefix(t, "libvirt", prefix)
    requirement = t.str_list("requirement", ())
    for i, name in enumerate(requirement):
        if not name or name == "virtlogd":
            t.error(f"requirement[{i}]", "must name another service (libvirtd always requires virtlogd)"
                    if name else "must not be empty")
    auto_start = t.bool("auto-start", True)
    network = t.bool("listen", values["listen-tcp"])
    activation = t.bool("socket-activation", True)
    t.finish()
    _check_host_uuid(t, values["host-uuid"])
    sock_dir = values["unix-sock-dir"]
    if len(os.fsencode(os.path.join(sock_dir, "libvirt-admin-sock"))) > _SUN_PATH_MAX:
        t.error("unix-sock-dir", f"{json.dumps(sock_dir)} is too long: the socket path "
                                 f"{sock_dir.rstrip('/')}/libvirt-admin-sock must fit in {_SUN_PATH_MAX} bytes")
    if host_checks:
        _check_machine_id(t, values)
        # a wrong listen flag is reported as itself: no certificate errors follow from it
        if all(isinstance(t.raw(k, False), bool) for k in ("listen-tls", "listen-tcp", "listen")):
            _check_tls_files(t, values, network)
    path = Path(os.path.abspath(state_dir)) / "libvirt" / "libvirtd.conf"
    return Settings(values=tuple(values.items()), mdns_default=mdns_default, prefix=prefix,
                    requirement=tuple(n for n in requirement if n and n != "virtlogd"),
                    auto_start=auto_start, conf_path=str(path), network=network, activation=activation)


def render(s: Settings) -> str:
    """``libvirtd.conf``: one line per field in Guix's order (see `conf.render`)."""
    header = ("libvirtd.conf: written by the supervisor from the [libvirt] table before each start\n"
              "of libvirtd. Edits here are overwritten.")
    return conf.render(fields(s.mdns_default), dict(s.values), header)


# -- the service ------------------------------------------------------------------------------


async def ensure_group(name: str) -> None:
    """The socket group must exist; the ``libvirt`` group is created when missing.

    Raises:
        RuntimeError: another group is missing, or groupadd failed.
    """
    try:
        grp.getgrnam(name)
        return
    except KeyError:
        pass
    if name.isascii() and name.isdigit():
        return  # a gid: libvirtd takes it as it is
    if name != OWN_GROUP:
        raise RuntimeError(f"unix-sock-group: the group {name!r} does not exist (only {OWN_GROUP!r} is "
                           "created by the service)")
    groupadd = shutil.which("groupadd", path="/usr/sbin:/usr/bin:/sbin:/bin")
    if groupadd is None:
        raise RuntimeError(f"unix-sock-group: the group {name!r} does not exist and groupadd was not found")
    proc = await trio.run_process([groupadd, "--system", name], check=False, capture_stdout=True,
                                  capture_stderr=True, stdin=b"")
    # The result is the group itself: the supervisor may reap the helper's exit
    # status before trio reads it, so its return code is not trusted alone.
    try:
        grp.getgrnam(name)
    except KeyError:
        err = proc.stderr.decode(errors="replace").strip()
        raise RuntimeError(f"unix-sock-group: could not create the group {name!r} with groupadd --system"
                           + (f": {err}" if err else "")) from None


def _group_sockets(spec: ServiceSpec, group: str) -> None:
    """Give the supervisor's Unix sockets (socket activation) the socket group,
    as libvirtd does to the sockets it binds itself.  Only socket files are
    touched, never through a symlink."""
    gid = int(group) if group.isascii() and group.isdigit() else grp.getgrnam(group).gr_gid
    for sock in spec.sockets:
        if sock.path is None:
            continue
        try:
            if stat.S_ISSOCK(os.lstat(sock.path).st_mode):
                os.chown(sock.path, -1, gid, follow_symlinks=False)
        except FileNotFoundError:
            pass  # not bound: the start fails with the supervisor's reason


class Libvirtd:
    """Hooks and actions of one ``[libvirt]`` configuration."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def prepare(self, spec: ServiceSpec) -> None:
        """Before each start: the group, the socket directory, log directories, the file."""
        s = self.settings
        await ensure_group(s.get("unix-sock-group"))
        _group_sockets(spec, s.get("unix-sock-group"))
        conf.make_dirs([s.get("unix-sock-dir"),
                        *(os.path.dirname(p) for p in conf.file_outputs(s.get("log-outputs")))])
        conf.write_private(Path(s.conf_path), render(s))

    async def reload(self, ctx: ActionContext, args: list[Any]) -> Any:
        """Wait until libvirtd's drivers are up (it serves clients only then), then SIGHUP."""
        if args:
            raise ProtocolError("bad-arguments", f"{ctx.service} reload takes no arguments")
        if ctx.pid is None:
            raise RuntimeError(f"{ctx.service} is not running")
        sock = self.settings.socket("-sock")
        try:
            proc = conf.Pidfd(ctx.pid)
        except ProcessLookupError:
            raise RuntimeError(f"{ctx.service} (PID {ctx.pid}) is not running") from None
        with proc:
            try:
                with trio.fail_after(RELOAD_WAIT):
                    await conf.wait_serving(sock, proc)
            except trio.TooSlowError:
                raise RuntimeError(f"libvirtd (PID {proc.pid}) did not serve on {sock} within "
                                   f"{RELOAD_WAIT:g} s; SIGHUP not sent") from None
            except conf.DaemonGone:
                raise RuntimeError(f"libvirtd (PID {proc.pid}) exited; SIGHUP not sent") from None
            proc.signal(signal.SIGHUP)
        ctx.say(f"Sent SIGHUP to libvirtd (PID {proc.pid}): its drivers reload their configuration "
                "(guests, networks, storage pools). Changes to [libvirt] itself take effect at "
                "`herd restart libvirtd`, which leaves running guests alone.")
        return {"service": ctx.service, "pid": proc.pid, "signal": "SIGHUP"}

    def details(self, spec: ServiceSpec) -> dict[str, Any]:
        s = self.settings
        return {
            "config-file": s.conf_path,
            "sockets": [s.socket("-sock"), s.socket("-sock-ro"), s.socket("-admin-sock")],
            "socket-group": s.get("unix-sock-group"),
            "socket-activation": s.activation,
            "network": _network(s),
        }


def _network(s: Settings) -> str:
    nets = [f"{kind} on {s.get('listen-addr')}:{s.get(port)}"
            for kind, on, port in (("TLS", s.tls, "tls-port"), ("TCP", s.tcp, "tcp-port")) if on]
    return ", ".join(nets) or "Unix sockets only"


def _documentation(s: Settings) -> str:
    if s.listen:
        net = "network sockets: " + _network(s)
    elif s.network:
        net = "no network sockets (listen-tls and listen-tcp are false)"
    else:
        net = "no network sockets (listen is false; it defaults to listen-tcp, as in Guix)"
    how = ("The supervisor binds these sockets and hands them over (socket activation): clients wait, "
           "instead of being refused, while libvirtd restarts." if s.activation
           else "libvirtd binds these sockets itself (socket-activation = false).")
    return (
        "Run the libvirt daemon (libvirtd), which manages virtual machines.\n"
        f"Command: {' '.join(s.command)}\n"
        f"Configuration: {s.conf_path}, written (mode 0600, atomically) from [libvirt] before each start.\n"
        f"Sockets: {s.socket('-sock')} (read-write, {s.get('unix-sock-rw-perms')}, group "
        f"{s.get('unix-sock-group')}, auth {s.get('auth-unix-rw')}), {s.socket('-sock-ro')} (read-only, "
        f"{s.get('unix-sock-ro-perms')}, auth {s.get('auth-unix-ro')}), {s.socket('-admin-sock')} (admin, "
        f"{s.get('unix-sock-admin-perms')}); {net}. {how}\n"
        "Requires virtlogd (the QEMU driver cannot start a guest without it). Ready when libvirtd "
        "says so (sd_notify). Stop and restart signal libvirtd only, so running guests keep running "
        "and the next libvirtd reconnects to them.\n"
        "`herd reload libvirtd` waits until the drivers are initialized, then sends SIGHUP (the "
        "drivers reload guests, networks and pools; libvirtd.conf is read at start only)."
    )


def build(t: Table, ctx: BuildContext) -> list[ServiceSpec]:
    """``[libvirt]`` → ``libvirtd``, and ``virtlogd`` with its defaults when the
    file has no ``[virtlog]`` of its own; never raises, never writes."""
    if not t.ok:
        return []
    health = _health.choice(t)  # (before read_settings finishes the table)
    s = read_settings(t, ctx.settings.state_dir, host_checks=ctx.host_checks)
    impl = Libvirtd(s)
    path = ":".join(dict.fromkeys([f"{s.prefix.rstrip('/')}/sbin", f"{s.prefix.rstrip('/')}/bin",
                                   "/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]))
    implied = [] if "virtlog" in ctx.tables else virtlog.implied(s.prefix, ctx)
    return [ServiceSpec(
        name="libvirtd",
        command=s.command,
        requires=("virtlogd", *s.requirement),
        documentation=_documentation(s),
        auto_start=s.auto_start,
        environment=(("PATH", path),),
        clear_environment=True,
        kill_mode="process",
        ready=ReadySpec("notify"),
        health=health(_health.libvirt_rpc(s.socket("-sock-ro"), _health.LIBVIRTD)),
        sockets=s.sockets(),
        actions=(ActionSpec("reload", "Once libvirtd's drivers are initialized, send it SIGHUP (they reload "
                                      "guests, networks and pools; libvirtd.conf is read at start only).",
                            impl.reload),),
        prepare_hook=impl.prepare,
        details_hook=impl.details,
        parameters=(s, render(s)),
        source=t.path,
        keys=(("command", "libvirt"), ("requires", "requirement")),
    ), *implied]


SERVICE_TYPES = [ServiceType(
    table="libvirt", build=build,
    documentation="libvirtd, the libvirt virtualization daemon (Guix's libvirt-service-type).",
)]
