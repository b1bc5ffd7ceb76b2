"""Reading the ``respawn-backoff`` and ``health`` keys of a service.

Used by the generic ``[services.NAME]`` reader (`config.py`) and by the
service types under ``services/``, which pass a default check of their own
(`read_health`'s `default`): ``health = false`` switches it off, a table
replaces it.  Errors name the key path, as everywhere (`schema.Table`).
"""

from __future__ import annotations

from typing import Any

from .schema import MISSING, Table, describe
from .spec import Backoff, HealthSpec

__all__ = ["read_backoff", "read_health", "read_timing", "valid_address"]

HEALTH_TYPES = ("tcp", "unix", "udp", "exec")


def valid_address(address: str) -> bool:
    """``host:port`` with a port 1-65535."""
    host, sep, port = address.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def read_backoff(t: Table, key: str = "respawn-backoff") -> Backoff | None:
    """The ``respawn-backoff`` table, or None when absent (errors recorded on `t`)."""
    sub = t.table(key)
    if sub is None or not sub.ok:
        return None
    d = Backoff()
    initial = sub.number("initial", d.initial, min=0, exclusive_min=True)
    factor = sub.number("factor", d.factor, min=1)
    cap = sub.number("max", max(d.max, initial), min=0, exclusive_min=True)
    reset_after = sub.number("reset-after", d.reset_after, min=0, exclusive_min=True)
    sub.finish()
    if cap < initial:
        sub.error("max", f"must be at least initial ({initial:g}), got {describe(cap)}")
        cap = initial
    for other in ("respawn-limit", "respawn-delay"):
        if t.has(other):
            t.error(other, f'does not apply with "{key}" (the backoff sets the delay, '
                           "and never disables the service); remove one of them")
    if t.data.get("respawn") is False:
        t.error(key, 'has no effect with respawn = false')
    return Backoff(initial=initial, factor=factor, max=cap, reset_after=reset_after)


def read_health(t: Table, key: str = "health", *, default: HealthSpec | None = None) -> HealthSpec | None:
    """The ``health`` table: None when absent (then `default`) or ``false``.

    ``true`` keeps a service type's `default` (an error where there is none).
    """
    value = t.raw(key)
    if value is False:
        return None
    if value is True:
        if default is None:
            t.error(key, "this service has no default check: give a table, e.g. "
                         '{ type = "tcp", address = "127.0.0.1:80" }')
        return default
    if value is MISSING:
        return default
    sub = Table(value, t.key_path(key), t.errors)
    if not sub.ok:
        return default
    kind = sub.choice("type", HEALTH_TYPES, None, required=True)
    fields: dict[str, Any] = {}
    if kind in ("tcp", "udp"):
        address = sub.str("address", required=True, nonempty=True)
        if address is not None and not valid_address(address):
            sub.error("address", f'expected "host:port" with a port 1-65535, got {describe(address)}')
        fields["address"] = address
    elif kind == "unix":
        path = sub.str("path", required=True, nonempty=True)
        if path is not None and not path.startswith("/"):
            sub.error("path", f"must be an absolute path, got {describe(path)}")
        fields["path"] = path
    elif kind == "exec":
        command = sub.str_list("command", None, required=True, nonempty=True)
        if command is not None and (not command[0] or ("/" in command[0] and not command[0].startswith("/"))):
            sub.error("command", f"the program {describe(command[0])} must be an absolute path or a bare name")
        fields["command"] = command
    if kind in ("tcp", "unix", "udp"):
        for name in ("send", "expect"):
            text = sub.str(name, nonempty=True)
            fields[name] = text.encode() if text is not None else None
        if kind == "udp" and fields["send"] is None and not sub.has("send"):
            sub.error("send", 'missing; a "udp" check needs a query to send (and may "expect" a reply)')
    if kind == "tcp":
        fields["tls"] = sub.bool("tls", False)
    fields.update(read_timing(sub, HealthSpec(type="exec")))
    sub.finish()
    if kind is None:
        return default
    return HealthSpec(type=kind, **fields)


def read_timing(sub: Table, d: HealthSpec) -> dict[str, Any]:
    """`interval`, `timeout`, `failures` and `start-period` of a ``health``
    table (`d`'s where absent), as `HealthSpec` fields."""
    return {"interval": sub.number("interval", d.interval, min=0, exclusive_min=True),
            "timeout": sub.number("timeout", d.timeout, min=0, exclusive_min=True),
            "failures": sub.int("failures", d.failures, min=1, max=1000),
            "start_period": sub.number("start-period", d.start_period, min=0)}
