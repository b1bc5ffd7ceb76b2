"""The service types' default health checks (docs/configuration.md, `health`).

Each type reads its ``health`` key with `choice` (before its reader calls
``finish()``): absent or ``true`` keeps the type's default check, ``false``
switches it off, a table with a ``type`` replaces it, and one without
changes only the default's ``interval``, ``timeout``, ``failures``,
``start-period`` or ``expect``.  The defaults complete an exchange
with the daemon, not just a connect:

* libvirtd and virtlogd: a call in libvirt's RPC protocol on their socket;
  whatever the daemon answers (even an error, such as libvirtd's
  "authentication required" on a read-only socket that asks for polkit)
  is a reply from its RPC workers, which a hung daemon does not send;
* Ganeti's noded: a TLS handshake on its HTTPS port; confd: a signed ping
  over UDP, answered by confd only when it is working;
* a childhurd: the banner line its SSH server sends on the forwarded port.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import replace

from supervisor.health_config import read_health, read_timing
from supervisor.schema import MISSING, Table
from supervisor.spec import HealthSpec

__all__ = ["choice", "choices", "libvirt_rpc", "LIBVIRTD", "VIRTLOGD", "tls_port", "http_port", "ssh_banner",
           "confd_ping"]

Choice = Callable[[HealthSpec | None], HealthSpec | None]

#: libvirt's RPC programs: (program number, version, a procedure to call).
#: libvirtd: REMOTE_PROC_CONNECT_OPEN (read-only, no name); virtlogd:
#: VIR_LOG_MANAGER_PROTOCOL_PROC_DOMAIN_GET_LOG_FILE_POSITION (no arguments:
#: answered with an error, which is an answer).
LIBVIRTD = (0x20008086, 1, 1, struct.pack(">ii", 0, 1))
VIRTLOGD = (0x87539319, 1, 2, b"")


def choice(t: Table, key: str = "health") -> Choice:
    """Read `key` of a service type's table now; the function it returns
    gives the check, from the type's default."""
    value = t.data.get(key, MISSING) if t.ok else MISSING
    if value is MISSING or value is True:
        t.raw(key)
        return lambda default: default
    if value is False:
        t.raw(key)
        return lambda default: None
    if isinstance(value, dict) and "type" not in value:  # the default check, tuned
        t.raw(key)
        sub = Table(value, t.key_path(key), t.errors)
        tuning = {k: v for k in ("interval", "timeout", "failures", "start-period", "expect")
                  if (v := sub.raw(k)) is not MISSING}
        sub.finish()
        return lambda default: _tuned(t, key, default, tuning)
    spec = read_health(t, key)
    return lambda default: spec


def _tuned(t: Table, key: str, default: HealthSpec | None, tuning: dict[str, object]) -> HealthSpec | None:
    """The type's default check with `tuning` (a ``health`` table without ``type``) applied."""
    if default is None:
        t.error(key, 'this service has no default check: give its "type"')
        return None
    sub = Table(tuning, t.key_path(key), t.errors)
    fields = read_timing(sub, default)
    if "expect" in tuning:
        if default.type == "exec":
            sub.error("expect", "the default check runs a command: it expects no answer")
        elif (expect := sub.str("expect", nonempty=True)) is not None:
            fields["expect"] = expect.encode()
    return replace(default, **fields)


def libvirt_rpc(path: str, program: tuple[int, int, int, bytes], *, interval: float = 30.0) -> HealthSpec:
    """A call in libvirt's RPC protocol on the Unix socket `path`; passes on a
    reply to it (any status)."""
    prog, vers, proc, payload = program
    header = struct.pack(">IIiiIi", prog, vers, proc, 0, 1, 0)  # a CALL, serial 1, status OK
    send = struct.pack(">I", 4 + len(header) + len(payload)) + header + payload
    expect = struct.pack(">IIii", prog, vers, proc, 1)  # its REPLY
    return HealthSpec(type="unix", path=path, send=send, expect=expect, interval=interval, timeout=10.0,
                      failures=3, start_period=0.0)


def tls_port(address: str) -> HealthSpec:
    """An HTTPS port: the server answers a TLS handshake (completed, or
    refused for want of a client certificate, as Ganeti's noded does)."""
    return HealthSpec(type="tcp", address=address, tls=True, interval=30.0, timeout=10.0, failures=3)


def http_port(address: str) -> HealthSpec:
    """A plain HTTP port: an HTTP answer to a request."""
    return HealthSpec(type="tcp", address=address, send=b"GET / HTTP/1.0\r\n\r\n", expect=b"HTTP/",
                      interval=30.0, timeout=10.0, failures=3)


def ssh_banner(address: str, expect: str = "SSH-") -> HealthSpec:
    """An SSH server: its banner line (sent by the server right after the connect)."""
    return HealthSpec(type="tcp", address=address, expect=expect.encode(), interval=30.0, timeout=10.0,
                      failures=3, start_period=120.0)


#: Ganeti's confd ping (``ganeti.confd.client``): a request signed with the
#: cluster's HMAC key and a time stamp, which confd answers signed with the
#: request's `rsalt`; exits 0 on such an answer.
CONFD_PING = r"""
import hashlib, hmac, json, socket, sys, time, uuid
key_file, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
key = open(key_file, encoding="utf-8").read().encode()
def sign(text, salt):
    return hmac.new(key, (salt + text).encode(), hashlib.sha1).hexdigest()
rsalt = uuid.uuid4().hex
msg = json.dumps({"protocol": 1, "type": 0, "rsalt": rsalt})
stamp = "%d" % time.time()
request = b"plj0" + json.dumps({"msg": msg, "salt": stamp, "hmac": sign(msg, stamp)}).encode()
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
for _ in range(3):
    s.sendto(request, (host, port))
    try:
        data = s.recv(65536)
        answer = json.loads(data[4:])
    except (OSError, ValueError):
        continue
    if data[:4] == b"plj0" and answer.get("salt") == rsalt and answer.get("hmac") == sign(answer["msg"], rsalt):
        sys.exit(0)
print("ganeti-confd did not answer the ping", flush=True)
sys.exit(1)
"""


def confd_ping(key_file: str, host: str, port: int) -> HealthSpec:
    """Ganeti's confd: a signed ping over UDP (an exec check: the signature needs the key)."""
    return HealthSpec(type="exec", command=("python3", "-c", CONFD_PING, key_file, host, str(port)),
                      interval=30.0, timeout=10.0, failures=3)


def choices(t: Table, names: tuple[str, ...], key: str = "health") -> dict[str, Choice]:
    """A type with several daemons in one table (Ganeti): ``health = false``
    switches every default check off; ``health = { NAME = … }`` chooses per
    daemon, as `choice` does."""
    value = t.data.get(key, MISSING) if t.ok else MISSING
    if value is MISSING or value is True or value is False:
        one = choice(t, key)
        return {name: one for name in names}
    t.raw(key)
    sub = Table(value, t.key_path(key), t.errors)
    out = {name: choice(sub, name) for name in names}
    sub.finish()
    return out
