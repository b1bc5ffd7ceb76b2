"""The settings of ``[ganeti]``: the seed's records with their defaults, and their reading.

Used by ``services/ganeti.py``; the files' part (``file-storage-paths``,
``os``, ``hooks``) is in ``services/_ganeti_files.py``.  Errors are recorded
on the `Table`, each naming its key path; nothing raises for bad input.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from supervisor import Table

from . import _ganeti_files as gfiles

__all__ = ["DAEMON_NAMES", "RAPI_PEM", "SERVER_PEM", "Cleaner", "Confd", "Kvmd", "Metad", "Mond", "Noded", "Rapi",
           "Settings", "Watcher", "Wconfd", "read_settings"]

DATA_DIR = "/var/lib/ganeti"
SERVER_PEM = f"{DATA_DIR}/server.pem"
#: rapi's own certificate, readable by gnt-rapi (Guix's default, server.pem, is not under Debian's users).
RAPI_PEM = f"{DATA_DIR}/rapi.pem"
#: The daemons, in Guix's order.
DAEMON_NAMES = ("noded", "confd", "wconfd", "luxid", "rapi", "kvmd", "mond", "metad")

# -- settings ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Noded:
    ganeti: str = "/usr"
    port: int = 1811
    address: str = "0.0.0.0"
    interface: str | None = None
    max_clients: int = 20
    ssl: bool = True
    ssl_key: str = SERVER_PEM
    ssl_cert: str = SERVER_PEM
    debug: bool = False
    auto_start: bool = True


@dataclass(frozen=True, slots=True)
class Confd:
    ganeti: str = "/usr"
    port: int = 1814
    address: str = "0.0.0.0"
    debug: bool = False
    auto_start: bool = True


@dataclass(frozen=True, slots=True)
class Wconfd:  # also luxid's record
    ganeti: str = "/usr"
    no_voting: bool = False
    debug: bool = False
    auto_start: bool = True


@dataclass(frozen=True, slots=True)
class Rapi:
    ganeti: str = "/usr"
    require_authentication: bool = False
    port: int = 5080
    address: str = "0.0.0.0"
    interface: str | None = None
    max_clients: int = 20
    ssl: bool = True
    ssl_key: str = RAPI_PEM
    ssl_cert: str = RAPI_PEM
    debug: bool = False
    auto_start: bool = True


@dataclass(frozen=True, slots=True)
class Kvmd:
    ganeti: str = "/usr"
    debug: bool = False
    auto_start: bool = True


@dataclass(frozen=True, slots=True)
class Mond:
    ganeti: str = "/usr"
    port: int = 1815
    address: str = "0.0.0.0"
    debug: bool = False
    auto_start: bool = True


@dataclass(frozen=True, slots=True)
class Metad:
    ganeti: str = "/usr"
    port: int = 80
    address: str | None = None
    debug: bool = False
    auto_start: bool = False


@dataclass(frozen=True, slots=True)
class Watcher:
    ganeti: str = "/usr"
    schedule: str = "*/5 * * * *"
    rapi_ip: str | None = None
    job_age: int = 6 * 3600
    verify_disks: bool = True
    debug: bool = False


@dataclass(frozen=True, slots=True)
class Cleaner:
    ganeti: str = "/usr"
    master_schedule: str = "45 1 * * *"
    node_schedule: str = "45 2 * * *"


@dataclass(frozen=True, slots=True)
class Settings:
    """The ``[ganeti]`` table, validated."""

    ganeti: str = "/usr"
    files: gfiles.Files = gfiles.Files()  # noqa: RUF009 (frozen: a shared default is safe)
    noded: Noded = Noded()
    confd: Confd = Confd()
    wconfd: Wconfd = Wconfd()
    luxid: Wconfd = Wconfd()
    rapi: Rapi = Rapi()
    kvmd: Kvmd = Kvmd()
    mond: Mond = Mond()
    metad: Metad = Metad()
    watcher: Watcher = Watcher()
    cleaner: Cleaner = Cleaner()

    def daemon(self, name: str) -> Any:
        return getattr(self, name)


# -- configuration ------------------------------------------------------------------------------

_IFACE_RE = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")


def _q(value: Any) -> str:
    return gfiles._q(value)


def _prefix(t: Table, default: str) -> str:
    value = t.str("ganeti", default, nonempty=True)
    if not value.startswith("/"):
        t.error("ganeti", f"expected the directory Ganeti is installed in (its sbin/ holds the daemons), "
                          f"an absolute path, got {_q(value)}")
        return default
    return value


def _ip(t: Table, key: str, default: str | None) -> str | None:
    if default is None and t.raw(key, None) is False:  # the seed's #f
        return None
    value = t.str(key, default, nonempty=True)
    if value is None or value == default:
        return value
    try:
        ipaddress.ip_address(value)
    except ValueError:
        t.error(key, f"expected an IP address, got {_q(value)}")
        return default
    return value


def _path(t: Table, key: str, default: str) -> str:
    value = t.str(key, default, nonempty=True)
    if not value.startswith("/"):
        t.error(key, f"must be an absolute path, got {_q(value)}")
        return default
    return value


def _interface(t: Table) -> str | None:
    if t.raw("interface", None) is False:  # the seed's #f
        return None
    value = t.str("interface", nonempty=True)
    if value is not None and not _IFACE_RE.match(value):
        t.error("interface", f"expected a network interface name like \"eth0\", got {_q(value)}")
        return None
    return value


def _schedule(t: Table, key: str, default: str) -> str:
    from cronsim import CronSim, CronSimError

    value = t.str(key, default, nonempty=True)
    try:
        CronSim(value, datetime.now().astimezone())
    except (CronSimError, ValueError) as exc:
        t.error(key, f"not a valid cron expression ({exc}): {value!r}")
        return default
    return value


def _port(t: Table, default: int) -> int:
    return t.int("port", default, min=1, max=65535)


def _sub(t: Table, key: str) -> Table:
    sub = t.table(key)
    return sub if sub is not None and sub.ok else Table({}, t.key_path(key), [])


def _read_daemon(name: str, t: Table, prefix: str) -> Any:
    g = _prefix(t, prefix)
    debug = t.bool("debug", False)
    # metad is started on demand (Guix's default); the others start at boot
    auto = {"auto_start": t.bool("auto-start", name != "metad")}
    if name in ("noded", "rapi"):
        defaults = Noded() if name == "noded" else Rapi()
        kw: dict[str, Any] = {
            "ganeti": g, "port": _port(t, defaults.port), "address": _ip(t, "address", "0.0.0.0"),
            "interface": _interface(t), "max_clients": t.int("max-clients", 20, min=1), "ssl": t.bool("ssl", True),
            "ssl_key": _path(t, "ssl-key", defaults.ssl_key), "ssl_cert": _path(t, "ssl-cert", defaults.ssl_cert),
            "debug": debug, **auto}
        if name == "rapi":
            kw["require_authentication"] = t.bool("require-authentication", False)
        conf: Any = (Noded if name == "noded" else Rapi)(**kw)
    elif name in ("confd", "mond"):
        cls = Confd if name == "confd" else Mond
        conf = cls(ganeti=g, port=_port(t, cls().port), address=_ip(t, "address", "0.0.0.0"), debug=debug, **auto)
    elif name in ("wconfd", "luxid"):
        conf = Wconfd(ganeti=g, no_voting=t.bool("no-voting", False), debug=debug, **auto)
    elif name == "kvmd":
        conf = Kvmd(ganeti=g, debug=debug, **auto)
    else:
        conf = Metad(ganeti=g, port=_port(t, 80), address=_ip(t, "address", None), debug=debug, **auto)
    t.finish()
    return conf


def read_settings(t: Table) -> Settings:
    """Validate ``[ganeti]``; errors are recorded on `t`, each naming its key path."""
    prefix = _prefix(t, "/usr")
    files = gfiles.read_files(t)
    daemons = {name: _read_daemon(name, _sub(t, name), "/usr") for name in DAEMON_NAMES}
    w = _sub(t, "watcher")
    watcher = Watcher(ganeti=_prefix(w, "/usr"), schedule=_schedule(w, "schedule", "*/5 * * * *"),
                      rapi_ip=_ip(w, "rapi-ip", None), job_age=w.int("job-age", 6 * 3600, min=0),
                      verify_disks=w.bool("verify-disks", True), debug=w.bool("debug", False))
    w.finish()
    c = _sub(t, "cleaner")
    cleaner = Cleaner(ganeti=_prefix(c, "/usr"), master_schedule=_schedule(c, "master-schedule", "45 1 * * *"),
                      node_schedule=_schedule(c, "node-schedule", "45 2 * * *"))
    c.finish()
    t.finish()
    return Settings(ganeti=prefix, files=files, watcher=watcher, cleaner=cleaner, **daemons)
