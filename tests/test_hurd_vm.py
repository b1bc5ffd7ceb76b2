"""hurd-vm / childhurd (issue 6): configuration, QEMU argv, the secret-service
protocol, and the real thing (QEMU under TCG with the test guest).

Layers, quickest first:

1. ``[[hurd-vm]]`` tables → specs: names, defaults, errors, the exact argv
   (written out by hand here, as ``docs/service-hurd-vm.md`` documents it).
2. The host side of the secret service (``services/_secret_service.py``)
   against a guest written here from Guix's ``secret-service-receive-secrets``
   (hello, one S-expression, exact byte counts), and against the test guest's
   own ``secretd`` (compiled from ``contrib/guest/secretd.c``) run on the host.
3. A real daemon with real QEMU (``qemu-system-x86_64``, TCG: ``kvm = false``)
   booting the test guest (``contrib/guest/build``: a Debian kernel and a busybox
   initramfs): handshake as readiness, the installed files reported on the SSH
   port, two instances, a guest that never answers, QMP power-down on stop,
   also after a re-exec and after a SIGKILL of the supervisor (the guest's
   console ticks every 100 ms: no line lost or doubled across the crash).

The QEMU tests need qemu-system-x86, qemu-utils, gcc, libc6-dev, cpio and the
guest (``contrib/dev test`` installs and builds them, as root).  Without them
they skip when not root and fail as root (CI runs as root).
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import re
import shlex
import shutil
import socket
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio
from helpers import (Deadline, Supervisor, count_resumed, crash, need, python_for_other_users, restart,
                     run_supervisor, wait_running, wait_until)
from test_lifecycle_crash import log_files

from services import _secret_service as ss
from services import hurd_vm
from supervisor import ConfigErrors
from supervisor.config import parse_config

ROOT = Path(__file__).resolve().parents[1]
QEMU = "/usr/bin/qemu-system-x86_64"
#: The guests written here run in the test process: it is the recipient.
ME = os.getpid()
STATE = Path("/var/lib/sv-test")


def parse(*tables: dict[str, Any]) -> dict[str, Any]:
    """Build ``[[hurd-vm]]`` tables in-process → {name: spec}."""
    config = parse_config({"hurd-vm": list(tables)}, overrides={"state_dir": STATE})
    return {s.name: s for s in config.services}


def errors(*tables: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigErrors) as info:
        parse(*tables)
    return [str(e) for e in info.value.errors]


# ---------------------------------------------------------------------------------------
# 1. configuration and the argv


def net(id_: int) -> list[str]:
    return ["--device", "rtl8139,netdev=net0", "--netdev",
            (f"user,id=net0,hostfwd=tcp:127.0.0.1:{11004 + 1000 * id_}-:1004,"
             f"hostfwd=tcp:127.0.0.1:{10022 + 1000 * id_}-:22,hostfwd=tcp:127.0.0.1:{15900 + 1000 * id_}-:5900")]


QMP_ARGS = ["-chardev", "socket,id=qmp,fd=3,server=on,wait=off", "-mon", "chardev=qmp,mode=control"]


def test_default_argv_is_guix_plus_qmp_and_vnc() -> None:
    specs = parse({"qemu": QEMU, "image": "/srv/hurd.img", "kvm": False})
    spec = specs["hurd-vm"]
    assert spec.provides == ("childhurd",)
    assert list(spec.command) == [
        "/usr/bin/qemu-system-x86_64", "-m", "512",
        "--device", "rtl8139,netdev=net0",
        "--netdev", ("user,id=net0,hostfwd=tcp:127.0.0.1:11004-:1004,hostfwd=tcp:127.0.0.1:10022-:22,"
                     "hostfwd=tcp:127.0.0.1:15900-:5900"),
        "--snapshot",
        "--hda", "/srv/hurd.img",
        "--no-reboot",
        "-chardev", "socket,id=qmp,fd=3,server=on,wait=off", "-mon", "chardev=qmp,mode=control",
        "-vnc", "127.0.0.1:0",
    ]
    assert spec.user == "childhurd" and spec.group == "kvm"
    assert spec.clear_environment and spec.environment == (("TMPDIR", "/tmp"),)
    assert [(s.name, s.path, s.mode) for s in spec.sockets] == [("qmp", f"{STATE}/hurd-vm.qmp", 0o600)]
    assert spec.ready_hook is not None and spec.stop_hook is not None and spec.prepare_hook is not None
    assert spec.respawn


def test_argv_with_id_overlay_options_and_kvm() -> None:
    specs = parse({"id": 3, "qemu": QEMU, "image": "/srv/hurd.img", "disk-size": "5G", "memory-size": 1024,
                   "options": ["-smp", "2"], "kvm": True})
    spec = specs["hurd-vm3"]
    assert spec.provides == ("childhurd3",)
    assert list(spec.command) == [
        QEMU, "-m", "1024", *net(3), "-smp", "2", "--hda", f"{STATE}/hurd-vm3/disk.qcow2", "--no-reboot",
        *QMP_ARGS, "-vnc", "127.0.0.1:3", "--enable-kvm"]


def test_no_image_no_disk_and_own_net_options() -> None:
    specs = parse({"id": 1, "qemu": QEMU, "kvm": False, "options": ["-kernel", "/k"], "vnc-display": 42,
                   "net-options": ["--netdev", "user,id=n,hostfwd=tcp:127.0.0.1:2222-:22",
                                   "--device", "e1000,netdev=n"]})
    assert list(specs["hurd-vm1"].command) == [
        QEMU, "-m", "512", "--netdev", "user,id=n,hostfwd=tcp:127.0.0.1:2222-:22", "--device", "e1000,netdev=n",
        "-kernel", "/k", "--no-reboot", *QMP_ARGS, "-vnc", "127.0.0.1:42"]


def test_kvm_auto_follows_dev_kvm() -> None:
    specs = parse({"qemu": QEMU, "image": "/srv/hurd.img"})
    usable = hurd_vm.kvm_usable("kvm", "childhurd")
    assert ("--enable-kvm" in specs["hurd-vm"].command) == usable


def test_two_instances_side_by_side() -> None:
    specs = parse({"id": 1, "qemu": QEMU, "kvm": False, "image": "/a"}, {"id": 2, "qemu": QEMU, "kvm": False,
                                                                          "image": "/b"})
    assert sorted(specs) == ["hurd-vm1", "hurd-vm2"]
    assert specs["hurd-vm2"].provides == ("childhurd2",)
    assert "hostfwd=tcp:127.0.0.1:12022-:22" in specs["hurd-vm2"].command[6]


def test_defaults_follow_the_seed() -> None:
    from supervisor import Table
    problems: list[Any] = []
    s = hurd_vm.read_settings(Table({}, "hurd-vm[0]", problems))
    # the seed's image is Guix's Hurd image, built by Guix: here one must be named
    assert [e.path for e in problems] == ["hurd-vm[0].image"]
    assert (s.memory_size, s.options, s.secret_root, s.disk_size, s.id) == (
        512, ("--snapshot",), "/etc/childhurd", "guess", None)
    assert (s.handshake_timeout, s.connect_retries) == (180.0, 60)


@pytest.mark.parametrize(("tables", "expected"), [
    ([{"id": 0}], "hurd-vm[0].id: must be at least 1, got 0"),
    ([{"id": "1"}], 'hurd-vm[0].id: expected an integer, got "1"'),
    ([{"image": "hurd.img"}], 'hurd-vm[0].image: must be an absolute path, got "hurd.img"'),
    ([{"disk-size": "5X", "image": "/a"}],
     'hurd-vm[0].disk-size: expected "guess", a size in bytes or a size like "5G", got "5X"'),
    ([{"disk-size": "5G", "image": None}], 'hurd-vm[0].disk-size: needs "image" (the overlay is backed by it)'),
    ([{"kvm": "yes"}], 'hurd-vm[0].kvm: expected "auto", true or false, got "yes"'),
    ([{"memory-size": 0}], "hurd-vm[0].memory-size: must be at least 1, got 0"),
    ([{"options": "--snapshot"}], 'hurd-vm[0].options: expected an array of strings, got "--snapshot"'),
    ([{"secret-root": "etc/childhurd"}], 'hurd-vm[0].secret-root: must be an absolute path, got "etc/childhurd"'),
    ([{"qemu": "bin/qemu"}], 'hurd-vm[0].qemu: expected an absolute path or a program name on PATH, got "bin/qemu"'),
    ([{"os": "hurd"}], ("hurd-vm[0].os: unknown key (known keys: auto-start, connect-retries, disk-size, "
                        "generate-host-keys, group, handshake-timeout, health, id, image, kvm, memory-size, "
                        "net-options, options, powerdown-timeout, qemu, requires, secret-root, user, vnc-display)")),
    ([{"id": 1}, {"id": 1}],
     "hurd-vm[1].id: instance hurd-vm1 is defined twice (also at hurd-vm[0]); give each [[hurd-vm]] its own id"),
    # a wrong id is one error: no "defined twice" beside an instance without one
    ([{"id": 0}, {}], "hurd-vm[0].id: must be at least 1, got 0"),
    ([{}, {"id": 0}], "hurd-vm[1].id: must be at least 1, got 0"),
    # ... and what requires a wrong instance gets no "provided by no service"
    ([{"id": 2, "memory-size": 0}, {"requires": ["hurd-vm2"]}], "hurd-vm[0].memory-size: must be at least 1, got 0"),
    ([{"image": None, "options": ["--snapshot"]}],
     "hurd-vm[0].image: QEMU would have nothing to boot: give image (the disk image to boot), or a kernel or a "
     'drive in options (e.g. ["-kernel", "/boot/vmlinuz", "-initrd", "/boot/initrd"] or '
     '["-drive", "file=/srv/disk.img,format=raw"])'),
    ([{}, {"id": 5, "net-options": ["--netdev", "user,id=n,hostfwd=tcp:127.0.0.1:10022-:22"]}],
     ("hurd-vm[1]: port 10022 (a forward in net-options of hurd-vm5) is also the SSH of hurd-vm port "
      "(hurd-vm[0]); give the instances different ids")),
    ([{"id": 1}, {"id": 2, "vnc-display": 1}],
     ("hurd-vm[1]: port 5901 (VNC display of hurd-vm2) is also the VNC display of hurd-vm1 port (hurd-vm[0]); "
      "give the instances different ids")),
])
def test_config_errors_name_the_key(tables: list[dict[str, Any]], expected: str) -> None:
    """(Each table boots /srv/hurd.img unless it says "image": None.)"""
    full = [{"kvm": False, "qemu": QEMU, "image": "/srv/hurd.img", **t} for t in tables]
    assert errors(*[{k: v for k, v in t.items() if v is not None} for t in full]) == [expected]


@pytest.mark.parametrize("options", [["-kernel", "/k"], ["--drive", "file=/d,format=raw"], ["-hda", "/d"],
                                     ["-cdrom", "/iso"], ["-bios", "/fw"], ["-drive=file=/d"]])
def test_a_kernel_or_drive_in_options_is_something_to_boot(options: list[str]) -> None:
    assert "hurd-vm" in parse({"qemu": QEMU, "kvm": False, "options": options})


def test_id_false_is_the_seeds_no_id() -> None:
    assert "hurd-vm" in parse({"id": False, "qemu": QEMU, "kvm": False, "image": "/a"})


def test_qemu_is_looked_up_when_the_service_starts_and_checked_as_a_host_check(tmp_path: Path) -> None:
    """A qemu name not on this host fails `--check` as a host check (skipped with
    --no-host-checks, for a file meant for another host), naming the key."""
    conf = tmp_path / "init.toml"
    conf.write_text('[[hurd-vm]]\nqemu = "svt-no-such-qemu"\nkvm = false\nimage = "/srv/hurd.img"\n')
    proc = run_supervisor("--check", "-c", str(conf), "--state-dir", str(tmp_path / "s"))
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [
        f'hurd-vm[0].qemu: "svt-no-such-qemu" is not found on PATH ({hurd_vm.QEMU_PATH}) (service hurd-vm)']
    proc = run_supervisor("--check", "--no-host-checks", "-c", str(conf), "--state-dir", str(tmp_path / "s"))
    assert proc.returncode == 0, proc
    spec = parse({"qemu": "qemu-system-x86_64", "kvm": False, "image": "/a"})["hurd-vm"]
    assert spec.command[0] == "qemu-system-x86_64" and ("PATH", hurd_vm.QEMU_PATH) in spec.environment


def test_check_lists_the_services(tmp_path: Path) -> None:
    conf = tmp_path / "init.toml"
    conf.write_text(f'[[hurd-vm]]\nqemu = "{QEMU}"\nkvm = false\noptions = ["-kernel", "/k"]\n\n'
                    f'[[hurd-vm]]\nid = 1\nqemu = "{QEMU}"\nimage = "/i"\n'
                    'kvm = false\nrequires = ["net"]\n\n[services.net]\ncommand = ["/bin/true"]\n')
    proc = run_supervisor("--check", "-c", str(conf), "--state-dir", str(tmp_path / "s"))
    assert proc.returncode == 0, proc
    lines = [line.strip() for line in proc.stdout.splitlines()[1:]]
    assert [line for line in lines if not line.startswith("runs:")] == [
        "hurd-vm  provides: childhurd  requires: -",
        "hurd-vm1  provides: childhurd1  requires: net",
        "net  requires: -"]
    if "runs: /bin/true" in lines:  # the engine shows each argv too
        assert f"runs: {QEMU} -m 512 {' '.join(net(0))} -kernel /k --no-reboot {' '.join(QMP_ARGS)} " \
               "-vnc 127.0.0.1:0" in lines


# ---------------------------------------------------------------------------------------
# 2. the secret-service protocol, host side


def test_guile_string_escapes() -> None:
    assert ss.guile_string('a"b\\c\nd\te\x01') == '"a\\"b\\\\c\\nd\\te\\x1;"'
    assert ss.guile_string("grüße") == '"grüße"'


def test_reader_and_hello() -> None:
    datum, n = ss.read_datum(ss.HELLO + b"rest")
    assert n == len(ss.HELLO) and ss.valid_hello(datum)
    assert ss.valid_hello(ss.read_datum(b"  (secret-service-server\n (version 1 2))")[0])
    assert not ss.valid_hello(ss.read_datum(b"(secret-service-server)")[0])
    assert not ss.valid_hello(ss.read_datum(b'("secret-service-server" (version 0))')[0])
    assert not ss.valid_hello(ss.read_datum(b"(secret-service-server (version 0) extra)")[0])
    datum, _ = ss.read_datum(b'(files (("/a\\"b\\x41;" 3 33188)))')
    assert datum == [ss.Symbol("files"), [['/a"bA', 3, 33188]]]


def make_secrets(root: Path) -> dict[str, tuple[bytes, int]]:
    """Three files of different modes (and a name that needs escaping)."""
    files = {
        "/etc/ssh/ssh_host_ed25519_key": (b"-----BEGIN OPENSSH PRIVATE KEY-----\nfake\n", 0o600),
        "/etc/ssh/ssh_host_ed25519_key.pub": (b"ssh-ed25519 AAAAC3Nza fake\n", 0o644),
        '/usr/local/bin/hello "world"': (bytes(range(256)) * 3, 0o751),
    }
    for name, (data, mode) in files.items():
        path = root / name.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)
    return files


class Guest:
    """Guix's guest side (``secret-service-receive-secrets``), written from the
    protocol description: accept one client, hello, close the listener, read
    ``(secrets (version 0) (files ((NAME SIZE MODE) ...)))`` and exactly SIZE
    bytes per file, installing each under `root` with chmod MODE."""

    def __init__(self, root: Path, hello: bytes = ss.HELLO, drop_first: int = 0, delay: float = 0.0) -> None:
        self.root, self.hello, self.drop_first, self.delay = root, hello, drop_first, delay
        self.header = b""
        self.files: list[tuple[str, int, int]] = []
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]
        self.done = trio.Event()

    async def serve(self) -> None:
        listener = trio.socket.from_stdlib_socket(self.listener)
        for _ in range(self.drop_first):  # what QEMU does while nothing listens in the guest
            conn, _ = await listener.accept()
            conn.close()
        conn, _ = await listener.accept()
        await trio.sleep(self.delay)
        await conn.send(self.hello)
        listener.close()
        buf = b""
        depth, in_string, escape, end = 0, False, False, None
        while end is None:
            chunk = await conn.recv(65536)
            assert chunk, "end of stream inside the secrets datum"
            start = len(buf)
            buf += chunk
            for i in range(start, len(buf)):
                c = buf[i:i + 1]
                if in_string:
                    if escape:
                        escape = False
                    elif c == b"\\":
                        escape = True
                    elif c == b'"':
                        in_string = False
                elif c == b'"':
                    in_string = True
                elif c == b"(":
                    depth += 1
                elif c == b")":
                    depth -= 1
                    if depth == 0:
                        end = i + 1
                        break
        self.header, rest = buf[:end], buf[end:]
        tokens = re.findall(rb'\(|\)|"(?:[^"\\]|\\.)*"|[^\s()"]+', self.header)
        assert tokens[:8] == [b"(", b"secrets", b"(", b"version", b"0", b")", b"(", b"files"], tokens
        i = 9
        while tokens[i] == b"(":
            name = json.loads(tokens[i + 1].decode())  # Guile's \" and \\ are JSON's too
            self.files.append((name, int(tokens[i + 2]), int(tokens[i + 3])))
            i += 5
        assert tokens[i:] == [b")", b")", b")"], tokens[i:]
        for name, size, mode in self.files:
            while len(rest) < size:
                chunk = await conn.recv(65536)
                assert chunk, f"end of stream inside {name}"
                rest += chunk
            path = self.root / name.lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)
            path.write_bytes(rest[:size])
            path.chmod(mode & 0o7777)
            rest = rest[size:]
        assert rest == b"" and await conn.recv(1) == b"", "bytes after the last file"
        conn.close()
        self.done.set()


async def test_send_secrets_exact_bytes(tmp_path: Path) -> None:
    src, dst = tmp_path / "secrets", tmp_path / "guest"
    files = make_secrets(src)
    guest = Guest(dst)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(guest.serve)
        sent = await ss.send_secrets("127.0.0.1", guest.port, str(src), recipient_pid=ME, retries=0,
                                     handshake_timeout=5)
    names = sorted(files)
    assert [f.name for f in sent] == names
    assert guest.header == (
        b'(secrets (version 0) (files (("/etc/ssh/ssh_host_ed25519_key" 41 33152) '
        b'("/etc/ssh/ssh_host_ed25519_key.pub" 27 33188) ("/usr/local/bin/hello \\"world\\"" 768 33257))))')
    assert guest.files == [(n, len(files[n][0]), stat.S_IFREG | files[n][1]) for n in names]
    for name, (data, mode) in files.items():
        path = dst / name.lstrip("/")
        assert path.read_bytes() == data
        assert stat.S_IMODE(path.stat().st_mode) == mode


async def test_missing_secret_root_sends_an_empty_list(tmp_path: Path) -> None:
    guest = Guest(tmp_path / "guest")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(guest.serve)
        sent = await ss.send_secrets("127.0.0.1", guest.port, str(tmp_path / "none"), recipient_pid=ME,
                                     retries=0, handshake_timeout=5)
    assert sent == [] and guest.header == b"(secrets (version 0) (files ()))"


async def test_connection_refused_is_retried(tmp_path: Path) -> None:
    guest = Guest(tmp_path / "guest")
    port = guest.port
    guest.listener.close()  # refused for a while
    messages: list[str] = []

    async def late_guest() -> None:
        await trio.sleep(0.5)
        guest.listener = socket.socket()
        guest.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        guest.listener.bind(("127.0.0.1", port))
        guest.listener.listen(1)
        await guest.serve()

    make_secrets(tmp_path / "s")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(late_guest)
        sent = await ss.send_secrets("127.0.0.1", port, str(tmp_path / "s"), recipient_pid=ME, retries=10,
                                     retry_delay=0.2, handshake_timeout=5, log=messages.append)
    assert len(sent) == 3
    assert any(m.startswith("retrying connection [") for m in messages), messages


async def test_refused_too_often_fails(tmp_path: Path) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(ss.SecretServiceError, match=rf"cannot connect to 127.0.0.1:{port} after 3 attempts"):
        await ss.send_secrets("127.0.0.1", port, str(tmp_path), recipient_pid=ME, retries=2,
                              retry_delay=0.05)


async def test_closed_before_hello_is_a_retry(tmp_path: Path) -> None:
    make_secrets(tmp_path / "s")
    guest = Guest(tmp_path / "guest", drop_first=2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(guest.serve)
        sent = await ss.send_secrets("127.0.0.1", guest.port, str(tmp_path / "s"), recipient_pid=ME, retries=5,
                                     reconnect_interval=0.05, handshake_timeout=5)
    assert len(sent) == 3 and guest.done.is_set()


async def test_hello_timeout(tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # accepts (kernel backlog) but never says hello
    port = listener.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(ss.SecretServiceError, match="timeout while waiting for the handshake"):
        await ss.send_secrets("127.0.0.1", port, str(tmp_path), recipient_pid=ME, retries=0,
                              handshake_timeout=0.5)
    assert 0.4 < time.monotonic() - t0 < 3
    listener.close()


@pytest.mark.parametrize("hello", [b"(secret-service-client (version 0))", b"hello\n", b"(1 2 3)",
                                   b"(secret-service-server (version 0)"])
async def test_invalid_hello_fails(tmp_path: Path, hello: bytes) -> None:
    guest = Guest(tmp_path / "guest", hello=hello)

    async def serve() -> None:
        listener = trio.socket.from_stdlib_socket(guest.listener)
        conn, _ = await listener.accept()
        await conn.send(hello)
        conn.close()  # EOF after a partial or wrong datum

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        with pytest.raises(ss.SecretServiceError, match="invalid handshake"):
            await ss.send_secrets("127.0.0.1", guest.port, str(tmp_path), recipient_pid=ME, retries=0,
                                  handshake_timeout=5)


async def test_cancel_closes(tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    with trio.move_on_after(0.3) as scope:
        await ss.send_secrets("127.0.0.1", listener.getsockname()[1], str(tmp_path), recipient_pid=ME,
                              handshake_timeout=60)
    assert scope.cancelled_caught
    conn, _ = listener.accept()
    conn.settimeout(2)
    assert conn.recv(10) == b""  # the host closed its end
    conn.close()
    listener.close()


class Taker:
    """A guest that takes whatever comes: accepts every connection on
    `listener`, says hello, and records each byte it receives."""

    def __init__(self, listener: socket.socket) -> None:
        self.listener = trio.socket.from_stdlib_socket(listener)
        self.accepted = 0
        self.received = b""

    async def serve(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await self.listener.accept()
                self.accepted += 1
                nursery.start_soon(self._take, conn)

    async def _take(self, conn: trio.socket.SocketType) -> None:
        with conn:
            await conn.send(ss.HELLO)
            while chunk := await conn.recv(65536):
                self.received += chunk


async def send_past_the_recipient(root: Path, *, recipient_shares_listener: bool) -> tuple[str, int, int, Taker]:
    """Send secrets to a port served by a `Taker` in this process, naming as
    the recipient a ``sleep`` (holding the same listening socket, or not):
    (the error, the port, the recipient's pid, the taker)."""
    make_secrets(root)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    taker = Taker(listener)
    shared = [listener.fileno()] if recipient_shares_listener else []
    recipient = subprocess.Popen(["sleep", "60"], pass_fds=shared)  # the "QEMU"; it never accepts
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(taker.serve)
            with pytest.raises(ss.SecretServiceError) as info:
                await ss.send_secrets("127.0.0.1", port, str(root), recipient_pid=recipient.pid, retries=0,
                                      handshake_timeout=5)
            nursery.cancel_scope.cancel()
    finally:
        recipient.kill()
        recipient.wait()
        listener.close()
    return str(info.value), port, recipient.pid, taker


async def test_secrets_go_only_to_the_recipient_listener(tmp_path: Path) -> None:
    """Someone else listens on the port: no connection at all, the holder is named."""
    error, port, pid, taker = await send_past_the_recipient(tmp_path / "s", recipient_shares_listener=False)
    me = psutil.Process()
    assert error.startswith(
        f"refusing to send secrets: 127.0.0.1:{port} is held by pid {ME} (user {me.username()}, uid {os.getuid()}): "
        f"{shlex.join(me.cmdline())[:100]}"), error
    assert error.endswith(f", not by QEMU (pid {pid})"), error
    assert (taker.accepted, taker.received) == (0, b"")


async def test_secrets_go_only_to_the_recipient_accepting(tmp_path: Path) -> None:
    """The recipient holds the listening socket, but another process (this one,
    sharing it) accepts the connection: the hello comes, nothing is sent."""
    error, port, pid, taker = await send_past_the_recipient(tmp_path / "s", recipient_shares_listener=True)
    assert error.startswith(
        f"refusing to send secrets: the connection to 127.0.0.1:{port} was accepted by pid {ME} "), error
    assert error.endswith(f", not by QEMU (pid {pid})"), error
    assert taker.accepted >= 1 and taker.received == b""


@pytest.fixture(scope="module")
def secretd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        need("gcc (to build contrib/guest/secretd.c)")
    out = tmp_path_factory.mktemp("secretd") / "secretd"
    proc = subprocess.run([gcc, "-static", "-O2", "-Wall", "-Wno-format-truncation", "-o", str(out),
                           str(ROOT / "contrib" / "guest" / "secretd.c")], check=False, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        need(f"a static C toolchain (gcc libc6-dev): {proc.stderr.strip()[-300:]}")
    return out


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def read_report(port: int, timeout: float = 10.0) -> list[str]:
    deadline = Deadline(timeout)
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=3) as c:
                data = b""
                while chunk := c.recv(65536):
                    data += chunk
            if data:
                return data.decode().splitlines()
        except OSError:
            pass
        if deadline.expired():
            raise AssertionError(f"no report on port {port} within {timeout} s")
        time.sleep(0.1)


def expected_report(files: dict[str, tuple[bytes, int]]) -> list[str]:
    return [f"{name} {len(data)} {stat.S_IFREG | mode:o} {hashlib.sha256(data).hexdigest()}"
            for name, (data, mode) in sorted(files.items())]


async def test_guest_secretd_receives_exactly(tmp_path: Path, secretd: Path) -> None:
    files = make_secrets(tmp_path / "s")
    port, report = free_port(), free_port()
    dst = tmp_path / "guest"
    proc = subprocess.Popen([str(secretd), "-a", "127.0.0.1", "-p", str(port), "-s", str(report),  # noqa: ASYNC220
                             "-r", str(dst), "-t", "20"], stderr=subprocess.PIPE, text=True)
    try:
        sent = await ss.send_secrets("127.0.0.1", port, str(tmp_path / "s"), recipient_pid=proc.pid, retries=20,
                                     retry_delay=0.1, handshake_timeout=5)
        assert len(sent) == 3
        lines = await trio.to_thread.run_sync(read_report, report)
        assert lines == expected_report(files)
        for name, (data, mode) in files.items():
            assert (dst / name.lstrip("/")).read_bytes() == data
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=5)
    assert "secret service: received 3 secret files" in err, err


def test_guest_secretd_rejects_bad_secrets(tmp_path: Path, secretd: Path) -> None:
    port = free_port()
    proc = subprocess.Popen([str(secretd), "-a", "127.0.0.1", "-p", str(port), "-s", str(free_port()),
                             "-r", str(tmp_path), "-t", "20"], stderr=subprocess.PIPE, text=True)
    c = wait_until(lambda: _try_connect(port), 5, "secretd listening")
    assert c.recv(100) == ss.HELLO
    c.sendall(b"(secrets (version 1) (files ()))")
    assert proc.wait(5) == 1
    assert "invalid secrets received" in proc.stderr.read()
    c.close()


def test_guest_secretd_times_out(tmp_path: Path, secretd: Path) -> None:
    proc = subprocess.run([str(secretd), "-a", "127.0.0.1", "-p", str(free_port()), "-t", "1"],
                          check=False, capture_output=True, text=True, timeout=10)
    assert proc.returncode == 1 and "did not receive any secrets; time out" in proc.stderr


def _try_connect(port: int) -> socket.socket | None:
    try:
        return socket.create_connection(("127.0.0.1", port), timeout=5)
    except OSError:
        return None


# ---------------------------------------------------------------------------------------
# 3. the real thing: QEMU (TCG) and the test guest


@pytest.fixture(scope="module")
def guest() -> Path:
    """The test guest's directory (vmlinuz, initrd.gz), built or taken from the cache."""
    if os.getuid() != 0:
        pytest.skip("QEMU runs as the childhurd user, created when missing: needs root")
    for tool in (QEMU, "/usr/bin/qemu-img", "/usr/bin/ssh-keygen"):
        if not os.path.exists(tool):
            need(tool)
    proc = subprocess.run([str(ROOT / "contrib" / "guest" / "build")], check=False, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        need(f"the test guest (contrib/guest/build failed: {proc.stderr.strip()[-500:]})")
    out = Path(proc.stdout.strip().splitlines()[-1])
    assert (out / "vmlinuz").is_file() and (out / "initrd.gz").is_file()
    return out


#: An empty disk (/dev/null): QEMU runs, and the firmware finds nothing to boot.
EMPTY_DISK = ["-drive", "file=/dev/null,format=raw,if=ide"]


def vm_table(sup: Supervisor, guest: Path, secret_root: Path, *, tick: bool = False,
             **extra: Any) -> dict[str, Any]:
    """A ``[[hurd-vm]]`` table booting the test guest (TCG), tagged for cleanup.
    With `tick`, the guest prints "guest: tick N" to its console every 100 ms."""
    append = "console=ttyS0 panic=-1 no_timer_check quiet" + (" guest.tick" if tick else "")
    options = ["--snapshot", "-kernel", str(guest / "vmlinuz"), "-initrd", str(guest / "initrd.gz"),
               "-append", append, "-serial", "stdio",
               "-name", sup.marker(f"vm{extra.get('id', '')}")]
    return {"qemu": QEMU, "kvm": False, "memory-size": 256, "options": options,
            "secret-root": str(secret_root), "auto-start": False, "handshake-timeout": 60, **extra}


def qemu_procs(sup: Supervisor, id_: Any = "") -> list[psutil.Process]:
    marker = sup.marker(f"vm{id_}")
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["status"] != psutil.STATUS_ZOMBIE and marker in (p.info["cmdline"] or []):
            out.append(p)
    return out


def test_start_sends_secrets_and_the_guest_has_them(sup: Supervisor, guest: Path, tmp_path: Path) -> None:
    files = make_secrets(tmp_path / "secrets")
    sup.start({"hurd-vm": [vm_table(sup, guest, tmp_path / "secrets")]})
    t0 = time.monotonic()
    sup.herd("start", "hurd-vm", check=True, timeout=90)
    took = time.monotonic() - t0
    status = sup.status("hurd-vm")
    assert status["state"] == "running", status
    # Ready means sent: the guest installed them before its report port opened.
    assert read_report(10022, timeout=10) == expected_report(files)
    details = status["details"]
    assert details["ports"] == {"ssh": 10022, "secrets": 11004, "vnc": 15900}
    assert details["secret-root"] == str(tmp_path / "secrets") and details["phase"] == "running"
    assert details["secrets-sent"]["files"] == 3
    [qemu] = qemu_procs(sup)
    assert qemu.username() == "childhurd"
    assert qemu.gids().real == __import__("grp").getgrnam("kvm").gr_gid
    assert qemu.environ().get("TMPDIR") == "/tmp" and "PATH" not in qemu.environ()
    text = sup.herd("status", "childhurd", check=True).stdout
    assert "ports: ssh=10022, secrets=11004, vnc=15900" in text, text
    log = "\n".join(line[2] for line in sup.log_lines("hurd-vm"))
    assert "secret service: received 3 secret files" in log, log
    print(f"start (boot + handshake) took {took:.1f} s")

    # Stop: ACPI power-down over QMP; QEMU exits by itself (no signal).
    pid = qemu.pid
    t0 = time.monotonic()
    sup.herd("stop", "hurd-vm", check=True, timeout=60)
    assert time.monotonic() - t0 < 15
    assert not qemu_procs(sup)
    status = sup.status("hurd-vm")
    assert status["state"] == "stopped"
    assert status["last-exit"]["code"] == 0 and status["last-exit"]["signal"] is None, status["last-exit"]
    log = "\n".join(line[2] for line in sup.log_lines("hurd-vm"))
    assert "guest: power button pressed: powering off" in log, log
    assert "SIGKILL" not in log and "did not stop by itself" not in log, log
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_two_instances_and_stop_one(sup: Supervisor, guest: Path, tmp_path: Path) -> None:
    roots = {}
    for i in (1, 2):
        roots[i] = tmp_path / f"secrets{i}"  # empty: SSH host keys are generated there
    sup.start({"hurd-vm": [vm_table(sup, guest, roots[1], id=1), vm_table(sup, guest, roots[2], id=2)]})
    with trio_free_parallel() as run:
        run(lambda: sup.herd("start", "hurd-vm1", check=True, timeout=120))
        run(lambda: sup.herd("start", "childhurd2", check=True, timeout=120))
    for i, port in ((1, 11022), (2, 12022)):
        keys = sorted(p.name for p in (roots[i] / "etc" / "ssh").iterdir())
        assert "ssh_host_ed25519_key" in keys and "ssh_host_ed25519_key.pub" in keys, keys
        for name in keys:
            mode = stat.S_IMODE((roots[i] / "etc" / "ssh" / name).stat().st_mode)
            assert mode == (0o644 if name.endswith(".pub") else 0o600), (name, oct(mode))
        lines = read_report(port)
        assert [line.split()[0] for line in lines] == [f"/etc/ssh/{k}" for k in keys]
        assert sup.status(f"hurd-vm{i}")["details"]["ports"]["ssh"] == port
    sup.herd("stop", "childhurd1", check=True, timeout=60)
    assert not qemu_procs(sup, 1) and len(qemu_procs(sup, 2)) == 1
    assert sup.status("hurd-vm1")["state"] == "stopped" and sup.status("hurd-vm2")["state"] == "running"
    assert read_report(12022)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", 11022), timeout=2)


class trio_free_parallel:
    """Run blocking callables in threads; re-raise the first failure at exit."""

    def __enter__(self) -> Any:
        import threading
        self.threads: list[Any] = []
        self.errors: list[BaseException] = []

        def run(fn: Any) -> None:
            def target() -> None:
                try:
                    fn()
                except BaseException as exc:  # noqa: BLE001 - re-raised below
                    self.errors.append(exc)
            t = threading.Thread(target=target)
            t.start()
            self.threads.append(t)

        return run

    def __exit__(self, *exc: object) -> None:
        for t in self.threads:
            t.join(300)
        if self.errors:
            raise self.errors[0]


def test_guest_that_never_answers_fails_the_start(sup: Supervisor, guest: Path, tmp_path: Path) -> None:
    table = vm_table(sup, guest, tmp_path / "secrets", **{"handshake-timeout": 4, "connect-retries": 2})
    table["options"] = ["--snapshot", "-name", sup.marker("vm"), *EMPTY_DISK]  # nothing boots
    sup.start({"hurd-vm": [table], "services": {"other": {"command": ["/bin/sleep", "1000"],
                                                          "auto-start": False}}})
    result: dict[str, Any] = {}
    import threading

    def start() -> None:
        result["proc"] = sup.herd("start", "hurd-vm", timeout=60)

    t0 = time.monotonic()
    th = threading.Thread(target=start)
    th.start()
    wait_until(lambda: qemu_procs(sup), 10, "QEMU running")
    # Meanwhile the supervisor answers at once and starts other services.
    q0 = time.monotonic()
    st = sup.rstatus("hurd-vm")
    assert st["state"] == "starting"
    assert time.monotonic() - q0 < 1.0
    sup.herd("start", "other", check=True, timeout=10)
    th.join(60)
    took = time.monotonic() - t0
    proc = result["proc"]
    assert proc.returncode != 0
    assert "timeout while waiting for the handshake from 127.0.0.1:11004 (4 s" in proc.stderr + proc.stdout, proc
    assert 3.5 < took < 20, took
    assert not qemu_procs(sup)
    status = sup.status("hurd-vm")
    assert status["state"] == "stopped"
    assert "timeout while waiting for the handshake" in status["last-failure"]
    assert status["last-exit"]["signal"] != "SIGKILL", status["last-exit"]


def test_stop_cancels_a_start_in_progress(sup: Supervisor, guest: Path, tmp_path: Path) -> None:
    table = vm_table(sup, guest, tmp_path / "secrets")
    table["options"] = ["--snapshot", "-name", sup.marker("vm"), *EMPTY_DISK]  # never answers
    sup.start({"hurd-vm": [table]})
    import threading
    result: dict[str, Any] = {}
    th = threading.Thread(target=lambda: result.setdefault("p", sup.herd("start", "hurd-vm", timeout=60)))
    th.start()
    wait_until(lambda: qemu_procs(sup), 10, "QEMU running")
    t0 = time.monotonic()
    sup.herd("stop", "hurd-vm", check=True, timeout=30)
    assert time.monotonic() - t0 < 10
    th.join(30)
    assert result["p"].returncode != 0
    assert not qemu_procs(sup)
    assert sup.status("hurd-vm")["state"] == "stopped"


SQUAT_PORT = 18004  # the secrets port of id = 7
SQUATTER = f"""
import select, socket, sys
s = socket.socket()
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(8)
print("listening", flush=True)
conns = []
while True:
    ready = select.select([s, sys.stdin, *conns], [], [])[0]
    if sys.stdin in ready:  # closed: the test is done
        break
    if s in ready:
        c, _ = s.accept()
        print("accepted", flush=True)
        c.sendall({ss.HELLO!r})
        conns.append(c)
    for c in [c for c in conns if c in ready]:
        data = c.recv(65536)
        if data:
            print("received", len(data), flush=True)
        else:
            conns.remove(c)
"""


class Squatter:
    """A local user (``nobody``) listening on 127.0.0.1:`port`, posing as the
    guest: it accepts, says hello and reports every byte it receives."""

    def __init__(self, port: int) -> None:
        python = python_for_other_users()
        if python is None:
            need("a Python interpreter that nobody may run (/usr/bin/python3)")
        nobody = pwd.getpwnam("nobody")
        self.python = python
        self.proc = subprocess.Popen([python, "-c", SQUATTER, str(port)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd="/", user=nobody.pw_uid,
                                     group=nobody.pw_gid, extra_groups=[])
        self.pid = self.proc.pid
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        assert first == "listening\n", f"the squatter could not listen on {port}: {first!r}"

    def holder(self) -> str:
        """How the supervisor should name it."""
        # The script quoted, its newlines escaped: nothing the holder chose forges a log line.
        return f"pid {self.pid} (user nobody, uid 65534): {self.python} -c '\\nimport select, socket, sys\\n"

    def finish(self) -> list[str]:
        """Stop it; what it saw (``accepted``, ``received N`` lines)."""
        out, _ = self.proc.communicate(timeout=10)
        return out.splitlines()


@pytest.fixture
def squat() -> Any:
    """Start squatters (as root: they run as nobody); killed at the end."""
    if os.getuid() != 0:
        pytest.skip("the squatter runs as nobody, QEMU as childhurd: needs root")
    if not os.path.exists(QEMU):
        need(QEMU)
    started: list[Squatter] = []

    def start(port: int) -> Squatter:
        started.append(Squatter(port))
        return started[-1]

    yield start
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.communicate()


def squat_table(sup: Supervisor, secret_root: Path, **extra: Any) -> dict[str, Any]:
    """id 7 (secrets port 18004); QEMU with an empty disk: nothing boots."""
    return {"id": 7, "qemu": QEMU, "kvm": False, "memory-size": 64, "secret-root": str(secret_root),
            "options": ["--snapshot", "-name", sup.marker("vm7"), *EMPTY_DISK], "auto-start": False,
            "handshake-timeout": 10, **extra}


def test_squatter_before_the_start_gets_nothing(sup: Supervisor, squat: Any, tmp_path: Path) -> None:
    """Issue 15 item 1: a local user listens on the secrets port before the
    start.  QEMU is not even spawned (it could not bind the port); the start
    fails naming the holder, who gets no connection and no byte."""
    make_secrets(tmp_path / "secrets")
    squatter = squat(SQUAT_PORT)
    sup.start({"hurd-vm": [squat_table(sup, tmp_path / "secrets")]})
    proc = sup.herd("start", "hurd-vm7", timeout=60)
    assert squatter.finish() == []
    assert proc.returncode != 0, proc
    reason = (f"the secrets port 127.0.0.1:{SQUAT_PORT} is already held by {squatter.holder()}")
    assert reason in proc.stdout + proc.stderr, proc
    status = sup.status("hurd-vm7")
    assert status["state"] == "stopped" and reason in status["last-failure"], status
    assert "QEMU not started (the holder would be sent the secrets)" in status["last-failure"]
    assert not qemu_procs(sup, 7)
    assert "secrets-sent" not in status["details"]


def test_squatter_after_qemu_started_gets_nothing(sup: Supervisor, squat: Any, tmp_path: Path) -> None:
    """The squatter takes the port after QEMU started (here QEMU forwards no
    port, so the port is free for it): the readiness step sees that the
    listener is not QEMU's, sends nothing, stops QEMU and names the holder."""
    import threading
    make_secrets(tmp_path / "secrets")
    table = squat_table(sup, tmp_path / "secrets", **{"net-options": ["-nic", "none"], "connect-retries": 30})
    sup.start({"hurd-vm": [table]})
    result: dict[str, Any] = {}
    th = threading.Thread(target=lambda: result.setdefault("p", sup.herd("start", "hurd-vm7", timeout=90)))
    th.start()
    [qemu] = wait_until(lambda: qemu_procs(sup, 7), 10, "QEMU running")
    squatter = squat(SQUAT_PORT)
    th.join(90)
    seen = squatter.finish()
    assert [line for line in seen if line.startswith("received")] == [], seen
    proc = result["p"]
    assert proc.returncode != 0, proc
    status = sup.status("hurd-vm7")
    failure = status["last-failure"]
    assert failure.startswith("refusing to send secrets: "), failure
    assert squatter.holder() in failure and failure.endswith(f", not by QEMU (pid {qemu.pid})"), failure
    assert failure in proc.stdout + proc.stderr, proc
    assert status["state"] == "stopped" and "secrets-sent" not in status["details"], status
    assert not qemu_procs(sup, 7)


def test_disk_size_gives_a_qcow2_overlay(sup: Supervisor, guest: Path, tmp_path: Path) -> None:
    image = tmp_path / "base.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(image), "8M"], check=True)
    # QEMU runs as childhurd: it must reach the state directory and the image.
    opened = []
    for d in [*reversed(tmp_path.parents), tmp_path]:
        if str(d).startswith("/tmp/") and not os.stat(d).st_mode & stat.S_IXOTH:
            opened.append((d, os.stat(d).st_mode))
            os.chmod(d, os.stat(d).st_mode | stat.S_IXOTH)
    try:
        files = make_secrets(tmp_path / "secrets")
        table = vm_table(sup, guest, tmp_path / "secrets", image=str(image), **{"disk-size": "64M"})
        table["options"] = [o for o in table["options"] if o != "--snapshot"]
        image.chmod(0o644)
        sup.start({"hurd-vm": [table]})
        sup.herd("start", "hurd-vm", check=True, timeout=90)
        overlay = sup.state_dir / "hurd-vm" / "disk.qcow2"
        info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(overlay)],
                                         capture_output=True, text=True, check=True).stdout)
        assert info["format"] == "qcow2" and info["virtual-size"] == 64 * 2**20
        assert info["backing-filename"] == str(image) and info["backing-filename-format"] == "raw"
        [qemu] = qemu_procs(sup)
        assert "--hda" in qemu.cmdline() and str(overlay) in qemu.cmdline()
        assert read_report(10022) == expected_report(files)
        assert sup.status("hurd-vm")["details"]["disk"] == str(overlay)
        sup.herd("stop", "hurd-vm", check=True, timeout=60)
    finally:
        for d, mode in opened:
            os.chmod(d, mode)


def test_guest_reboot_respawns(sup: Supervisor, guest: Path, tmp_path: Path) -> None:
    make_secrets(tmp_path / "secrets")
    sup.start({"hurd-vm": [vm_table(sup, guest, tmp_path / "secrets")]})
    sup.herd("start", "hurd-vm", check=True, timeout=90)
    [first] = qemu_procs(sup)
    state = sup.state_dir / "hurd-vm.qmp"
    # A guest reboot (here: a reset from the monitor) ends QEMU (--no-reboot) ...
    c = socket.socket(socket.AF_UNIX)
    c.connect(str(state))
    f = c.makefile("rwb")
    f.readline()
    for cmd in ("qmp_capabilities", "system_reset"):
        f.write(json.dumps({"execute": cmd}).encode() + b"\n")
        f.flush()
    c.close()
    # ... and the service respawns it, handshake included.
    wait_until(lambda: (q := qemu_procs(sup)) and q[0].pid != first.pid, 30, "a new QEMU")
    wait_until(lambda: sup.rstatus("hurd-vm")["state"] == "running", 60, "running again")
    assert read_report(10022)


def test_reexec_then_stop_still_powers_the_guest_down(sup: Supervisor, guest: Path, tmp_path: Path) -> None:
    """What hurd-vm knows (the guest got its secrets) is in the service's
    record: after `herd reexec root`, stop is still an ACPI power-down."""
    make_secrets(tmp_path / "secrets")
    sup.start({"hurd-vm": [vm_table(sup, guest, tmp_path / "secrets")]})
    sup.herd("start", "hurd-vm", check=True, timeout=90)
    [qemu] = qemu_procs(sup)
    before = sup.status("hurd-vm")["details"]
    sup.herd("reexec", "root", check=True)
    wait_until(lambda: count_resumed(sup) == 1, 30, "the new image to resume")
    after = sup.status("hurd-vm")
    assert after["pid"] == qemu.pid and after["details"]["phase"] == "running"
    assert after["details"]["secrets-sent"] == before["secrets-sent"]
    sup.herd("stop", "hurd-vm", check=True, timeout=60)
    log = "\n".join(line[2] for line in sup.log_lines("hurd-vm"))
    assert "QMP system_powerdown" in log and "QMP quit" not in log, log
    assert "guest: power button pressed: powering off" in log, log
    assert sup.status("hurd-vm")["last-exit"]["code"] == 0


TICK = re.compile(r"guest: tick (\d+)")


def ticks(lines: list[str]) -> list[int]:
    """The guest's tick numbers in these console lines, in order."""
    return [int(m[1]) for line in lines if (m := TICK.fullmatch(line.rstrip("\r")))]


def logged_ticks(sup: Supervisor) -> list[int]:
    """The tick numbers in hurd-vm's log files (the rotated ones first), but
    for a line still unfinished at the end (QEMU writes the console byte by byte)."""
    lines = []
    for path in log_files(sup, "hurd-vm"):
        entries = sup.log_lines("hurd-vm", path)
        if not path.read_bytes().endswith(b"\n"):
            entries = entries[:-1]
        lines += [text for _, stream, text in entries if stream == "stdout"]
    return ticks(lines)


def assert_each_tick_once(numbers: list[int], what: str, first: int | None = None) -> None:
    """`numbers` are first (default: its first one), first + 1, … without a gap or a repeat."""
    assert numbers, f"{what}: no tick"
    expected = list(range(numbers[0] if first is None else first, numbers[-1] + 1))
    if numbers != expected:
        missing = sorted(set(expected) - set(numbers))
        doubled = sorted({n for n in numbers if numbers.count(n) > 1})
        raise AssertionError(f"{what}: ticks {numbers[0]}..{numbers[-1]}, missing {missing[:10]}, "
                             f"doubled {doubled[:10]}")


def test_guest_survives_a_sigkill_of_the_supervisor(sup: Supervisor, guest: Path, tmp_path: Path) -> None:
    """Issues 14 and 13: QEMU keeps running while no supervisor does, its
    console lines from that time reach the log (the keeper drains the pipe),
    the next supervisor re-adopts it with what hurd-vm knew (the guest got
    its secrets), and `herd stop childhurd` powers the guest down over QMP."""
    make_secrets(tmp_path / "secrets")
    sup.start({"hurd-vm": [vm_table(sup, guest, tmp_path / "secrets", tick=True)]})
    sup.herd("start", "hurd-vm", check=True, timeout=90)
    [qemu] = qemu_procs(sup)
    before = sup.status("hurd-vm")["details"]
    assert before["secrets-sent"]["files"] == 3, before
    wait_until(lambda: len(logged_ticks(sup)) >= 10, 30, "the guest to tick")

    crash(sup)
    at_crash = logged_ticks(sup)[-1]
    # The keeper writes the guest's console to the log while no supervisor runs.
    wait_until(lambda: logged_ticks(sup)[-1] >= at_crash + 30, 60, "ticks logged while the supervisor is down")
    assert qemu.is_running() and qemu.status() != psutil.STATUS_ZOMBIE
    down = logged_ticks(sup)[-1]
    restart(sup)

    assert wait_running(sup, ["hurd-vm"], timeout=30) == {"hurd-vm": qemu.pid}, "QEMU was replaced"
    after = sup.status("hurd-vm")["details"]
    assert after["phase"] == "running" and after["secrets-sent"] == before["secrets-sent"], after
    wait_until(lambda: logged_ticks(sup)[-1] >= down + 30, 60, "ticks logged by the new supervisor")
    assert_each_tick_once(logged_ticks(sup), "the log file", first=1)
    shown = sup.herd("log", "childhurd", "-n", "10000", check=True).stdout.splitlines()
    shown_ticks = ticks([line.partition(" hurd-vm stdout: ")[2] for line in shown])
    assert_each_tick_once(shown_ticks, "herd log childhurd")
    assert shown_ticks[0] <= at_crash and shown_ticks[-1] > down, (shown_ticks[0], at_crash, down, shown_ticks[-1])

    sup.herd("stop", "childhurd", check=True, timeout=60)
    assert not qemu_procs(sup)
    lines = [text for _, _, text in sup.log_lines("hurd-vm") if not TICK.fullmatch(text.rstrip("\r"))]
    log = "\n".join(lines)
    assert "QMP system_powerdown" in log and "QMP quit" not in log, lines[-30:]
    assert "guest: power button pressed: powering off" in log, lines[-30:]
    assert "did not stop by itself" not in log and "SIGKILL" not in log, lines[-30:]
    # QEMU is no child of this supervisor (adopted): its exit status is unknown, but no signal ended it.
    status = sup.status("hurd-vm")
    assert status["state"] == "stopped" and status["last-exit"]["signal"] is None, status


def test_health_check_reads_the_line_the_guest_sends_on_the_ssh_forward(sup: Supervisor, guest: Path,
                                                                         tmp_path: Path) -> None:
    """The childhurd's default check reads a banner on its forwarded SSH port
    (10022). The test guest has no sshd: its port 22 sends one line per
    installed secret, so the check here expects one of those lines."""
    files = make_secrets(tmp_path / "secrets")
    line = expected_report(files)[0]
    sup.start({"hurd-vm": [vm_table(sup, guest, tmp_path / "secrets", **{"handshake-timeout": 120}, health={
        "expect": line, "interval": 0.5, "start-period": 0})]})
    sup.herd("start", "hurd-vm", check=True, timeout=150)
    health = wait_until(lambda: (h := sup.rstatus("hurd-vm")["health"])["last-result"] and h, 30, "a first check")
    assert health["type"] == "tcp" and health["address"] == "127.0.0.1:10022"
    assert health["last-result"] == "passed" and health["last-detail"] == "answered as expected", health
    assert health["last-success"] is not None and health["consecutive-failures"] == 0


def test_the_default_health_check_expects_an_ssh_banner_and_can_be_switched_off() -> None:
    from supervisor.config import parse_config

    def check(**extra: Any) -> Any:
        [spec] = parse_config({"hurd-vm": [{"kvm": False, "qemu": QEMU, "options": EMPTY_DISK, **extra}]}).services
        return spec.health

    default = check()
    assert (default.type, default.address, default.expect) == ("tcp", "127.0.0.1:10022", b"SSH-")
    assert check(id=2).address == "127.0.0.1:12022"
    assert check(health=False) is None
    assert check(health={"failures": 5}).failures == 5
    assert check(**{"net-options": ["--nic", "none"]}) is None  # no forward of ours: nothing to check
