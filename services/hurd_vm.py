"""``[[hurd-vm]]``: Guix's ``hurd-vm-service-type``, the childhurd (``docs/service-hurd-vm.md``).

One table per instance.  Each instance is a process service running QEMU
with Guix's command line (memory, an ``rtl8139`` NIC on user networking with
forwards for the secrets, SSH and VNC ports, the options, the disk,
``--no-reboot``) plus what a supervisor needs: a QMP monitor on a socket the
supervisor binds and passes as fd 3, an explicit VNC display, and KVM only
when ``/dev/kvm`` is usable.  QEMU runs as ``childhurd``:``kvm`` (created
when missing) with ``TMPDIR=/tmp`` as its whole environment.

Start = spawn QEMU, then the readiness step: the host side of the secret
service (``services/_secret_service.py``) sends the files under
``secret-root``, only to QEMU: a port held by another process (checked before
the spawn, before each connection and before sending) fails the start and
names the holder; the service is up once they are sent.  Stop = QMP
``system_powerdown`` (the guest powers off, QEMU exits), then stop-signal
after ``powerdown-timeout``, then SIGKILL.  A guest that never got its
secrets is not asked: QMP ``quit`` ends QEMU at once.
"""

from __future__ import annotations

import fcntl
import grp
import json
import os
import pwd
import re
import shutil
import signal
import stat
import time
from dataclasses import dataclass
from typing import Any

import structlog
import trio

from supervisor import BuildContext, Creates, ServiceSpec, ServiceType, SocketSpec, Table, chown_file, note, run_in_thread

from . import _health
from . import _secret_service as secrets
from . import _socket_owner as owner

__all__ = [
    "SERVICE_TYPES",
    "HurdVM",
    "HurdVMError",
    "Settings",
    "build",
    "kvm_usable",
    "net_options",
    "qemu_command",
    "read_settings",
]

log = structlog.get_logger("services.hurd_vm")

SECRETS_BASE, SSH_BASE, VNC_BASE = 11004, 10022, 15900
GUEST_SECRETS_PORT, GUEST_SSH_PORT, GUEST_VNC_PORT = 1004, 22, 5900
DEFAULT_QEMU = "qemu-system-x86_64"
#: Where a ``qemu`` given by name is looked up when the service starts.
QEMU_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: QEMU options that give it something to boot (with one or two dashes).
BOOT_OPTIONS = frozenset({"kernel", "drive", "hda", "hdb", "hdc", "hdd", "cdrom", "fda", "fdb", "blockdev",
                          "pflash", "bios", "sd", "mtdblock"})
DEFAULT_USER, DEFAULT_GROUP = "childhurd", "kvm"
_SIZE_RE = re.compile(r"^[1-9][0-9]*[KMGT]?$")
_HOSTFWD_RE = re.compile(r"hostfwd=(?:tcp|udp)?:[^:,]*:([0-9]+)-")
_KVM_GET_API_VERSION = 0xAE00


class HurdVMError(Exception):
    """A start step failed; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Settings:
    """One ``[[hurd-vm]]`` table, validated."""

    id: int | None = None
    qemu: str = "/usr/bin/qemu-system-x86_64"
    image: str | None = None
    disk_size: int | str = "guess"  # "guess": the image itself; else bytes (int) or "5G"
    memory_size: int = 512  # MiB (the seed's default)
    options: tuple[str, ...] = ("--snapshot",)
    net_options: tuple[str, ...] | None = None  # None: computed from the id
    secret_root: str = "/etc/childhurd"
    kvm: str | bool = "auto"
    vnc_display: int | None = None  # None: the id (0 without one)
    user: str = DEFAULT_USER
    group: str = DEFAULT_GROUP
    handshake_timeout: float = 180.0
    connect_retries: int = 60
    powerdown_timeout: float = 30.0
    generate_host_keys: bool = True
    auto_start: bool = True
    requires: tuple[str, ...] = ()

    @property
    def number(self) -> int:
        return self.id or 0

    @property
    def suffix(self) -> str:
        return "" if self.id is None else str(self.id)

    @property
    def name(self) -> str:
        return f"hurd-vm{self.suffix}"

    @property
    def alias(self) -> str:
        return f"childhurd{self.suffix}"

    @property
    def secrets_port(self) -> int:
        return SECRETS_BASE + 1000 * self.number

    @property
    def ssh_port(self) -> int:
        return SSH_BASE + 1000 * self.number

    @property
    def vnc_port(self) -> int:
        return VNC_BASE + 1000 * self.number

    @property
    def display(self) -> int:
        return self.number if self.vnc_display is None else self.vnc_display

    @property
    def nets(self) -> tuple[str, ...]:
        return self.net_options if self.net_options is not None else net_options(self.id)

    def host_ports(self) -> dict[int, str]:
        """Every TCP port on 127.0.0.1 this instance binds → what it is for."""
        ports = {5900 + self.display: "VNC display"}
        for text in self.nets:
            for m in _HOSTFWD_RE.finditer(text):
                ports.setdefault(int(m[1]), "a forward in net-options")
        if self.net_options is None:
            ports.update({self.secrets_port: "secrets", self.ssh_port: "SSH", self.vnc_port: "VNC forward"})
        return ports


def net_options(id: int | None) -> tuple[str, ...]:
    """Guix's ``hurd-vm-net-options``: the NIC and the three forwards on 127.0.0.1."""
    n = id or 0
    return (
        "--device", "rtl8139,netdev=net0",
        "--netdev", (f"user,id=net0"
                     f",hostfwd=tcp:127.0.0.1:{SECRETS_BASE + 1000 * n}-:{GUEST_SECRETS_PORT}"
                     f",hostfwd=tcp:127.0.0.1:{SSH_BASE + 1000 * n}-:{GUEST_SSH_PORT}"
                     f",hostfwd=tcp:127.0.0.1:{VNC_BASE + 1000 * n}-:{GUEST_VNC_PORT}"),
    )


def disk_path(s: Settings, state_dir: str) -> str | None:
    """What ``--hda`` gets: the image, or the qcow2 overlay when disk-size is set."""
    if s.image is None:
        return None
    if s.disk_size == "guess":
        return s.image
    return os.path.join(state_dir, s.name, "disk.qcow2")


def qmp_path(s: Settings, state_dir: str) -> str:
    return os.path.join(state_dir, f"{s.name}.qmp")


def qemu_command(s: Settings, *, state_dir: str, kvm: bool) -> tuple[str, ...]:
    """The argv: Guix's order, then the QMP monitor (fd 3), the VNC display, KVM.

    ``QEMU -m MEM NET-OPTIONS... OPTIONS... [--hda DISK] --no-reboot
    -chardev socket,id=qmp,fd=3,server=on,wait=off -mon chardev=qmp,mode=control
    -vnc 127.0.0.1:DISPLAY [--enable-kvm]``
    """
    argv = [s.qemu, "-m", str(s.memory_size), *s.nets, *s.options]
    disk = disk_path(s, state_dir)
    if disk is not None:
        argv += ["--hda", disk]
    argv += ["--no-reboot",
             "-chardev", "socket,id=qmp,fd=3,server=on,wait=off", "-mon", "chardev=qmp,mode=control",
             "-vnc", f"127.0.0.1:{s.display}"]
    if kvm:
        argv.append("--enable-kvm")
    return tuple(argv)


def kvm_usable(group: str, user: str) -> bool:
    """Whether QEMU as `user`:`group` can use KVM: ``/dev/kvm`` is a character
    device it may open read-write, and answers KVM_GET_API_VERSION with 12."""
    try:
        st = os.stat("/dev/kvm")
    except OSError:
        return False
    if not stat.S_ISCHR(st.st_mode):
        return False
    try:
        uid = pwd.getpwnam(user).pw_uid
    except KeyError:
        uid = None
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        gid = None
    rw = stat.S_IRUSR | stat.S_IWUSR
    allowed = (uid == 0 or (uid == st.st_uid and st.st_mode & rw == rw)
               or (gid == st.st_gid and st.st_mode & (rw >> 3) == rw >> 3)
               or st.st_mode & (rw >> 6) == rw >> 6)
    if not allowed:
        return False
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, _KVM_GET_API_VERSION) == 12
    except OSError:
        return False
    finally:
        os.close(fd)


# -- running ------------------------------------------------------------------------------


async def _run(argv: list[str], what: str) -> str:
    """Run a helper program to completion; its stdout, or HurdVMError with its stderr."""
    try:
        cp = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False,
                                    stdin=b"")
    except FileNotFoundError:
        raise HurdVMError(f"{what}: {argv[0]} not found") from None
    if cp.returncode != 0:
        err = cp.stderr.decode(errors="replace").strip().splitlines()
        raise HurdVMError(f"{what}: {' '.join(argv)} exited with code {cp.returncode}"
                          + (f": {err[-1]}" if err else ""))
    return cp.stdout.decode(errors="replace")


_accounts_lock: trio.Lock | None = None


async def _ensure_accounts(user: str, group: str) -> None:
    """Create the default group and user when missing (Guix's account extension)."""
    global _accounts_lock
    if _accounts_lock is None:
        _accounts_lock = trio.Lock()
    async with _accounts_lock:
        if group == DEFAULT_GROUP:
            try:
                grp.getgrnam(group)
            except KeyError:
                await _run(["groupadd", "--system", group], f"creating group {group}")
        if user == DEFAULT_USER:
            try:
                pwd.getpwnam(user)
            except KeyError:
                nologin = shutil.which("nologin", path="/usr/sbin:/sbin:/usr/bin:/bin") or "/usr/sbin/nologin"
                await _run(["useradd", "--system", "--user-group", "--groups", group,
                            "--home-dir", "/var/empty", "--no-create-home", "--shell", nologin,
                            "--comment", "Privilege separation user for the childhurd", user],
                           f"creating user {user}")


def _has_host_keys(root: str) -> bool:
    d = os.path.join(root, "etc", "ssh")
    try:
        return any(n.startswith("ssh_host_") and n.endswith("_key") for n in os.listdir(d))
    except OSError:
        return False


class QMPError(Exception):
    pass


async def qmp(path: str, command: str, timeout: float = 5.0) -> Any:
    """One QMP command on the monitor socket at `path`; its "return" value.

    Raises:
        QMPError: no monitor, a QMP error, or no answer within `timeout`.
    """
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_unix_socket(path)
            async with stream:
                buf = b""

                async def message() -> dict[str, Any]:
                    nonlocal buf
                    while b"\n" not in buf:
                        chunk = await stream.receive_some(65536)
                        if not chunk:
                            raise QMPError("the monitor closed the connection")
                        buf += chunk
                    line, _, buf = buf.partition(b"\n")
                    return json.loads(line)

                async def call(name: str) -> Any:
                    await stream.send_all(json.dumps({"execute": name}).encode() + b"\n")
                    while True:
                        msg = await message()
                        if "return" in msg:
                            return msg["return"]
                        if "error" in msg:
                            raise QMPError(f"{name}: {msg['error'].get('desc', msg['error'])}")

                greeting = await message()
                if "QMP" not in greeting:
                    raise QMPError(f"not a QMP greeting: {greeting!r}")
                await call("qmp_capabilities")
                return await call(command)
    except trio.TooSlowError:
        raise QMPError(f"no answer from the QMP monitor {path} within {timeout:g} s") from None
    except (OSError, trio.BrokenResourceError, ValueError) as exc:
        raise QMPError(f"QMP monitor {path}: {exc}") from None


class HurdVM:
    """The hooks of one instance."""

    def __init__(self, settings: Settings, state_dir: str, kvm: bool) -> None:
        self.s = settings
        self.state_dir = state_dir
        self.kvm = kvm
        self.pid: int | None = None
        self.secrets_sent: float | None = None  # when, for the current QEMU
        self.sent_files: list[str] = []
        self.phase = "stopped"

    @property
    def qmp_socket(self) -> str:
        return qmp_path(self.s, self.state_dir)

    # what the supervisor keeps across a re-exec or a crash of its own (TypeState)
    def to_record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"phase": self.phase, "sent-files": list(self.sent_files)}
        if self.pid is not None:
            out["pid"] = self.pid
        if self.secrets_sent is not None:
            out["secrets-sent"] = self.secrets_sent
        return out

    def from_record(self, data: dict[str, Any]) -> None:
        self.phase = str(data.get("phase", self.phase))
        self.pid = data["pid"] if isinstance(data.get("pid"), int) else None
        sent = data.get("secrets-sent")
        self.secrets_sent = float(sent) if isinstance(sent, (int, float)) else None
        self.sent_files = [str(f) for f in data.get("sent-files", [])]

    async def prepare(self, spec: ServiceSpec) -> None:
        """Before each spawn: accounts, SSH host keys, the disk overlay, checks."""
        s = self.s
        self.secrets_sent, self.sent_files, self.pid, self.phase = None, [], None, "preparing"
        await _ensure_accounts(s.user, s.group)
        if s.generate_host_keys and not _has_host_keys(s.secret_root):
            if not os.path.exists(s.secret_root):
                os.makedirs(s.secret_root, mode=0o700)  # secrets: root's only
            os.makedirs(os.path.join(s.secret_root, "etc", "ssh"), mode=0o755, exist_ok=True)
            await _run(["ssh-keygen", "-A", "-f", s.secret_root], f"generating SSH host keys in {s.secret_root}")
        if s.image is not None:
            if not os.path.isfile(s.image):
                raise HurdVMError(f"image {s.image} does not exist or is not a file")
            if s.disk_size != "guess":
                await self._overlay()
        try:  # a squatter on the port would get the secrets (QEMU could not bind it)
            await run_in_thread(owner.check_listener, "127.0.0.1", s.secrets_port, None)
        except owner.RecipientError as exc:
            raise HurdVMError(str(exc)) from None
        self.phase = "booting"

    async def _overlay(self) -> None:
        s = self.s
        assert s.image is not None
        disk = disk_path(s, self.state_dir)
        assert disk is not None
        directory = os.path.dirname(disk)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        pw = pwd.getpwnam(s.user)
        gid = grp.getgrnam(s.group).gr_gid
        os.chown(directory, pw.pw_uid, gid)
        os.chmod(directory, 0o700)
        # The directory is the VM user's: an entry there may be its symlink.
        # So the overlay is made in our own directory and renamed into place
        # (a rename replaces a symlink, never follows it), and it is handed
        # over through a descriptor opened without following one.
        if not os.path.lexists(disk):
            info = json.loads(await _run(["qemu-img", "info", "--output=json", s.image],
                                         f"reading the format of {s.image}"))
            fmt = info.get("format", "raw")
            size = str(s.disk_size)
            tmp = os.path.join(os.path.dirname(directory), f".{os.path.basename(directory)}-disk.qcow2.tmp")
            try:
                await _run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", os.path.abspath(s.image), "-F", fmt,
                            tmp, size], f"creating the {size} overlay {disk}")
                os.rename(tmp, disk)
            finally:
                if os.path.lexists(tmp):
                    os.unlink(tmp)
        try:
            chown_file(disk, pw.pw_uid, gid, 0o600)
        except OSError as exc:
            raise HurdVMError(f"disk {disk}: {exc.strerror}") from None

    async def ready(self, spec: ServiceSpec, pid: int) -> None:
        """After spawn: send the secrets to QEMU (`pid`), and to no other
        process on its port; the service is up when they are sent."""
        s = self.s
        self.pid, self.phase = pid, "waiting for the guest's secret service"
        name = spec.name

        def say(msg: str) -> None:
            log.info(f"secret service: {msg}", service=name)

        files = await secrets.send_secrets("127.0.0.1", s.secrets_port, s.secret_root, recipient_pid=pid,
                                           retries=s.connect_retries, retry_delay=1.0,
                                           handshake_timeout=s.handshake_timeout, log=say)
        self.secrets_sent = time.time()
        self.sent_files = [f.name for f in files]
        self.phase = "running"

    async def stop(self, spec: ServiceSpec) -> None:
        """Ask QEMU to stop: an ACPI power-down when the guest is up, else ``quit``."""
        if self.secrets_sent is not None:
            self.phase = "powering down"
            note(f"Asking the guest of {spec.name} to power down (QMP system_powerdown).")
            await qmp(self.qmp_socket, "system_powerdown")
        else:
            self.phase = "stopping"
            note(f"The guest of {spec.name} never got its secrets: stopping QEMU (QMP quit).")
            await qmp(self.qmp_socket, "quit")

    def details(self, spec: ServiceSpec) -> dict[str, Any]:
        s = self.s
        out: dict[str, Any] = {
            "ports": {"ssh": s.ssh_port, "secrets": s.secrets_port, "vnc": s.vnc_port},
            "vnc-display": f"127.0.0.1:{5900 + s.display}",
            "image": s.image,
            "disk": disk_path(s, self.state_dir),
            "memory-size": s.memory_size,
            "secret-root": s.secret_root,
            "kvm": self.kvm,
            "qmp-socket": self.qmp_socket,
            "phase": self.phase if self.pid is None or os.path.exists(f"/proc/{self.pid}") else "exited",
        }
        if s.id is not None:
            out = {"id": s.id, **out}
        if self.secrets_sent is not None:
            out["secrets-sent"] = {"files": len(self.sent_files),
                                   "at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.secrets_sent))}
        return out


# -- configuration ------------------------------------------------------------------------


def _read_qemu(t: Table) -> str:
    """An absolute path, or a program name looked up on `QEMU_PATH` when the
    service starts (whether it is there is a host check, as for any command)."""
    value = t.str("qemu", DEFAULT_QEMU, nonempty=True)
    if "/" in value and not value.startswith("/"):
        t.error("qemu", f"expected an absolute path or a program name on PATH, got {json.dumps(value)}")
    return value


def _boots(options: tuple[str, ...]) -> bool:
    """Whether `options` give QEMU a kernel, a drive or firmware to boot."""
    return any(o.startswith("-") and o.lstrip("-").split("=", 1)[0] in BOOT_OPTIONS for o in options)


def _read_id(t: Table) -> int | None:
    if t.raw("id", None) is False:  # the seed's #f: no id
        return None
    return t.int("id", None, min=1)


def _read_disk_size(t: Table) -> int | str:
    value = t.raw("disk-size", "guess")
    if value == "guess":
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str) and _SIZE_RE.match(value):
        return value
    t.error("disk-size", f'expected "guess", a size in bytes or a size like "5G", got {json.dumps(value)}')
    return "guess"


def _read_kvm(t: Table) -> str | bool:
    value = t.raw("kvm", "auto")
    if value == "auto" or isinstance(value, bool):
        return value
    t.error("kvm", f'expected "auto", true or false, got {json.dumps(value)}')
    return "auto"


def read_settings(t: Table, *, host_checks: bool = True) -> Settings:
    """Validate one table; errors are recorded on `t`, each naming its key path.

    `host_checks` is accepted for the service-type interface; nothing here
    depends on the host (``qemu`` on PATH is a host check of the spec).
    """
    id_ = _read_id(t)
    image = t.str("image", None, nonempty=True)
    if image is not None and not image.startswith("/"):
        t.error("image", f"must be an absolute path, got {json.dumps(image)}")
    disk_size = _read_disk_size(t)
    if disk_size != "guess" and image is None:
        t.error("disk-size", 'needs "image" (the overlay is backed by it)')
        disk_size = "guess"
    secret_root = t.str("secret-root", "/etc/childhurd", nonempty=True)
    if not secret_root.startswith("/"):
        t.error("secret-root", f"must be an absolute path, got {json.dumps(secret_root)}")
    secret_root = os.path.normpath(secret_root)
    net = t.str_list("net-options", None)
    settings = Settings(
        id=id_,
        qemu=_read_qemu(t),
        image=image,
        disk_size=disk_size,
        memory_size=t.int("memory-size", 512, min=1),
        options=t.str_list("options", ("--snapshot",)),
        net_options=net,
        secret_root=secret_root,
        kvm=_read_kvm(t),
        vnc_display=t.int("vnc-display", None, min=0, max=65535 - 5900),
        user=t.str("user", DEFAULT_USER, nonempty=True),
        group=t.str("group", DEFAULT_GROUP, nonempty=True),
        handshake_timeout=t.number("handshake-timeout", 180.0, min=0, exclusive_min=True),
        connect_retries=t.int("connect-retries", 60, min=0),
        powerdown_timeout=t.number("powerdown-timeout", 30.0, min=0, exclusive_min=True),
        generate_host_keys=t.bool("generate-host-keys", True),
        auto_start=t.bool("auto-start", True),
        requires=t.str_list("requires"),
    )
    if (image is None and not t.has("disk-size") and isinstance(t.raw("options", []), list)
            and not _boots(settings.options)):
        t.error("image", "QEMU would have nothing to boot: give image (the disk image to boot), or a kernel "
                         'or a drive in options (e.g. ["-kernel", "/boot/vmlinuz", "-initrd", "/boot/initrd"] '
                         'or ["-drive", "file=/srv/disk.img,format=raw"])')
    t.finish()
    return settings


def _documentation(s: Settings, disk: str | None) -> str:
    return (
        "Run the Hurd in a Virtual Machine: a Childhurd.\n"
        f"Ports on 127.0.0.1: SSH {s.ssh_port} (guest {GUEST_SSH_PORT}), secrets {s.secrets_port} "
        f"(guest {GUEST_SECRETS_PORT}), VNC forward {s.vnc_port} (guest {GUEST_VNC_PORT}); QEMU's own "
        f"display: VNC 127.0.0.1:{5900 + s.display}.\n"
        f"Disk: {disk or 'none'}; memory: {s.memory_size} MiB.\n"
        f"Start spawns QEMU as {s.user}:{s.group} and sends the files under {s.secret_root} to the "
        "guest's secret service; the service is up when they are sent. Stop powers the guest off "
        f"through QMP (system_powerdown), then sends SIGTERM after {s.powerdown_timeout:g} s."
    )


def build(tables: list[Table], ctx: BuildContext) -> list[ServiceSpec]:
    """``[[hurd-vm]]`` → one service per instance; never raises, never writes."""
    state_dir = str(ctx.settings.state_dir)
    parsed: list[tuple[Table, Settings]] = []
    checks: dict[str, _health.Choice] = {}
    wrong: list[tuple[Table, Settings]] = []
    for t in tables:
        if t.ok:
            checks[t.path] = _health.choice(t)  # (before read_settings finishes the table)
            before = len(t.errors)
            s = read_settings(t, host_checks=ctx.host_checks)
            (parsed if len(t.errors) == before else wrong).append((t, s))
    by_id: dict[int | None, Table] = {}
    ports: dict[int, tuple[Table, str]] = {}
    out: list[ServiceSpec] = []
    for t, s in parsed:
        if s.id in by_id:
            t.error("id", f"instance {s.name} is defined twice (also at {by_id[s.id].path}); "
                          "give each [[hurd-vm]] its own id")
            continue
        by_id[s.id] = t
        clash = False
        for port, what in sorted(s.host_ports().items()):
            if port in ports:
                other, other_what = ports[port]
                t.error(None, f"port {port} ({what} of {s.name}) is also the {other_what} port "
                              f"({other.path}); give the instances different ids")
                clash = True
            elif not 0 < port < 65536:
                t.error(None, f"port {port} ({what} of {s.name}) is out of range")
                clash = True
            else:
                ports[port] = (t, f"{what} of {s.name}")
        qmp_sock = qmp_path(s, state_dir)
        if len(os.fsencode(qmp_sock)) > 107:
            t.error(None, f"the QMP socket path {qmp_sock} is longer than 107 bytes; use a shorter state-dir")
            clash = True
        if clash:
            continue
        out.append(_instance_spec(t, s, state_dir, checks[t.path]))
    # An instance with an error of its own is not compared with the others
    # (no "defined twice" for an id = 0), and is built only under a free name,
    # so that a service requiring it gets no second error.
    names = {spec.name for spec in out}
    for t, s in wrong:
        if s.name not in names:
            names.add(s.name)
            out.append(_instance_spec(t, s, state_dir, checks[t.path]))
    return out


def _instance_spec(t: Table, s: Settings, state_dir: str, health: _health.Choice) -> ServiceSpec:
    """The service of one instance."""
    kvm = kvm_usable(s.group, s.user) if s.kvm == "auto" else bool(s.kvm)
    impl = HurdVM(s, state_dir, kvm)
    disk = disk_path(s, state_dir)
    qmp_sock = qmp_path(s, state_dir)
    # The readiness step may take: every connection attempt, the handshake,
    # and the preparations (user creation, ssh-keygen, qemu-img).
    start_timeout = s.connect_retries * 1.0 + s.handshake_timeout + 60.0
    return ServiceSpec(
        name=s.name,
        command=qemu_command(s, state_dir=state_dir, kvm=kvm),
        provides=(s.alias,),
        requires=s.requires,
        documentation=_documentation(s, disk),
        auto_start=s.auto_start,
        user=s.user,
        group=s.group,
        environment=(("TMPDIR", "/tmp"), *((("PATH", QEMU_PATH),) if "/" not in s.qemu else ())),
        clear_environment=True,
        stop_signal=int(signal.SIGTERM),
        stop_timeout=s.powerdown_timeout,
        kill_mode="process-group",
        start_timeout=start_timeout,
        sockets=(SocketSpec(name="qmp", path=qmp_sock, mode=0o600),),
        prepare_hook=impl.prepare,
        # _ensure_accounts: the default account and group only.
        creates=Creates(users=(s.user,) if s.user == DEFAULT_USER else (),
                        groups=(s.group,) if s.group == DEFAULT_GROUP else ()),
        ready_hook=impl.ready,
        stop_hook=impl.stop,
        details_hook=impl.details,
        type_state=impl,
        # the guest's SSH server, on its forward (none with net-options of one's own)
        health=health(_health.ssh_banner(f"127.0.0.1:{s.ssh_port}") if s.net_options is None else None),
        parameters=(s, kvm, state_dir),
        source=t.path,
        keys=(("command", "qemu"),),
    )


SERVICE_TYPES = [ServiceType(
    table="hurd-vm", build=build, array=True,
    documentation="GNU/Hurd (or any guest) in QEMU with secrets pushed at boot (Guix's hurd-vm-service-type).",
)]
