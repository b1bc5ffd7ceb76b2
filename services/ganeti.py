"""``[ganeti]``: Guix's ``ganeti-service-type`` (``docs/service-ganeti.md``).

Eight daemons (``ganeti-noded`` … ``ganeti-metad``), each in the foreground
(``-f``) as the user and group Debian's Ganeti expects, ready when its
socket answers, with Ganeti's ``ensure-dirs`` run before each start; three
timers (``ganeti-watcher``, ``ganeti-master-cleaner``,
``ganeti-node-cleaner``); and the files Guix puts under ``/etc/ganeti``
(``services/_ganeti_files.py``).  The settings and their reading are in
``services/_ganeti_settings.py``.  Exit codes that mean "not needed on this
node" (11, 12; 0 for kvmd) are stay-down exits, not crashes.
``services/_ganeti_daemon_util.py`` is the ``daemon-util`` replacement that
routes Ganeti's own starts and stops through the supervisor.
"""

from __future__ import annotations

import functools
import ipaddress
import os
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
    Table,
)
from supervisor.spec import HealthSpec

from . import _ganeti_files as gfiles
from . import _health
from ._ganeti_settings import DAEMON_NAMES, Noded, Rapi, Settings, Wconfd, read_settings

__all__ = ["DAEMONS", "FORCE_NODE_HINT", "SERVICE_TYPES", "TIMERS", "Settings", "daemon_argv", "read_settings"]

RUN_DIR = "/var/run/ganeti"
DATA_DIR = "/var/lib/ganeti"
SOCKET_DIR = f"{RUN_DIR}/socket"
SSCONF_MASTER = f"{DATA_DIR}/ssconf_master_node"
#: Guix's hint file: while it exists, wconfd starts with --force-node.
FORCE_NODE_HINT = f"{DATA_DIR}/guix_wconfd_force_node_hint"
#: The environment of noded, confd, wconfd, luxid, rapi and kvmd (replaced, as Guix does).
DAEMON_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: The daemons in Guix's order: name → (user, group) as Debian's daemon-util runs them.
DAEMONS: dict[str, tuple[str, str]] = {
    "noded": ("root", "root"),
    "confd": ("gnt-confd", "gnt-confd"),
    "wconfd": ("gnt-masterd", "gnt-confd"),
    "luxid": ("gnt-masterd", "gnt-luxid"),
    "rapi": ("gnt-rapi", "gnt-rapi"),
    "kvmd": ("root", "gnt-daemons"),
    "mond": ("root", "root"),
    "metad": ("gnt-metad", "gnt-metad"),
}
assert tuple(DAEMONS) == DAEMON_NAMES
#: Daemons that run on the master node only (they exit 11 or 12 elsewhere).
MASTER_ONLY = ("wconfd", "luxid", "rapi")
#: Guix replaces the environment of these (mond and metad inherit it).
CLEAN_ENV = ("noded", "confd", "wconfd", "luxid", "rapi", "kvmd")
#: Timer name → the user it runs as (Debian's /etc/cron.d/ganeti).
TIMERS: dict[str, str] = {"ganeti-watcher": "root", "ganeti-master-cleaner": "gnt-masterd",
                          "ganeti-node-cleaner": "root"}

DOCS = {
    "noded": "Ganeti's node daemon: the node-local functions of the cluster (RPC from the master).",
    "confd": "Ganeti's configuration query daemon (UDP): fast, highly available answers about the "
             "cluster configuration; active on master candidates.",
    "wconfd": "Ganeti's configuration writer: the authority on the cluster configuration; runs on the "
              "master node only and stops itself elsewhere.",
    "luxid": "Ganeti's query daemon and job queue master (LUXI); runs on the master node only.",
    "rapi": "Ganeti's remote API (HTTP/JSON); runs on the master node only.",
    "kvmd": "Ganeti's KVM daemon: tells user shutdowns of KVM instances from crashes; exits at once when "
            "KVM or user shutdown is not enabled.",
    "mond": "Ganeti's monitoring daemon: runs the data collectors and serves them over HTTP.",
    "metad": "Ganeti's metadata daemon: passes cluster information to instances and OS install scripts "
             "(started on demand).",
}

EXIT_NOT_MASTER = 11
EXIT_NODESETUP = 12


class GanetiError(Exception):
    """A start that cannot go on; the message says why."""


# -- command lines ----------------------------------------------------------------------------


def _bin(conf: Any, program: str) -> str:
    return f"{conf.ganeti.rstrip('/')}/sbin/{program}"


def _debug(conf: Any) -> list[str]:
    return ["--debug"] if conf.debug else []


def _http(conf: Noded | Rapi) -> list[str]:
    args = [f"--port={conf.port}", f"--bind={conf.address}"]
    if conf.interface is not None:
        args.append(f"--interface={conf.interface}")
    args.append(f"--max-clients={conf.max_clients}")
    args.extend([f"--ssl-key={conf.ssl_key}", f"--ssl-cert={conf.ssl_cert}"] if conf.ssl else ["--no-ssl"])
    return args


def _voting(conf: Wconfd) -> list[str]:
    return ["--no-voting", "--yes-do-it"] if conf.no_voting else []


def daemon_argv(settings: Settings, name: str) -> list[str]:
    """The daemon's own argv: Guix's (``guix-reference.md`` §5.2) with ``-f`` after the program."""
    c = settings.daemon(name)
    prog = [_bin(c, f"ganeti-{name}"), "-f"]
    if name == "noded":
        return prog + _http(c) + _debug(c)
    if name == "rapi":
        return prog + (["--require-authentication"] if c.require_authentication else []) + _http(c) + _debug(c)
    if name in ("confd", "mond"):
        return prog + [f"--port={c.port}", f"--bind={c.address}"] + _debug(c)
    if name in ("wconfd", "luxid"):
        return prog + _voting(c) + _debug(c)
    if name == "kvmd":
        return prog + _debug(c)
    if name == "metad":
        return prog + [f"--port={c.port}"] + ([f"--bind={c.address}"] if c.address else []) + _debug(c)
    raise KeyError(name)


#: wconfd's wrapper (Guix's ``wconfd-wrapper``): $1 is the hint file, then the daemon's argv
#: (program, -f, arguments).  With the hint: PROGRAM -f --force-node --no-voting --yes-do-it ARGS.
WCONFD_WRAPPER = ('hint=$1; shift; '
                  'if [ -e "$hint" ]; then prog=$1; fg=$2; shift 2; '
                  'exec "$prog" "$fg" --force-node --no-voting --yes-do-it "$@"; fi; '
                  'exec "$@"')


def service_command(settings: Settings, name: str, hint: str = FORCE_NODE_HINT) -> tuple[str, ...]:
    """The spec's command: the daemon's argv, wrapped for wconfd (the force-node hint)."""
    argv = daemon_argv(settings, name)
    if name == "wconfd":
        return ("/bin/sh", "-c", WCONFD_WRAPPER, "ganeti-wconfd-wrapper", hint, *argv)
    return tuple(argv)


def timer_argv(settings: Settings, name: str) -> list[str]:
    """The timers' commands (``guix-reference.md`` §5.3)."""
    if name == "ganeti-watcher":
        w = settings.watcher
        return ([_bin(w, "ganeti-watcher")] + ([f"--rapi-ip={w.rapi_ip}"] if w.rapi_ip else [])
                + [f"--job-age={w.job_age}"] + ([] if w.verify_disks else ["--no-verify-disks"]) + _debug(w))
    c = settings.cleaner
    return [_bin(c, "ganeti-cleaner"), "master" if name == "ganeti-master-cleaner" else "node"]


def _probe(address: str, port: int) -> str:
    """A "host:port" to probe for a daemon bound to `address` (the wildcard: loopback)."""
    ip = ipaddress.ip_address(address)
    if ip.is_unspecified:
        ip = ipaddress.ip_address("::1" if ip.version == 6 else "127.0.0.1")
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def ready_spec(settings: Settings, name: str) -> ReadySpec:
    """Readiness: the listening socket; the PID file where there is no socket to probe."""
    c = settings.daemon(name)
    pid_file = ReadySpec("pid-file", path=f"{RUN_DIR}/ganeti-{name}.pid")
    if name in ("noded", "rapi"):  # with an interface, the address is the interface's: not known here
        return pid_file if c.interface is not None else ReadySpec("tcp", address=_probe(c.address, c.port))
    if name == "mond":
        return ReadySpec("tcp", address=_probe(c.address, c.port))
    if name == "metad":
        if c.address is not None:
            return ReadySpec("tcp", address=_probe(c.address, c.port))
        return ReadySpec("unix", path=f"{SOCKET_DIR}/ganeti-metad")
    if name == "wconfd":
        return ReadySpec("unix", path=f"{SOCKET_DIR}/ganeti-wconfd")
    if name == "luxid":
        return ReadySpec("unix", path=f"{SOCKET_DIR}/ganeti-query")
    if name == "confd":  # UDP only
        return pid_file
    # kvmd: no socket, and its "not needed" exit 0 would look like a forking daemon's
    # parent exiting to a PID-file readiness check: "started" it is.
    return ReadySpec("started")


def health_spec(settings: Settings, name: str) -> HealthSpec | None:
    """The default health checks: noded's HTTPS port answers a TLS handshake;
    confd answers a signed ping (docs/service-ganeti.md)."""
    c = settings.daemon(name)
    if name == "noded":  # with an interface, the address is the interface's: not known here
        if c.interface is not None:
            return None
        address = _probe(c.address, c.port)
        return _health.tls_port(address) if c.ssl else _health.http_port(address)
    host, _, port = _probe(c.address, c.port).rpartition(":")
    return _health.confd_ping(f"{DATA_DIR}/hmac.key", host.strip("[]"), int(port))


def stay_down(name: str) -> tuple[tuple[int, str], ...]:
    exits = [(EXIT_NOT_MASTER, f"not master: ganeti-{name} runs on the master node only (exit code 11)"),
             (EXIT_NODESETUP, ("cluster configuration incomplete: this node is not (fully) part of a "
                               "Ganeti cluster (exit code 12)"))]
    if name == "kvmd":
        exits.insert(0, (0, ("not needed: ganeti-kvmd runs only when the KVM hypervisor and user shutdown "
                             "are enabled (exit code 0)")))
    return tuple(exits)


# -- the hooks and actions ----------------------------------------------------------------------


class Ganeti:
    """Hooks and actions of one ``[ganeti]`` configuration."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def ensure_dirs(self, name: str) -> str:
        return f"{self.settings.daemon(name).ganeti.rstrip('/')}/lib/ganeti/ensure-dirs"

    async def prepare(self, name: str, spec: ServiceSpec) -> None:
        """Before each start: the files, ``ensure-dirs``, and what the daemon needs.

        Raises:
            GanetiError: a file could not be written, ensure-dirs failed, or
                the daemon is not needed here (a master daemon on a node with no
                cluster).
        """
        try:
            gfiles.write_files(self.settings.files)
        except OSError as exc:
            raise GanetiError(f"cannot write {exc.filename or 'the Ganeti files'}: {exc.strerror or exc}") from None
        ensure = self.ensure_dirs(name)
        try:
            proc = await trio.run_process([ensure], capture_stdout=True, capture_stderr=True, check=False,
                                          stdin=b"")
        except OSError as exc:
            raise GanetiError(f"cannot run {ensure} ({exc.strerror}): is Ganeti installed "
                              f"(Debian's ganeti package)?") from None
        if proc.returncode != 0:
            output = (proc.stderr or proc.stdout).decode(errors="replace").strip().splitlines()[-3:]
            raise GanetiError(f"{ensure} exited with code {proc.returncode}: {' '.join(output)}")
        if name == "metad" and self.settings.metad.port < 1024:
            await self._allow_low_port()
        forced = name == "wconfd" and os.path.exists(FORCE_NODE_HINT)
        if name in MASTER_ONLY and not forced and not os.path.exists(SSCONF_MASTER):
            # Guix lets the daemon find out; its exit 11/12 before the socket is up would count as a
            # failed start with no word of why, so the one certain case is caught here.
            code = EXIT_NODESETUP if name == "rapi" else EXIT_NOT_MASTER
            raise GanetiError(f"not master: this node is not part of a Ganeti cluster ({SSCONF_MASTER} "
                              f"is missing), so ganeti-{name} is not needed here (it would exit {code})")

    async def _allow_low_port(self) -> None:
        """metad as gnt-metad on a port below 1024: the file capability Debian's daemon-util sets."""
        program = os.path.realpath(_bin(self.settings.metad, "ganeti-metad"))
        try:
            proc = await trio.run_process(["setcap", "cap_net_bind_service=+ep", program], capture_stdout=True,
                                          capture_stderr=True, check=False, stdin=b"")
        except OSError as exc:
            raise GanetiError(f"cannot run setcap ({exc.strerror}) to let ganeti-metad bind port "
                              f"{self.settings.metad.port}: install libcap2-bin, or use a port >= 1024") from None
        if proc.returncode != 0:
            raise GanetiError(f"setcap cap_net_bind_service=+ep {program} failed: "
                              f"{proc.stderr.decode(errors='replace').strip()}")

    def details(self, name: str, spec: ServiceSpec) -> dict[str, Any]:
        """For ``herd status ganeti-X``: the node's place in a cluster, as ssconf says."""
        try:
            with open(SSCONF_MASTER, encoding="utf-8", errors="replace") as f:
                master = f.read().strip() or "?"
        except OSError:
            master = None
        user, group = DAEMONS[name]
        out: dict[str, Any] = {
            "master-node": master if master is not None else f"none ({SSCONF_MASTER} is missing: no cluster)",
            "runs-as": f"{user}:{group}",
            "ensure-dirs": self.ensure_dirs(name),
        }
        if name == "wconfd":
            out["force-node-hint"] = os.path.exists(FORCE_NODE_HINT)
        return out

    async def force_start(self, ctx: ActionContext, args: list[Any]) -> Any:
        """``herd force-start ganeti-wconfd``: Guix's action, step by step."""
        if args:
            raise ProtocolError("bad-arguments", "force-start takes no arguments")
        ctx.say("Forcefully starting the wconfd daemon...")
        await ctx.engine.set_enabled(ctx.service, True)
        try:
            os.makedirs(DATA_DIR, exist_ok=True)
            os.close(os.open(FORCE_NODE_HINT, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644))
        except OSError as exc:
            raise GanetiError(f"cannot create {FORCE_NODE_HINT}: {exc.strerror}") from None
        try:
            return await ctx.engine.restart(ctx.service)
        finally:
            try:
                os.unlink(FORCE_NODE_HINT)
            except FileNotFoundError:
                pass


def build(t: Table, ctx: BuildContext) -> list[ServiceSpec]:
    """``[ganeti]`` → eight daemons and three timers; never raises, never writes."""
    if not t.ok:
        return []
    health = _health.choices(t, ("noded", "confd"))  # (before read_settings finishes the table)
    s = read_settings(t)
    impl = Ganeti(s)
    socket_env = ("SUPERVISOR_SOCKET", str(ctx.settings.socket))
    specs = []
    for name, (user, group) in DAEMONS.items():
        clean = name in CLEAN_ENV
        env = (("PATH", DAEMON_PATH), socket_env) if clean else (socket_env,)
        actions: tuple[ActionSpec, ...] = ()
        if name == "wconfd":
            actions = (ActionSpec("force-start", "Forcefully start wconfd even on non-master nodes (dangerous!): "
                                                 "creates the hint file, restarts ganeti-wconfd with --force-node "
                                                 "--no-voting --yes-do-it, then removes the hint.",
                                  impl.force_start),)
        specs.append(ServiceSpec(
            name=f"ganeti-{name}",
            command=service_command(s, name),
            documentation=DOCS[name] + f" Runs as {user}:{group}; `ensure-dirs` runs before each start.",
            auto_start=s.daemon(name).auto_start,
            respawn=True,
            stay_down_exits=stay_down(name),
            user=user,
            group=group,
            environment=tuple(sorted(env)),
            clear_environment=clean,
            ready=ready_spec(s, name),
            health=health[name](health_spec(s, name)) if name in health else None,
            actions=actions,
            prepare_hook=functools.partial(impl.prepare, name),
            details_hook=functools.partial(impl.details, name),
            parameters=(s.daemon(name), s.files),
            source=f"{t.path}.{name}",
        ))
    for name, user in TIMERS.items():
        c = s.watcher if name == "ganeti-watcher" else s.cleaner
        schedule = (c.schedule if name == "ganeti-watcher"
                    else c.master_schedule if name == "ganeti-master-cleaner" else c.node_schedule)
        specs.append(ServiceSpec(
            name=name,
            command=tuple(timer_argv(s, name)),
            documentation="Periodically run a Ganeti maintenance job." + (
                " Runs ganeti-watcher: restarts instances that went down, repairs DRBD, archives old jobs "
                "and checks the daemons (through daemon-util)." if name == "ganeti-watcher"
                else f" Runs ganeti-cleaner {'master' if 'master' in name else 'node'} as {user}."),
            user=user,
            environment=(socket_env,),
            schedule=schedule,
            parameters=c,
            source=f"{t.path}.{'watcher' if name == 'ganeti-watcher' else 'cleaner'}",
        ))
    return specs


SERVICE_TYPES = [ServiceType(
    table="ganeti", build=build,
    documentation="Ganeti's daemons, its watcher and cleaner timers, and its OS variants "
                  "(Guix's ganeti-service-type).",
)]
