"""libvirtd (issue 4): the rendered libvirtd.conf, configuration errors, and the real daemons.

The end-to-end tests run Debian's libvirtd and virtlogd, QEMU and virsh for real,
as root, inside a private mount, network and PID namespace
(``unshare --mount --net --pid``), so that nothing collides with the machine's
own ``/run/libvirt``:

* tmpfs over ``/run`` (libvirt's sockets, PID files and state, the test's
  supervisor sockets), ``/var/lib/libvirt``, ``/var/log/libvirt`` and
  ``/var/cache/libvirt``;
* an overlay over ``/etc`` with a tmpfs upper layer: the tests may delete the
  ``libvirt`` group, install TLS certificates under ``/etc/pki`` or tune
  ``qemu.conf``, and the machine's ``/etc`` stays as it was;
* a network namespace with only ``lo`` (``--listen`` sockets stay private).

The namespace driver (``namespaces.py``) sets that up (`INSIDE`), runs the
supervisor on the test's configuration, waits for its ``READY=1``, runs the
test's own Python steps (with helpers: ``herd``, ``status``, ``virsh``,
``wait_for``, ``ping``), then stops the supervisor and reports in JSON:
the test checks it.  The PID namespace ends every process (guests included)
when the driver exits.

They need root (CI runs as root) and the Debian packages that
``contrib/dev test`` installs: libvirt-daemon-system, libvirt-clients,
qemu-system-x86, openssl, iproute2.  Not root: skipped; root with a package
missing: failed.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import pytest

import namespaces
from helpers import check_config
from services import libvirt
from supervisor import ConfigErrors, Table
from supervisor.config import parse_config

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

#: Inside the namespaces: the private world, and the helpers the test's steps use
#: besides the driver's own (``herd``, ``herd_ok``, ``herd_json``, ``status``, ``run``,
#: ``wait_for``, ``tail``).
INSIDE = r'''
import struct


def setup():
    sh("mount", "-t", "tmpfs", "-o", "mode=755", "tmpfs", "/run")
    for d in ("/var/lib/libvirt", "/var/log/libvirt", "/var/cache/libvirt"):
        os.makedirs(d, exist_ok=True)
        sh("mount", "-t", "tmpfs", "-o", "mode=755", "tmpfs", d)
    os.makedirs("/run/etc-overlay/upper")
    os.makedirs("/run/etc-overlay/work")
    sh("mount", "-t", "overlay", "overlay", "-o",
       "lowerdir=/etc,upperdir=/run/etc-overlay/upper,workdir=/run/etc-overlay/work", "/etc")
    sh("ip", "link", "set", "lo", "up")
    sh("mount", "-t", "sysfs", "sysfs", "/sys")  # this network namespace's devices only
    for argv in spec["setup"]:
        sh(*argv)


def virsh(*args, uri="qemu:///system", timeout=60):
    return run("virsh", "-c", uri, *args, timeout=timeout)


PING = struct.pack(">IIIiiIi", 28, 0x6B656570, 1, 1, 2, 0, 0)


def ping(conn, timeout=5.0):
    """A libvirt keepalive PING on an open connection; True on PONG."""
    conn.settimeout(timeout)
    conn.sendall(PING)
    data = b""
    while len(data) < 28:
        chunk = conn.recv(28 - len(data))
        if not chunk:
            return False
        data += chunk
    return struct.unpack(">IIIiiIi", data)[1:4] == (0x6B656570, 1, 2)


def connect(path):
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(path)
    return c


def reattached(name, timeout=60):
    """Wait until libvirtd answers a QMP query through `name`'s monitor.

    A new libvirtd lists a running guest as soon as it has read its status,
    and only then reconnects to its monitor, holding the domain's job; a
    monitor command waits for that job.  So a `running` answer means the
    new libvirtd has the guest back.  (A destroy before that races the
    reconnection: libvirt kills QEMU first and takes the job after.)"""
    query = '{"execute":"query-status"}'
    return wait_for(lambda: (q := virsh("qemu-monitor-command", name, query))["rc"] == 0
                    and '"running"' in q["out"] and q, timeout, f"libvirtd back on {name}'s monitor")


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
'''


# -- requirements --------------------------------------------------------------------------


NEEDED = {
    "/usr/sbin/libvirtd": "libvirt-daemon",
    "/usr/sbin/virtlogd": "libvirt-daemon",
    "/usr/bin/virsh": "libvirt-clients",
    "/usr/bin/qemu-system-x86_64": "qemu-system-x86",
    "/usr/bin/openssl": "openssl",
}


def require_real_daemons() -> None:
    """Skip (not root) or fail (root: CI has everything), naming what is missing."""
    if os.geteuid() != 0:
        pytest.skip("needs root: libvirtd's QEMU driver and the private mount/network namespaces "
                    "(CI runs as root)")
    missing = [f"{path} (Debian package {pkg})" for path, pkg in NEEDED.items() if not os.access(path, os.X_OK)]
    if subprocess.run(["getent", "passwd", "libvirt-qemu"], capture_output=True).returncode != 0:
        missing.append("the user libvirt-qemu (Debian package libvirt-daemon-system)")
    for tool, pkg in (("unshare", "util-linux"), ("ip", "iproute2"), ("groupdel", "passwd")):
        if shutil.which(tool) is None:
            missing.append(f"{tool} (Debian package {pkg})")
    if missing:
        pytest.fail("missing: " + "; ".join(missing) + " -- run `contrib/dev test` (as root it installs them)")


@pytest.fixture
def real() -> None:
    require_real_daemons()


def drive(tmp_path: Path, config: dict[str, Any] | str, script: str, setup: list[list[str]] | None = None,
          timeout: float = 150) -> namespaces.Run:
    """Run the supervisor on `config` in the private namespaces and `script` there.

    `script` runs with the driver's helpers in scope and records what the test
    checks in ``out["steps"]``; an exception in it fails the test, with the logs.
    """
    return namespaces.drive(tmp_path, config, [{"do": "python", "code": textwrap.dedent(script)}], inside=INSIDE,
                            namespaces=namespaces.unshare("--net"), cwd="/", timeout=timeout, setup=setup or [])


def errors_of(text: str) -> list[str]:
    """The configuration errors of `text`, each as `supervisor --check` prints it
    (in-process: the parametrized cases would each pay for a Python start)."""
    try:
        parse_config(tomllib.loads(text))
    except ConfigErrors as exc:
        return [str(e) for e in exc.errors]
    return []


#: What a test needs to run libvirtd here: no TLS (no certificates), and a
#: socket directory of its own (in the private /run).
LOCAL = {"listen-tls": False, "unix-sock-dir": "/run/lvtest", "auth-unix-rw": "none"}


# -- rendering ----------------------------------------------------------------------------------

#: The file for the seed's defaults: Guix's 51 lines (guix-reference.md §1.2),
#: with this project's deviations (docs/service-libvirt.md): the seed's
#: unix-sock-group "root" and log-outputs "3:stderr", the admin socket 0700, and
#: libvirtd's real names of three keys.
DEFAULT_LINES = """\
listen_tls = 1
listen_tcp = 0
tls_port = "16514"
tcp_port = "16509"
listen_addr = "0.0.0.0"
mdns_adv = 0
mdns_name = "Virtualization Host vm-test"
unix_sock_group = "root"
unix_sock_ro_perms = "0777"
unix_sock_rw_perms = "0770"
unix_sock_admin_perms = "0700"
unix_sock_dir = "/var/run/libvirt"
auth_unix_ro = "polkit"
auth_unix_rw = "polkit"
auth_tcp = "sasl"
auth_tls = "none"
# access_drivers = []
key_file = ""
cert_file = ""
ca_file = ""
crl_file = ""
tls_no_sanity_certificate = 0
tls_no_verify_certificate = 0
# tls_allowed_dn_list = []
# sasl_allowed_username_list = []
tls_priority = "NORMAL"
max_clients = 5000
max_queued_clients = 1000
max_anonymous_clients = 20
min_workers = 5
max_workers = 20
prio_workers = 5
max_requests = 20
max_client_requests = 5
admin_min_workers = 1
admin_max_workers = 5
admin_max_clients = 5
admin_max_queued_clients = 5
admin_max_client_requests = 5
log_level = 3
log_filters = "3:remote 4:event"
log_outputs = "3:stderr"
audit_level = 1
audit_logging = 0
# host_uuid = ""
host_uuid_source = "smbios"
keepalive_interval = 5
keepalive_count = 5
admin_keepalive_interval = 5
admin_keepalive_count = 5
ovs_timeout = 5
""".splitlines()


def rendered(table: dict[str, Any]) -> tuple[list[str], list[str], libvirt.Settings]:
    """(file lines without the header comment, errors, settings) for a [libvirt] table."""
    errors: list[Any] = []
    s = libvirt.read_settings(Table(table, "libvirt", errors), Path("/var/lib/supervisor"),
                              "Virtualization Host vm-test")
    lines = libvirt.render(s).splitlines()
    while lines and lines[0].startswith(("# libvirtd.conf:", "# of libvirtd.")):
        lines.pop(0)
    return lines, [str(e) for e in errors], s


def test_defaults_render_one_line_per_field_in_guix_order() -> None:
    lines, errors, s = rendered({})
    assert lines == DEFAULT_LINES
    assert len(lines) == 51
    # listen_tls = 1, but as in Guix no --listen without listen-tcp: no TLS socket, no certificates read
    assert errors == []
    assert s.command == ("/usr/sbin/libvirtd", "-f", "/var/lib/supervisor/libvirt/libvirtd.conf")
    assert not s.listen and [k.name for k in s.sockets()] == [
        "libvirtd.socket", "libvirtd-ro.socket", "libvirtd-admin.socket"]


@pytest.mark.parametrize(("table", "listen", "network"), [
    ({}, False, []),
    ({"listen-tcp": True}, True, ["libvirtd-tcp.socket", "libvirtd-tls.socket"]),
    ({"listen-tcp": True, "listen-tls": False}, True, ["libvirtd-tcp.socket"]),
    ({"listen": True}, True, ["libvirtd-tls.socket"]),  # TLS without TCP
    ({"listen": True, "listen-tls": False}, True, []),
    ({"listen-tcp": True, "listen": False}, False, []),
])
def test_listen_exactly_when_guix_passes_it(table: dict[str, Any], listen: bool, network: list[str]) -> None:
    """Guix adds --listen when listen-tcp is true; `listen` says it outright (TLS
    without TCP).  With socket activation the supervisor binds those sockets and
    --listen is never passed (libvirtd refuses it beside activation sockets)."""
    _, _, s = rendered({**table, "tls-port": "16555"})
    assert s.command[-1:] != ("--listen",)
    assert [k.name for k in s.sockets()][3:] == network
    addresses = {k.name: k.address for k in s.sockets()}
    if "libvirtd-tls.socket" in network:
        assert addresses["libvirtd-tls.socket"] == "0.0.0.0:16555"
    _, _, v6 = rendered({**table, "listen-addr": "::1", "tcp-port": "ssh"})
    assert all(k.address in ("[::1]:22", "[::1]:16514") for k in v6.sockets()[3:])  # a service name: its port
    _, _, guix = rendered({**table, "socket-activation": False})
    assert guix.sockets() == ()
    assert (guix.command[-1] == "--listen") is listen


def test_seed_example_holds_exactly_its_values_and_the_defaults() -> None:
    lines, _, _ = rendered({"unix-sock-group": "libvirt", "tls-port": "16555"})
    expected = [{"unix_sock_group": 'unix_sock_group = "libvirt"',
                 "tls_port": 'tls_port = "16555"'}.get(line.split(" = ")[0].lstrip("# "), line)
                for line in DEFAULT_LINES]
    assert lines == expected
    assert [a for a, b in zip(lines, DEFAULT_LINES, strict=True) if a != b] == [
        'tls_port = "16555"', 'unix_sock_group = "libvirt"']


def test_values_are_quoted_so_that_libvirt_reads_them_back() -> None:
    lines, errors, _ = rendered({
        "listen-tls": False,
        "mdns-name": 'Host "blue"',  # a double quote: single quotes
        "tls-priority": "it's \"NORMAL\" here",  # both kinds: triple double quotes
        "listen-addr": "::1",
        "access-drivers": ["polkit", "nop"],
        "tls-allowed-dn-list": ['CN="a b"', "C=GB,O=x"],
        "sasl-allowed-usernames": ["admin@EXAMPLE.COM"],
        "host-uuid": "8b2ae9d2-3c4f-4f6e-9a8b-0c1d2e3f4a5b",
        "keepalive-interval": -1,
        "audit-logging": True,
    })
    assert errors == []
    assert """mdns_name = 'Host "blue"'""" in lines
    assert 'tls_priority = """it\'s "NORMAL" here"""' in lines
    assert 'listen_addr = "::1"' in lines
    assert 'access_drivers = ["polkit","nop"]' in lines
    assert """tls_allowed_dn_list = ['CN="a b"',"C=GB,O=x"]""" in lines
    assert 'sasl_allowed_username_list = ["admin@EXAMPLE.COM"]' in lines
    assert 'host_uuid = "8b2ae9d2-3c4f-4f6e-9a8b-0c1d2e3f4a5b"' in lines
    assert "keepalive_interval = -1" in lines and "audit_logging = 1" in lines and "listen_tls = 0" in lines


def test_quote_picks_a_form_without_escapes() -> None:
    from services._libvirt_conf import quote

    assert quote("plain") == '"plain"'
    assert quote("") == '""'
    assert quote('a "b"') == "'a \"b\"'"
    assert quote("back\\slash") == '"back\\slash"'  # no escapes: a backslash is itself
    assert quote("it's \"x\" y") == '"""it\'s "x" y"""'
    assert quote("two\nlines") == '"""two\nlines"""'
    assert quote("it's \"x\" \"\"\" y") is None
    assert quote("it's \"x\"") is None  # would end in \"\"\"\", read as \"\"\" plus a stray quote
    assert quote("nul\0") is None


# -- configuration errors ------------------------------------------------------------------------

OK = 'listen-tls = false\n'


@pytest.mark.parametrize(("toml", "line"), [
    ('tls-port = "0"', "libvirt.tls-port: port 0 is out of range (1-65535)"),
    ('tcp-port = "70000"', "libvirt.tcp-port: port 70000 is out of range (1-65535)"),
    ('tcp-port = "no-such-service"',
     'libvirt.tcp-port: "no-such-service" is neither a port number (1-65535) nor a TCP service name in /etc/services'),
    ('tls-port = "16 514"', 'libvirt.tls-port: expected a port number (1-65535) or a service name, got "16 514"'),
    ("tls-port = true", "libvirt.tls-port: expected a port number or service name (a string), got true"),
    ('unix-sock-ro-perms = "0999"',
     'libvirt.unix-sock-ro-perms: expected an octal permission string like "0770", got "0999"'),
    ('unix-sock-rw-perms = "rwx"',
     'libvirt.unix-sock-rw-perms: expected an octal permission string like "0770", got "rwx"'),
    ('unix-sock-admin-perms = "07777"',
     'libvirt.unix-sock-admin-perms: expected an octal permission string like "0770", got "07777"'),
    ("log-level = 5", "libvirt.log-level: must be at most 4, got 5"),
    ("log-level = 0", "libvirt.log-level: must be at least 1, got 0"),
    ('log-filters = "3:remote 5:event"',
     'libvirt.log-filters: filter "5:event": the level must be 1 (debug) to 4 (error), got "5"'),
    ('log-filters = "remote"', 'libvirt.log-filters: filter "remote" is not of the form LEVEL:NAME (e.g. "3:remote")'),
    ('log-filters = "3:+"', 'libvirt.log-filters: filter "3:+": the name after the level is empty'),
    ('log-outputs = "3:syslog"', 'libvirt.log-outputs: output "3:syslog" must have the form L:syslog:NAME'),
    ('log-outputs = "3:stderr:x"', 'libvirt.log-outputs: output "3:stderr:x" must have the form L:stderr'),
    ('log-outputs = "3:file:libvirtd.log"',
     'libvirt.log-outputs: output "3:file:libvirtd.log": the file must be an absolute path'),
    ('log-outputs = "3:stdout"', ('libvirt.log-outputs: output "3:stdout": unknown destination "stdout" '
                                  "(known: stderr, syslog:NAME, file:PATH, journald)")),
    ('log-outputs = "x:stderr"',
     'libvirt.log-outputs: output "x:stderr": the level must be 1 (debug) to 4 (error), got "x"'),
    ('host-uuid = "11111111-1111-1111-1111-111111111111"',
     'libvirt.host-uuid: "11111111-1111-1111-1111-111111111111": all its bytes are the same (e.g. all one digit), '
     "which libvirtd rejects as not a real UUID"),
    ('host-uuid = "not-a-uuid"',
     'libvirt.host-uuid: expected a UUID like "8b2ae9d2-3c4f-4f6e-9a8b-0c1d2e3f4a5b", got "not-a-uuid"'),
    ('host-uuid-source = "dmi"', 'libvirt.host-uuid-source: expected one of "smbios", "machine-id", got "dmi"'),
    ('auth-tcp = "kerberos"', 'libvirt.auth-tcp: expected one of "none", "sasl", "polkit", got "kerberos"'),
    ('access-drivers = ["selinux"]', 'libvirt.access-drivers[0]: expected one of "polkit", "nop", got "selinux"'),
    ("max-workers = 0", "libvirt.max-workers: must be at least 1, got 0"),
    ("max-clients = -1", "libvirt.max-clients: must be at least 0, got -1"),
    ("audit-level = 3", "libvirt.audit-level: must be at most 2, got 3"),
    ('max-clients = "many"', 'libvirt.max-clients: expected an integer, got "many"'),
    ('unix-sock-dir = "run/libvirt"', 'libvirt.unix-sock-dir: must be an absolute path, got "run/libvirt"'),
    (f'unix-sock-dir = "/{"x" * 90}"',
     f'libvirt.unix-sock-dir: "/{"x" * 90}" is too long: the socket path /{"x" * 90}/libvirt-admin-sock '
     "must fit in 107 bytes"),
    ('key-file = "server.key"',
     'libvirt.key-file: must be an absolute path (or "" for libvirt\'s default), got "server.key"'),
    ('mdns-name = "it\'s \\"x\\" \\"\\"\\""',
     'libvirt.mdns-name: ' + "cannot be written to a libvirt configuration file, whose strings have no escapes: "
     "a value may not contain a NUL character, and one that contains both ' and \" (or a line break) may not "
     'contain """ nor end with "'),
    ('listen-tcp = "yes"', 'libvirt.listen-tcp: expected true or false, got "yes"'),
    ('socket-activation = 1', 'libvirt.socket-activation: expected true or false, got 1'),
    ('listen = "tls"', 'libvirt.listen: expected true or false, got "tls"'),
    ('libvirt = "usr"', 'libvirt.libvirt: must be an absolute path (the installation prefix, e.g. "/usr"), got "usr"'),
    ('mdns = true', ("libvirt.mdns: unknown key (did you mean 'mdns-adv' or 'mdns-name'?) (known keys: access-drivers, admin-keepalive-count, "
                     "admin-keepalive-interval, admin-max-client-requests, admin-max-clients, "
                     "admin-max-queued-clients, admin-max-workers, admin-min-workers, audit-level, audit-logging, "
                     "auth-tcp, auth-tls, auth-unix-ro, auth-unix-rw, auto-start, ca-file, cert-file, crl-file, "
                     "health, host-uuid, host-uuid-source, keepalive-count, keepalive-interval, key-file, libvirt, listen, "
                     "listen-addr, listen-tcp, listen-tls, log-filters, log-level, log-outputs, max-anonymous-clients, "
                     "max-client-requests, max-clients, max-queued-clients, max-requests, max-workers, mdns-adv, "
                     "mdns-name, min-workers, ovs-timeout, prio-workers, requirement, sasl-allowed-usernames, "
                     "socket-activation, tcp-port, tls-allowed-dn-list, tls-no-sanity-cert, tls-no-verify-cert, tls-port, "
                     "tls-priority, unix-sock-admin-perms, unix-sock-dir, unix-sock-group, unix-sock-ro-perms, "
                     "unix-sock-rw-perms)")),
])
def test_bad_value_is_one_line_naming_the_key(toml: str, line: str) -> None:
    assert errors_of(f"[virtlog]\n[libvirt]\n{OK}{toml}\n") == [line]


def test_check_prints_every_error_one_line_each(tmp_path: Path) -> None:
    proc = check_config(tmp_path, '[virtlog]\nlog-level = 0\n[libvirt]\nlisten-tls = false\ntls-port = "0"\n'
                           'log-outputs = "3:stdout"\nbogus = 1\n')
    assert proc.returncode == 1
    assert [line.split(":")[0] for line in proc.stdout.splitlines()] == [
        "virtlog.log-level", "libvirt.tls-port", "libvirt.log-outputs", "libvirt.bogus"]


def test_machine_id_source_needs_a_machine_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = f"[virtlog]\n[libvirt]\n{OK}host-uuid-source = \"machine-id\"\n"
    monkeypatch.setattr(libvirt, "MACHINE_ID", str(tmp_path / "machine-id"))
    assert errors_of(text) == [f'libvirt.host-uuid-source: "machine-id" reads {tmp_path}/machine-id, '
                               "which does not exist"]
    (tmp_path / "machine-id").write_text("0" * 32 + "\n")
    assert errors_of(text) == [f'libvirt.host-uuid-source: "machine-id": {tmp_path}/machine-id does not hold '
                               "a valid UUID"]
    (tmp_path / "machine-id").write_text("8b2ae9d23c4f4f6e9a8b0c1d2e3f4a5b\n")
    assert errors_of(text) == []
    assert errors_of(text + 'host-uuid = "8b2ae9d2-3c4f-4f6e-9a8b-0c1d2e3f4a5c"\n') == []


def test_tls_files_must_exist_when_tls_is_on(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked beyond existing\n")
    proc = check_config(tmp_path, "[virtlog]\n[libvirt]\nlisten-tls = true\nlisten = true\n"
                           f'key-file = "{tmp_path}/nokey.pem"\ncert-file = "{tmp_path}/nocert.pem"\n'
                           f'ca-file = "{ca}"\ncrl-file = "{tmp_path}/crl.pem"\n')
    assert proc.returncode == 1
    tls = "libvirtd listens with TLS (listen-tls and listen are true), but the"
    assert proc.stdout.splitlines() == [
        f"libvirt.key-file: {tls} server key {tmp_path}/nokey.pem does not exist; "
        "create it, name another file, or set listen-tls = false",
        f"libvirt.cert-file: {tls} server certificate {tmp_path}/nocert.pem does not exist; "
        "create it, name another file, or set listen-tls = false",
        f"libvirt.crl-file: {tls} certificate revocation list {tmp_path}/crl.pem does not "
        "exist; create it, name another file, or set listen-tls = false",
    ]
    # off: not needed (libvirtd does not read them)
    proc = check_config(tmp_path, f'[virtlog]\n[libvirt]\nlisten-tls = false\nkey-file = "{tmp_path}/nokey.pem"\n')
    assert proc.returncode == 0, proc


def test_defaults_name_libvirtds_own_tls_files(tmp_path: Path) -> None:
    if all(os.path.exists(p) for p in libvirt.TLS_DEFAULTS.values()):
        pytest.skip("this machine has libvirt's TLS files")
    proc = check_config(tmp_path, "[virtlog]\n[libvirt]\nlisten-tcp = true\n")
    assert proc.returncode == 1
    missing = [k for k, p in libvirt.TLS_DEFAULTS.items() if not os.path.exists(p)]
    assert [line.split(":")[0] for line in proc.stdout.splitlines()] == [f"libvirt.{k}" for k in missing]
    assert f'{libvirt.TLS_DEFAULTS[missing[0]]} (libvirtd\'s default when {missing[0]} is "") does not exist' \
        in proc.stdout


def test_check_lists_the_services_and_libvirtd_requires_virtlogd(tmp_path: Path) -> None:
    proc = check_config(tmp_path, f"[virtlog]\n[libvirt]\n{OK}requirement = [\"helper\"]\n"
                           f'[services.helper]\ncommand = ["/bin/true"]\n')
    assert proc.returncode == 0, proc
    listed = [line.strip() for line in proc.stdout.splitlines()[1:] if not line.strip().startswith("runs:")]
    assert listed == ["helper  requires: -", "libvirtd  requires: virtlogd, helper", "virtlogd  requires: -"]
    assert "runs: /usr/sbin/libvirtd -f " in proc.stdout  # where the rendered file goes


def test_libvirt_alone_brings_virtlogd_with_its_defaults(tmp_path: Path) -> None:
    """[libvirt] alone is complete: virtlogd comes along (with [libvirt]'s prefix);
    an explicit [virtlog] configures it; errors name keys that exist."""
    proc = check_config(tmp_path, "[libvirt]\n")
    assert proc.returncode == 0, proc
    listed = [line.strip() for line in proc.stdout.splitlines()[1:] if not line.strip().startswith("runs:")]
    assert listed == ["libvirtd  requires: virtlogd", "virtlogd  requires: -"]
    config = parse_config(tomllib.loads('[libvirt]\nlibvirt = "/opt/lv"\n'), host_checks=False)
    vl = next(s for s in config.services if s.name == "virtlogd")
    assert vl.command[0] == "/opt/lv/sbin/virtlogd" and "log_level = 3" in vl.parameters[1]
    config = parse_config(tomllib.loads("[libvirt]\n[virtlog]\nlog-level = 1\n"))
    vl = next(s for s in config.services if s.name == "virtlogd")
    assert "log_level = 1" in vl.parameters[1]
    # a [virtlog] that is not a table is one error, not also "virtlogd is provided by no service"
    assert errors_of("virtlog = 5\n[libvirt]\n") == ["virtlog: expected a table, got 5"]
    # a requirement nobody provides: the key is `requirement`
    assert errors_of('[libvirt]\nrequirement = ["nope"]\n') == [
        "libvirt.requirement: 'nope' is provided by no service"]
    # a missing program: the key that decides it (the prefix), for both daemons
    proc = check_config(tmp_path, f'[libvirt]\nlibvirt = "{tmp_path}/none"\n')
    assert proc.returncode == 1
    assert sorted(line.split(":")[0] for line in proc.stdout.splitlines()) == ["libvirt.libvirt", "libvirt.libvirt"]
    assert "(service virtlogd)" in proc.stdout


@pytest.mark.parametrize("toml", ['listen-tls = "yes"', 'listen = "yes"\nlisten-tls = true',
                                  'listen-tcp = 1'])
def test_a_wrong_listen_flag_is_one_error_without_certificate_errors(toml: str) -> None:
    errors = errors_of(f"[libvirt]\n{toml}\n")
    assert len(errors) == 1 and "expected true or false" in errors[0], errors


def test_bad_config_starts_nothing(tmp_path: Path) -> None:
    """The daemon itself refuses a bad value: one line naming the key, no socket, no file."""
    conf = tmp_path / "bad.toml"
    conf.write_text('[virtlog]\n[libvirt]\nlisten-tls = false\nunix-sock-ro-perms = "0999"\n')
    state = tmp_path / "state"
    proc = subprocess.run([PY, "-m", "supervisor", "-c", str(conf), "-s", str(tmp_path / "s"), "--status-socket",
                           str(tmp_path / "r"), "--state-dir", str(state), "--log-dir", str(tmp_path / "log")],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=30)
    assert proc.returncode != 0
    assert 'libvirt.unix-sock-ro-perms: expected an octal permission string like "0770", got "0999"' in proc.stderr
    plain = [line for line in proc.stderr.splitlines() if not line.startswith("{")]  # not the JSON log
    assert [line for line in plain if "unix-sock-ro-perms" in line] == [
        'libvirt.unix-sock-ro-perms: expected an octal permission string like "0770", got "0999"']
    assert not (tmp_path / "s").exists()
    assert not (state / "libvirt" / "libvirtd.conf").exists()


# -- the real daemons ------------------------------------------------------------------------------


def test_virsh_lists_the_test_domain_and_the_read_only_socket_only_reads(tmp_path: Path, real: None) -> None:
    """Socket dir of the test's own, auth-unix-rw = "none"; the libvirt group is missing and created."""
    config = {"virtlog": {}, "libvirt": {**LOCAL, "unix-sock-group": "libvirt"}}
    r = drive(tmp_path, config, """
        S = out["steps"]
        S["group-before"] = run("getent", "group", "libvirt")["rc"]
        S["start"] = herd("start", "libvirtd")
        S["libvirtd"] = status("libvirtd")
        S["virtlogd"] = status("virtlogd")
        S["group-after"] = run("getent", "group", "libvirt")
        S["socks"] = {n: list(os.stat(f"/run/lvtest/{n}")[i] for i in (0, 5))
                      for n in ("libvirt-sock", "libvirt-sock-ro", "libvirt-admin-sock")}
        conf = S["libvirtd"]["command"][2]
        st = os.stat(conf)
        S["conf"] = {"path": conf, "mode": st.st_mode, "uid": st.st_uid, "text": open(conf).read()}
        S["list"] = virsh("list", "--all", uri="test+unix:///default?socket=/run/lvtest/libvirt-sock")
        S["list-ro"] = virsh("list", "--all", uri="test+unix:///default?socket=/run/lvtest/libvirt-sock-ro")
        S["destroy-ro"] = virsh("destroy", "test", uri="test+unix:///default?socket=/run/lvtest/libvirt-sock-ro")
        S["destroy-rw"] = virsh("destroy", "test", uri="test+unix:///default?socket=/run/lvtest/libvirt-sock")
        S["doc"] = herd("doc", "libvirtd")
        S["status-human"] = herd("status", "libvirtd")
    """, setup=[["groupdel", "libvirt"]])
    assert r["group-before"] == 2  # deleted in the private /etc
    assert r["start"]["rc"] == 0, r["start"]
    lv, vl = r["libvirtd"], r["virtlogd"]
    assert lv["state"] == "running" and vl["state"] == "running", r.logs()
    assert lv["requires"] == ["virtlogd"] and lv["ready"] == {"type": "notify"}
    assert lv["command"][0] == "/usr/sbin/libvirtd" and lv["command"][1] == "-f" and len(lv["command"]) == 3
    assert vl["command"][0] == "/usr/sbin/virtlogd" and vl["command"][1] == "-f"

    group = r["group-after"]
    assert group["rc"] == 0, "the libvirt group was not created"
    gid = int(group["out"].split(":")[2])
    socks = r["socks"]
    assert {n: (stat.S_IMODE(m), g) for n, (m, g) in socks.items()} == {
        "libvirt-sock": (0o770, gid), "libvirt-sock-ro": (0o777, gid), "libvirt-admin-sock": (0o700, gid)}

    conf = r["conf"]
    assert stat.S_IMODE(conf["mode"]) == 0o600 and conf["uid"] == 0
    assert conf["path"].endswith("/state/libvirt/libvirtd.conf")
    assert 'unix_sock_dir = "/run/lvtest"' in conf["text"] and 'auth_unix_rw = "none"' in conf["text"]

    listing = r["list"]
    assert listing["rc"] == 0, listing
    assert [line.split() for line in listing["out"].splitlines()[2:] if line.strip()] == [["1", "test", "running"]]
    assert r["list-ro"]["rc"] == 0 and "test" in r["list-ro"]["out"]
    assert r["destroy-ro"]["rc"] != 0 and "read only access prevents virDomainDestroy" in r["destroy-ro"]["err"]
    assert r["destroy-rw"]["rc"] == 0, r["destroy-rw"]

    doc = r["doc"]["out"]
    assert "Run the libvirt daemon (libvirtd)" in doc and conf["path"] in doc and "Requires virtlogd" in doc
    assert "reload" in doc
    human = r["status-human"]["out"]
    assert "It is running since" in human and f"config-file: {conf['path']}" in human
    assert r.out["daemon-exit"] == 0


def test_a_missing_group_other_than_libvirt_fails_the_start(tmp_path: Path, real: None) -> None:
    r = drive(tmp_path, {"virtlog": {}, "libvirt": {**LOCAL, "unix-sock-group": "svtest-nogroup"}}, """
        S = out["steps"]
        S["start"] = herd("start", "libvirtd")
        S["status"] = status("libvirtd")
        S["group"] = run("getent", "group", "svtest-nogroup")["rc"]
        S["conf"] = os.path.exists(S["status"]["command"][2])
    """)
    assert r["start"]["rc"] == 1
    message = "unix-sock-group: the group 'svtest-nogroup' does not exist (only 'libvirt' is created by the service)"
    assert message in r["start"]["err"]
    assert r["status"]["state"] == "stopped" and message in r["status"]["last-failure"]
    assert r["group"] == 2 and r["conf"] is False  # nothing created, nothing written


CERTS = r"""
set -e
mkdir -p /etc/pki/CA /etc/pki/libvirt/private
cd /etc/pki
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=svtest CA" -keyout CA/cakey.pem -out CA/cacert.pem \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/O=svtest/CN=localhost" -keyout libvirt/private/serverkey.pem \
  -out /run/server.csr 2>/dev/null
cat > /run/ext.cnf <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1
EOF
openssl x509 -req -in /run/server.csr -CA CA/cacert.pem -CAkey CA/cakey.pem -CAcreateserial -days 2 \
  -extfile /run/ext.cnf -out libvirt/servercert.pem 2>/dev/null
chmod 600 libvirt/private/serverkey.pem
"""


def test_tls_without_tcp_and_a_quoted_value(tmp_path: Path, real: None) -> None:
    """The seed's example plus `listen = true` (TLS on port 16555 without TCP) and a
    value with quotes: libvirtd parses the file and serves TLS on the socket the
    supervisor bound for it."""
    config = {"virtlog": {}, "libvirt": {"unix-sock-group": "libvirt", "tls-port": "16555", "listen": True,
                                         "mdns-name": 'Virtualization Host "lab"'}}
    r = drive(tmp_path, config, """
        S = out["steps"]
        S["start"] = herd("start", "libvirtd")
        S["libvirtd"] = status("libvirtd")
        S["conf"] = open(S["libvirtd"]["command"][2]).read()
        def port_open(port):
            with socket.socket() as c:
                return c.connect_ex(("127.0.0.1", port)) == 0
        S["tls"] = wait_for(lambda: port_open(16555), 10, "libvirtd's TLS port")
        S["default-tls"] = port_open(16514)
        S["tcp"] = port_open(16509)
        S["uri"] = virsh("uri")  # the default socket, in the private /run; polkit lets root in
        S["s_client"] = run("sh", "-c", "openssl s_client -connect 127.0.0.1:16555 -CAfile /etc/pki/CA/cacert.pem "
                                        "-verify_hostname localhost </dev/null 2>&1 | grep -a 'Verify return code'")
    """, setup=[["groupdel", "libvirt"], ["sh", "-c", CERTS]])
    assert r["start"]["rc"] == 0, f"{r['start']}\n{r.logs()}"
    assert "--listen" not in r["libvirtd"]["command"]  # refused beside activation sockets
    lines = r["conf"].splitlines()
    assert """mdns_name = 'Virtualization Host "lab"'""" in lines
    assert 'tls_port = "16555"' in lines and 'unix_sock_group = "libvirt"' in lines and "listen_tls = 1" in lines
    assert r["tls"] is True and r["default-tls"] is False and r["tcp"] is False
    assert r["uri"]["rc"] == 0 and r["uri"]["out"].strip() == "qemu:///system", r["uri"]
    assert "Verify return code: 0 (ok)" in r["s_client"]["out"], r["s_client"]
    assert "Can't load config file" not in r.logs()


def test_sigkill_respawns_libvirtd_and_stopping_virtlogd_stops_libvirtd_first(tmp_path: Path, real: None) -> None:
    r = drive(tmp_path, {"virtlog": {}, "libvirt": LOCAL}, """
        S = out["steps"]
        herd_ok("start", "libvirtd")
        first = status("libvirtd")
        os.kill(first["pid"], signal.SIGKILL)
        # no PID yet: the exit is seen but not yet handled (still "running")
        again = wait_for(lambda: (s := status("libvirtd"))["state"] == "running"
                         and s["pid"] not in (None, first["pid"]) and s, 20, "libvirtd respawned")
        S["first"], S["again"] = first, again
        uri = "qemu+unix:///system?socket=/run/lvtest/libvirt-sock"
        S["serving"] = wait_for(lambda: virsh("uri", uri=uri)["rc"] == 0, 20, "the respawned libvirtd serving")
        S["stop"] = herd_json("stop", "virtlogd")
        S["after"] = {n: status(n)["state"] for n in ("libvirtd", "virtlogd")}
        S["gone"] = not alive(again["pid"])
    """)
    first, again = r["first"], r["again"]
    assert again["pid"] != first["pid"]
    assert again["last-exit"]["signal"] == "SIGKILL"
    assert len(again["respawns"]) == 1 and again["enabled"] is True
    assert r["serving"] is True
    assert r["stop"]["stopped"] == ["libvirtd", "virtlogd"]
    assert r["after"] == {"libvirtd": "stopped", "virtlogd": "stopped"}
    assert r["gone"] is True


def test_reload_sends_sighup_once_the_drivers_are_ready(tmp_path: Path, real: None) -> None:
    r = drive(tmp_path, {"virtlog": {}, "libvirt": LOCAL}, """
        S = out["steps"]
        herd_ok("start", "libvirtd")
        pid = status("libvirtd")["pid"]
        S["reload"] = herd_json("reload", "libvirtd")
        S["reload-human"] = herd("reload", "libvirtd")
        S["reload-args"] = herd("reload", "libvirtd", "now")
        S["after"] = status("libvirtd")
        S["pid"] = pid
    """)
    assert r["reload"] == {"service": "libvirtd", "pid": r["pid"], "signal": "SIGHUP"}
    assert r["reload-human"]["rc"] == 0 and "Sent SIGHUP to libvirtd" in r["reload-human"]["out"]
    assert r["reload-args"]["rc"] != 0 and "takes no arguments" in r["reload-args"]["err"]
    assert r["after"]["state"] == "running" and r["after"]["pid"] == r["pid"] and r["after"]["respawns"] == []
    assert "Drivers are not initialized, reload ignored" not in r.logs()


DOMAIN = """<domain type='qemu'>
  <name>svtest-tiny</name>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def test_restart_libvirtd_keeps_a_running_guest(tmp_path: Path, real: None) -> None:
    """A QEMU guest (TCG, 32 MiB, no disk: SeaBIOS finds nothing to boot and waits)
    started through libvirt survives `herd restart libvirtd`, and the new
    libvirtd lists it and gets its monitor back."""
    xml = tmp_path / "tiny.xml"
    xml.write_text(DOMAIN)
    r = drive(tmp_path, {"virtlog": {}, "libvirt": {**LOCAL, "unix-sock-dir": "/var/run/libvirt"}}, f"""
        S = out["steps"]
        herd_ok("start", "libvirtd")
        S["create"] = virsh("create", "{xml}", timeout=120)
        assert S["create"]["rc"] == 0, S["create"]
        qemu = int(open("/run/libvirt/qemu/svtest-tiny.pid").read())
        S["qemu"] = qemu
        S["qemu-start"] = open(f"/proc/{{qemu}}/stat").read().rsplit(")", 1)[1].split()[19]
        S["before"] = status("libvirtd")
        S["restart"] = herd_json("restart", "libvirtd")
        S["after"] = status("libvirtd")
        S["list"] = wait_for(lambda: (l := virsh("list"))["rc"] == 0 and "svtest-tiny" in l["out"] and l, 60,
                             "the new libvirtd listing the guest")
        S["monitor"] = reattached("svtest-tiny")
        S["qemu-alive"] = alive(qemu)
        S["qemu-start-after"] = open(f"/proc/{{qemu}}/stat").read().rsplit(")", 1)[1].split()[19]
        S["qemu-pid-after"] = int(open("/run/libvirt/qemu/svtest-tiny.pid").read())
        S["console-log"] = os.path.exists("/var/log/libvirt/qemu/svtest-tiny.log")
        S["destroy"] = virsh("destroy", "svtest-tiny")
        S["qemu-gone"] = wait_for(lambda: not alive(qemu), 10, "QEMU gone after destroy")
    """, setup=[["sh", "-c", "echo 'cgroup_controllers = [ ]' >> /etc/libvirt/qemu.conf"]])
    before, after = r["before"], r["after"]
    assert r["restart"]["stopped"] == ["libvirtd"] and r["restart"]["started"] == ["libvirtd"]
    assert after["state"] == "running" and after["pid"] != before["pid"]
    assert r["qemu-alive"] is True
    assert r["qemu-pid-after"] == r["qemu"] and r["qemu-start-after"] == r["qemu-start"]
    rows = [line.split() for line in r["list"]["out"].splitlines()[2:] if line.strip()]
    assert [row[1:] for row in rows] == [["svtest-tiny", "running"]]
    assert r["console-log"] is True  # written through virtlogd
    assert r["destroy"]["rc"] == 0 and r["qemu-gone"] is True, r["destroy"]


def test_a_sigstopped_libvirtd_is_restarted_by_its_health_check_and_keeps_the_guest(tmp_path: Path,
                                                                                     real: None) -> None:
    """libvirtd's default health check (a read-only RPC on libvirt-sock-ro),
    timed tighter here: a SIGSTOPped libvirtd (its process lives, nothing
    answers) is restarted after `failures` failed checks; its guest keeps
    running (kill-mode "process"), and `virsh list` works again afterwards."""
    xml = tmp_path / "tiny.xml"
    xml.write_text(DOMAIN)
    libvirt = {**LOCAL, "unix-sock-dir": "/var/run/libvirt",
               "health": {"interval": 1, "timeout": 2, "failures": 2}}
    r = drive(tmp_path, {"virtlog": {"health": {"interval": 1}}, "libvirt": libvirt}, f"""
        S = out["steps"]
        herd_ok("start", "libvirtd")
        S["passing"] = wait_for(lambda: (s := status("libvirtd"))["health"]["last-result"] == "passed" and s,
                                30, "a passing health check")
        S["virtlogd-passing"] = wait_for(lambda: (s := status("virtlogd"))["health"]["last-result"] == "passed"
                                         and s, 30, "virtlogd's passing health check")
        S["create"] = virsh("create", "{xml}", timeout=120)
        assert S["create"]["rc"] == 0, S["create"]
        qemu = int(open("/run/libvirt/qemu/svtest-tiny.pid").read())
        S["qemu-start"] = open(f"/proc/{{qemu}}/stat").read().rsplit(")", 1)[1].split()[19]
        before = status("libvirtd")
        os.kill(before["pid"], signal.SIGSTOP)
        S["stopped-at"] = time.time()
        S["after"] = wait_for(lambda: (s := status("libvirtd"))["state"] == "running"
                              and s["pid"] not in (None, before["pid"]) and s, 60, "libvirtd restarted")
        S["restarted-at"] = time.time()
        S["old-gone"] = not alive(before["pid"])
        S["list"] = wait_for(lambda: (l := virsh("list"))["rc"] == 0 and "svtest-tiny" in l["out"] and l, 60,
                             "the new libvirtd listing the guest")
        S["monitor"] = reattached("svtest-tiny")
        S["qemu-alive"] = alive(qemu)
        S["qemu-start-after"] = open(f"/proc/{{qemu}}/stat").read().rsplit(")", 1)[1].split()[19]
        S["virtlogd"] = status("virtlogd")
        S["destroy"] = virsh("destroy", "svtest-tiny")
    """, setup=[["sh", "-c", "echo 'cgroup_controllers = [ ]' >> /etc/libvirt/qemu.conf"]])
    health = r["passing"]["health"]
    assert health["type"] == "unix" and health["path"] == "/var/run/libvirt/libvirt-sock-ro"
    after = r["after"]
    assert "health check failed 2 times in a row" in after["last-failure"]
    assert r["restarted-at"] - r["stopped-at"] >= 1  # two failed checks, an interval apart
    assert r["old-gone"] is True
    assert r["qemu-alive"] is True and r["qemu-start-after"] == r["qemu-start"]
    rows = [line.split() for line in r["list"]["out"].splitlines()[2:] if line.strip()]
    assert [row[1:] for row in rows] == [["svtest-tiny", "running"]]
    assert r["virtlogd-passing"]["health"]["path"] == "/run/libvirt/virtlogd-sock"
    assert r["virtlogd"]["state"] == "running" and r["virtlogd"]["pid"] == r["virtlogd-passing"]["pid"]
    assert r["destroy"]["rc"] == 0


EXAMPLE = ROOT / "contrib" / "examples" / "vm-host.toml"


def test_example_config_is_valid() -> None:
    assert errors_of(EXAMPLE.read_text()) == []


def test_example_config_runs(tmp_path: Path, real: None) -> None:
    """contrib/examples/vm-host.toml as it is (its [supervisor] paths are overridden by flags)."""
    r = drive(tmp_path, EXAMPLE.read_text(), """
        S = out["steps"]
        S["start"] = herd("start", "libvirtd")
        S["status"] = {n: status(n)["state"] for n in ("virtlogd", "libvirtd")}
        S["list"] = virsh("list", "--all")
        S["ro"] = herd("status", ro_socket=True)
        S["conf"] = open(status("libvirtd")["command"][2]).read()
    """)
    assert r["start"]["rc"] == 0, r["start"]
    assert r["status"] == {"virtlogd": "running", "libvirtd": "running"}
    assert r["list"]["rc"] == 0, r["list"]
    assert r["ro"]["rc"] == 0 and "+ libvirtd" in r["ro"]["out"]
    conf = r["conf"].splitlines()
    assert 'auth_unix_rw = "none"' in conf and 'host_uuid_source = "machine-id"' in conf and "listen_tls = 0" in conf


# -- socket activation (issue 18) -----------------------------------------------------------------

RESTART_LOOP = """
    import threading
    S = out["steps"]
    herd_ok("start", "libvirtd")
    uri = "qemu+unix:///system?socket=/run/lvtest/libvirt-sock"
    wait_for(lambda: virsh("list", uri=uri)["rc"] == 0, 30, "libvirtd serving")
    inode = os.stat("/run/lvtest/libvirt-sock").st_ino
    calls, done = [], threading.Event()

    def client():
        while not done.is_set():
            calls.append(virsh("list", uri=uri, timeout=120))

    thread = threading.Thread(target=client)
    thread.start()
    pids = []
    for _ in range(ROUNDS):
        n = len(calls)
        if KILL:  # a crash: the supervisor respawns libvirtd
            old = status("libvirtd")["pid"]
            os.kill(old, signal.SIGKILL)
            wait_for(lambda: (s := status("libvirtd"))["state"] == "running" and s["pid"] not in (None, old),
                     60, "libvirtd respawned")
        else:
            herd_ok("restart", "libvirtd")
        pids.append(status("libvirtd")["pid"])
        wait_for(lambda: len(calls) > n + 1, 60, "virsh calls after the restart")
    done.set()
    thread.join(150)
    S["calls"] = [{k: c[k] for k in ("rc", "err")} for c in calls]
    S["pids"] = pids
    S["same-socket"] = os.stat("/run/lvtest/libvirt-sock").st_ino == inode
"""


@pytest.mark.parametrize(("kill", "rounds"), [(False, 10), (True, 4)], ids=["herd-restart", "sigkill"])
def test_virsh_in_a_loop_is_never_refused_through_ten_restarts(tmp_path: Path, real: None, kill: bool,
                                                               rounds: int) -> None:
    """The supervisor holds libvirtd's sockets: a client that connects while
    libvirtd restarts (or is killed and respawned) waits in the backlog instead
    of being refused."""
    r = drive(tmp_path, {"libvirt": LOCAL},
              f"KILL, ROUNDS = {kill}, {rounds}\n" + textwrap.dedent(RESTART_LOOP), timeout=400)
    assert len(set(r["pids"])) == rounds, r["pids"]
    calls = r["calls"]
    # without activation about a third of the calls fail this way (connection refused, or
    # no socket file at all)
    refused = [c for c in calls if any(w in c["err"].lower() for w in ("refused", "no such file"))]
    assert refused == [], refused[:3]
    # A call whose connection the stopping libvirtd had already accepted ends with it (end
    # of file, reset, "client socket is closed"), as with any restart: with one client, at
    # most one call per restart.  Every other call waited for the new libvirtd.
    failed = [c for c in calls if c["rc"] != 0]
    assert len(failed) <= rounds and len(calls) - len(failed) >= 2 * rounds, failed
    assert r["same-socket"] is True


def test_without_socket_activation_libvirtd_binds_its_own_sockets(tmp_path: Path, real: None) -> None:
    """socket-activation = false: Guix's way (libvirtd binds, so a restart replaces the socket)."""
    r = drive(tmp_path, {"libvirt": {**LOCAL, "socket-activation": False}}, """
        S = out["steps"]
        herd_ok("start", "libvirtd")
        S["before"] = os.stat("/run/lvtest/libvirt-sock").st_ino
        herd_ok("restart", "libvirtd")
        S["after"] = os.stat("/run/lvtest/libvirt-sock").st_ino
        S["list"] = virsh("list", uri="qemu+unix:///system?socket=/run/lvtest/libvirt-sock")
    """)
    assert r["list"]["rc"] == 0, r["list"]
    assert r["before"] != r["after"]


SEED_EXAMPLE = '[libvirt]\nunix-sock-group = "libvirt"\ntls-port = "16555"\n'


@pytest.mark.parametrize("text", [SEED_EXAMPLE, "[libvirt]\n"], ids=["seed-example", "bare"])
def test_seed_example_and_bare_libvirt_check_and_run_without_certificates(
        tmp_path: Path, real: None, text: str) -> None:
    """On a host without libvirt's certificates: `--check` passes, virtlogd and
    libvirtd start, `virsh list` works and a TCG guest starts."""
    if all(os.path.exists(p) for p in libvirt.TLS_DEFAULTS.values()):
        pytest.skip("this machine has libvirt's TLS files")
    proc = check_config(tmp_path, text)
    assert proc.returncode == 0, proc
    xml = tmp_path / "tiny.xml"
    xml.write_text(DOMAIN)
    r = drive(tmp_path, text, f"""
        S = out["steps"]
        S["start"] = herd("start", "libvirtd")
        S["status"] = {{n: status(n)["state"] for n in ("virtlogd", "libvirtd")}}
        S["list"] = virsh("list", "--all")
        S["create"] = virsh("create", "{xml}", timeout=120)
        S["running"] = virsh("list")
        S["tls"] = socket.socket().connect_ex(("127.0.0.1", 16555))
    """, setup=[["groupdel", "libvirt"], ["sh", "-c", "echo 'cgroup_controllers = [ ]' >> /etc/libvirt/qemu.conf"]])
    assert r["start"]["rc"] == 0, f"{r['start']}\n{r.logs()}"
    assert r["status"] == {"virtlogd": "running", "libvirtd": "running"}
    assert r["list"]["rc"] == 0, r["list"]
    assert r["create"]["rc"] == 0, f"{r['create']}\n{r.logs()}"
    assert "svtest-tiny" in r["running"]["out"] and "running" in r["running"]["out"]
    assert r["tls"] != 0  # as in Guix: listen-tls alone opens no port


def test_every_handed_over_socket_is_served(tmp_path: Path, real: None) -> None:
    """libvirt 9.0 takes each socket the supervisor binds: libvirtd's read-write,
    read-only, admin and TCP sockets, virtlogd's two; each keeps the mode (and
    group) of the configuration, and survives a restart of its daemon."""
    config = {"libvirt": {**LOCAL, "listen-tcp": True, "auth-tcp": "none", "listen-addr": "127.0.0.1",
                          "tcp-port": "16599", "unix-sock-admin-perms": "0750"}}
    r = drive(tmp_path, config, """
        S = out["steps"]
        herd_ok("start", "libvirtd")
        def serves():
            return {
                "tcp": virsh("list", uri="test+tcp://127.0.0.1:16599/default")["rc"],
                "ro": virsh("list", uri="test+unix:///default?socket=/run/lvtest/libvirt-sock-ro")["rc"],
                "admin": run("virt-admin", "-c", "libvirtd+unix:///system?socket=/run/lvtest/libvirt-admin-sock",
                             "srv-list")["rc"],
                "virtlogd": run("virt-admin", "-c", "virtlogd+unix:///system?socket=/run/libvirt/virtlogd-admin-sock",
                                "srv-list")["rc"],
            }
        S["first"] = serves()
        S["modes"] = {p: oct(os.stat(p).st_mode & 0o777) for p in (
            "/run/lvtest/libvirt-admin-sock", "/run/libvirt/virtlogd-sock", "/run/libvirt/virtlogd-admin-sock")}
        inodes = [os.stat(p).st_ino for p in ("/run/lvtest/libvirt-sock", "/run/libvirt/virtlogd-sock")]
        herd_ok("restart", "virtlogd")   # stops libvirtd first
        herd_ok("start", "libvirtd")
        S["again"] = wait_for(lambda: (s := serves()) == S["first"] and s, 30, "served after the restart")
        S["same"] = inodes == [os.stat(p).st_ino for p in ("/run/lvtest/libvirt-sock", "/run/libvirt/virtlogd-sock")]
        S["env"] = open(f"/proc/{status('libvirtd')['pid']}/environ").read().split("\\0")
    """)
    assert r["first"] == {"tcp": 0, "ro": 0, "admin": 0, "virtlogd": 0}, r.logs()
    assert r["modes"] == {"/run/lvtest/libvirt-admin-sock": "0o750", "/run/libvirt/virtlogd-sock": "0o600",
                          "/run/libvirt/virtlogd-admin-sock": "0o600"}
    assert r["same"] is True
    names = [e for e in r["env"] if e.startswith("LISTEN_FDNAMES=")]
    assert names == ["LISTEN_FDNAMES=libvirtd.socket:libvirtd-ro.socket:libvirtd-admin.socket:libvirtd-tcp.socket"]


def test_sockets_survive_a_sigkill_of_the_supervisor(tmp_path: Path, real: None) -> None:
    """kill -9 of the supervisor: libvirtd keeps serving on the held sockets; the
    next supervisor takes the same sockets over (the keeper held them) and hands
    them to the next libvirtd."""
    r = drive(tmp_path, {"libvirt": LOCAL}, """
        S = out["steps"]
        uri = "qemu+unix:///system?socket=/run/lvtest/libvirt-sock"
        herd_ok("start", "libvirtd")
        inode = os.stat("/run/lvtest/libvirt-sock").st_ino
        first = status("libvirtd")["pid"]
        daemon.kill()
        daemon.wait()
        S["while-down"] = virsh("list", uri=uri)["rc"]
        os.unlink(notify)
        start_supervisor()
        S["adopted"] = status("libvirtd")["pid"] == first
        herd_ok("restart", "libvirtd")
        S["new-pid"] = status("libvirtd")["pid"] != first
        S["list"] = virsh("list", uri=uri)
        S["same-socket"] = os.stat("/run/lvtest/libvirt-sock").st_ino == inode
    """)
    assert r["while-down"] == 0
    assert r["adopted"] is True and r["new-pid"] is True
    assert r["list"]["rc"] == 0, f"{r['list']}\n{r.logs()}"
    assert r["same-socket"] is True
