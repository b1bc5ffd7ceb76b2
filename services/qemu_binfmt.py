"""``[qemu-binfmt]``: Guix's ``qemu-binfmt-service-type`` (``docs/service-qemu-binfmt.md``).

A service with no process: its start registers one QEMU user-mode emulator per
platform with binfmt_misc, its stop removes them.  Its requirement
``file-system-binfmt_misc`` mounts binfmt_misc.  The platform table is Guix's,
unchanged; the interpreters default to Debian's ``qemu-user-static``.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
from dataclasses import dataclass
from typing import Any

from supervisor import ActionContext, ActionSpec, BuildContext, ServiceSpec, ServiceType, Table

__all__ = ["KNOWN", "PLATFORMS", "SERVICE_TYPES", "BinfmtError", "Platform", "Settings", "read_settings",
           "registration"]

DEFAULT_BINFMT_MISC = "/proc/sys/fs/binfmt_misc"
MOUNT_SERVICE = "file-system-binfmt_misc"
#: Flags the kernel accepts: P (preserve argv[0]), O (open binary), C
#: (credentials; implies O), F (fix binary: open the interpreter now).
KERNEL_FLAGS = "POCF"


class BinfmtError(Exception):
    """A start or stop that failed; the message names the platform and the reason."""


@dataclass(frozen=True, slots=True)
class Platform:
    """One row of Guix's platform table."""

    name: str
    family: str
    magic: bytes
    mask: bytes
    #: In Guix's ``%qemu-platforms`` (so ``lookup-qemu-platforms`` finds it).
    listed: bool = True


#: Guix's platform definitions, in its order: name, family, whether it is in
#: ``%qemu-platforms`` (four are defined but not listed), magic, mask (hex).
_TABLE = """
i386         i386         yes 7f454c4601010100000000000000000002000300 fffffffffffefefffffffffffffffffffeffffff
i486         i386         no  7f454c4601010100000000000000000002000600 fffffffffffefe00fffffffffffffffffeffffff
x86_64       i386         yes 7f454c4602010100000000000000000002003e00 fffffffffffefe00fffffffffffffffffeffffff
alpha        alpha        yes 7f454c4602010100000000000000000002002690 fffffffffffefefffffffffffffffffffeffffff
arm          arm          yes 7f454c4601010100000000000000000002002800 ffffffffffffff00fffffffffffffffffeffffff
armeb        armeb        no  7f454c4601020100000000000000000000020028 ffffffffffffff00fffffffffffffffffffeffff
sparc        sparc        no  7f454c4601020100000000000000000000020002 fffffffffffffffffffffffffffffffffffeffff
sparc32plus  sparc        yes 7f454c4601020100000000000000000000020012 fffffffffffffffffffffffffffffffffffeffff
sparc64      sparc        yes 7f454c460202010000000000000000000002002b ffffffffffffff00fffffffffffffffffffeffff
ppc          ppc          yes 7f454c4601020100000000000000000000020014 ffffffffffffff00fffffffffffffffffffeffff
ppc64        ppc          yes 7f454c4602020100000000000000000000020015 ffffffffffffff00fffffffffffffffffffeffff
ppc64le      ppcle        yes 7f454c4602010100000000000000000002001500 ffffffffffffff00fffffffffffffffffeffff00
m68k         m68k         yes 7f454c4601020100000000000000000000020004 fffffffffffffefefffffffffffffffffffeffff
mips         mips         yes 7f454c4601020100000000000000000000020008 ffffffffffffff00fffffffffffffffffffeffff
mipsel       mips         yes 7f454c4601010100000000000000000002000800 ffffffffffffff00fffffffffffffffffeffffff
mipsn32      mips         yes 7f454c4601020100000000000000000000020008 ffffffffffffff00fffffffffffffffffffeffff
mipsn32el    mips         yes 7f454c4601010100000000000000000002000800 ffffffffffffff00fffffffffffffffffeffffff
mips64       mips         yes 7f454c4602020100000000000000000000020008 ffffffffffffff00fffffffffffffffffffeffff
mips64el     mips         yes 7f454c4602010100000000000000000002000800 ffffffffffffff00fffffffffffffffffeffffff
sh4          sh4          yes 7f454c4601010100000000000000000002002a00 fffffffffffffffffffffffffffffffffeffffff
sh4eb        sh4          yes 7f454c460102010000000000000000000002002a fffffffffffffffffffffffffffffffffffeffff
s390x        s390x        yes 7f454c4602020100000000000000000000020016 fffffffffffffffffffffffffffffffffffeffff
aarch64      arm          yes 7f454c460201010000000000000000000200b700 ffffffffffffff00fffffffffffffffffeffffff
aarch64be    armeb        no  7f454c46020201000000000000000000000200b7 ffffffffffffff00fffffffffffffffffffeffff
hppa         hppa         yes 7f454c460102010000000000000000000002000f ffffffffffffff00fffffffffffffffffffeffff
riscv32      riscv        yes 7f454c460101010000000000000000000200f300 ffffffffffffff00fffffffffffffffffeffffff
riscv64      riscv        yes 7f454c460201010000000000000000000200f300 ffffffffffffff00fffffffffffffffffeffffff
xtensa       xtensa       yes 7f454c4601010100000000000000000002005e00 ffffffffffffff00fffffffffffffffffeffffff
xtensaeb     xtensaeb     yes 7f454c460102010000000000000000000002005e ffffffffffffff00fffffffffffffffffffeffff
microblaze   microblaze   yes 7f454c460102010000000000000000000200baab ffffffffffffff00fffffffffffffffffeffffff
microblazeel microblazeel yes 7f454c460101010000000000000000000200abba ffffffffffffff00fffffffffffffffffeffffff
or1k         or1k         yes 7f454c460102010000000000000000000002005c ffffffffffffff00fffffffffffffffffffeffff
hexagon      hexagon      yes 7f454c460101010000000000000000000200a400 ffffffffffffff00fffffffffffffffffeffffff
loongarch64  loongarch    yes 7f454c4602010100000000000000000002000201 fffffffffffffffc00fffffffffffffffeffffff
"""
PLATFORMS: tuple[Platform, ...] = tuple(
    Platform(name, family, bytes.fromhex(magic), bytes.fromhex(mask), listed == "yes")
    for name, family, listed, magic, mask in (row.split() for row in _TABLE.strip().splitlines())
)
BY_NAME: dict[str, Platform] = {p.name: p for p in PLATFORMS}
#: The names ``platforms`` accepts: Guix's ``%qemu-platforms``, in its order.
KNOWN: tuple[str, ...] = tuple(p.name for p in PLATFORMS if p.listed)


def escape(data: bytes) -> str:
    r"""Every byte as ``\xHH`` (lowercase), as Guix writes magic and mask."""
    return "".join(f"\\x{b:02x}" for b in data)


def registration(platform: Platform, interpreter: str, flags: str = "FP") -> str:
    """The line written to ``register``: ``:qemu-NAME:M::MAGIC:MASK:INTERPRETER:FLAGS``."""
    return f":qemu-{platform.name}:M::{escape(platform.magic)}:{escape(platform.mask)}:{interpreter}:{flags}"


@dataclass(frozen=True, slots=True)
class Settings:
    """The ``[qemu-binfmt]`` table, validated."""

    platforms: tuple[Platform, ...] = ()
    guix_support: bool = False
    interpreter_directory: str = "/usr/bin"
    interpreter_suffix: str = "-static"
    flags: str = "FP"
    binfmt_misc: str = DEFAULT_BINFMT_MISC
    auto_start: bool = True

    def interpreter(self, platform: Platform) -> str:
        return f"{self.interpreter_directory.rstrip('/')}/qemu-{platform.name}{self.interpreter_suffix}"

    def registration(self, platform: Platform) -> str:
        return registration(platform, self.interpreter(platform), self.flags)

    def entry_path(self, platform: Platform) -> str:
        return os.path.join(self.binfmt_misc, f"qemu-{platform.name}")


# -- binfmt_misc I/O (small synchronous file operations on /proc) ------------------------


def is_mounted(path: str) -> bool:
    """Whether the topmost mount on `path` (per /proc/self/mounts) is binfmt_misc."""
    target, fstype = os.path.realpath(path), None
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            for fields in (line.split() for line in f):
                where = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[1]) if len(fields) > 2 else ""
                if where and os.path.normpath(where) == target:
                    fstype = fields[2]
    except OSError:
        return False
    return fstype == "binfmt_misc"


def _mount_binfmt_misc(path: str) -> None:
    """mount(2) binfmt_misc on `path` (nosuid, nodev, noexec): no shell, no program."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    ms_nosuid, ms_nodev, ms_noexec = 2, 4, 8
    if libc.mount(b"binfmt_misc", os.fsencode(path), b"binfmt_misc", ms_nosuid | ms_nodev | ms_noexec, None):
        raise BinfmtError(f"cannot mount binfmt_misc on {path}: {os.strerror(ctypes.get_errno())}")


def _write(path: str, data: str) -> None:
    """One open, one write(2), one close: the kernel takes each write as one command."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)


def read_entry(path: str) -> dict[str, str] | None:
    """A binfmt_misc entry as a dict (``state``, ``interpreter``, ``flags``, ``offset``,
    ``magic``, ``mask``); None when there is no such entry."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except (FileNotFoundError, NotADirectoryError):
        return None
    out = {"state": lines[0].strip()} if lines else {}
    for line in lines[1:]:
        key, _, value = line.partition(" ")
        out[key.rstrip(":")] = value.strip()
    return out


def _masked(magic: bytes, mask: bytes) -> bytes:
    return bytes(a & b for a, b in zip(magic, mask, strict=False))


def matches(entry: dict[str, str], settings: Settings, platform: Platform) -> bool:
    """Whether a registered entry has the content `settings` registers (enabled or not)."""
    want_flags = set(settings.flags) | ({"O"} if "C" in settings.flags else set())
    try:
        magic, mask = bytes.fromhex(entry.get("magic", "")), bytes.fromhex(entry.get("mask", ""))
    except ValueError:
        return False
    return (entry.get("interpreter") == settings.interpreter(platform)
            and set(entry.get("flags", "")) == want_flags
            and entry.get("offset", "0") == "0"
            and mask == platform.mask
            and _masked(magic, mask) == _masked(platform.magic, platform.mask))


def _kernel_error(platform: Platform, interpreter: str, exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    if exc.errno == 2:  # ENOENT: with F, the kernel opens the interpreter at registration
        return f"{platform.name}: interpreter {interpreter} not found ({reason})"
    return f"{platform.name}: the kernel refused the registration of {interpreter} ({reason})"


# -- the services ------------------------------------------------------------------------


class QemuBinfmt:
    """Hooks and actions of one ``[qemu-binfmt]`` configuration."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def mount(self, spec: ServiceSpec) -> None:
        """Start of the mount service: mount binfmt_misc unless it is mounted already.

        Raises:
            BinfmtError: mount(2) failed (not permitted, no such directory).
        """
        if not is_mounted(self.settings.binfmt_misc):
            _mount_binfmt_misc(self.settings.binfmt_misc)

    async def start(self, spec: ServiceSpec) -> None:
        """Register every platform; on any failure, undo what this start did and raise.

        Runs without a checkpoint, so a stop cannot cancel it half-way.

        Raises:
            BinfmtError: binfmt_misc is not mounted, a platform has a different
                handler registered, or the kernel refused a registration.
        """
        s = self.settings
        register = os.path.join(s.binfmt_misc, "register")
        if not os.path.exists(register):
            raise BinfmtError(f"binfmt_misc is not mounted on {s.binfmt_misc} ({register} is missing)")
        plan: list[tuple[Platform, dict[str, str] | None]] = []
        for p in s.platforms:  # every conflict is found before anything changes
            entry = read_entry(s.entry_path(p))
            if entry is not None and not matches(entry, s, p):
                raise BinfmtError(
                    f"{p.name}: a different handler qemu-{p.name} is already registered (interpreter "
                    f"{entry.get('interpreter', '?')}, flags {entry.get('flags') or '-'}; this service's: "
                    f"{s.interpreter(p)}, flags {s.flags or '-'}); remove it first "
                    f"(echo -1 > {s.entry_path(p)})")
            plan.append((p, entry))
        undo: list[tuple[str, str]] = []
        try:
            for p, entry in plan:
                if entry is None:
                    try:
                        _write(register, s.registration(p))
                    except OSError as exc:
                        raise BinfmtError(_kernel_error(p, s.interpreter(p), exc)) from None
                    undo.append((s.entry_path(p), "-1"))
                elif entry.get("state") != "enabled":  # identical but disabled: enable it
                    try:
                        _write(s.entry_path(p), "1")
                    except OSError as exc:
                        raise BinfmtError(f"{p.name}: could not enable qemu-{p.name} ({exc.strerror})") from None
                    undo.append((s.entry_path(p), "0"))
        except BinfmtError as exc:
            problems = [str(exc)]
            for path, data in reversed(undo):
                try:
                    _write(path, data)
                except OSError as err:
                    problems.append(f"could not undo {path}: {err.strerror}")
            raise BinfmtError("; ".join(problems)) from None

    async def stop(self, spec: ServiceSpec) -> None:
        """Remove each configured platform's handler whose content is this service's.

        Raises:
            BinfmtError: some handler was left (a different one, or removal failed);
                the engine notes it and the service is stopped anyway.
        """
        s = self.settings
        problems = []
        for p in s.platforms:
            entry = read_entry(s.entry_path(p))
            if entry is None:
                continue
            if not matches(entry, s, p):
                problems.append(f"{p.name}: left qemu-{p.name} alone (not this service's handler: "
                                f"interpreter {entry.get('interpreter', '?')})")
                continue
            try:
                _write(s.entry_path(p), "-1")
            except OSError as exc:
                problems.append(f"{p.name}: could not remove qemu-{p.name} ({exc.strerror})")
        if problems:
            raise BinfmtError("; ".join(problems))

    def details(self, spec: ServiceSpec) -> dict[str, Any]:
        """For ``herd status qemu-binfmt``: each platform as the kernel sees it."""
        s = self.settings
        platforms = []
        for p in s.platforms:
            entry = read_entry(s.entry_path(p))
            platforms.append({"name": p.name, "registered": entry is not None,
                              "enabled": entry is not None and entry.get("state") == "enabled",
                              "matches": entry is not None and matches(entry, s, p),
                              "interpreter": s.interpreter(p) if entry is None else entry.get("interpreter"),
                              "flags": None if entry is None else entry.get("flags")})
        return {"platforms": platforms, "guix-support": s.guix_support, "flags": s.flags,
                "binfmt-misc": self.mount_details(spec)}

    def mount_details(self, spec: ServiceSpec) -> dict[str, Any]:
        return {"path": self.settings.binfmt_misc, "mounted": is_mounted(self.settings.binfmt_misc)}

    def entry(self, p: Platform) -> dict[str, Any]:
        """A platform's table entry and what this configuration registers for it."""
        s = self.settings
        return {"name": p.name, "family": p.family, "in-qemu-platforms": p.listed,
                "configured": p in s.platforms, "magic": escape(p.magic), "mask": escape(p.mask),
                "interpreter": s.interpreter(p), "flags": s.flags, "registration": s.registration(p)}

    async def lookup(self, ctx: ActionContext, args: list[Any]) -> Any:
        """``herd lookup qemu-binfmt [NAME]``: one platform's entry, or all of them."""
        if not args:
            for p in PLATFORMS:
                ctx.say(f"{p.name:<13} {p.family:<13}" + ("" if p.listed else " (not in %qemu-platforms)"))
            return {"platforms": [self.entry(p) for p in PLATFORMS]}
        if len(args) != 1 or not isinstance(args[0], str):
            raise BinfmtError("usage: herd lookup qemu-binfmt [PLATFORM]")
        found = BY_NAME.get(args[0])
        if found is None:
            raise BinfmtError(f"unknown platform {json.dumps(args[0])} (known: {', '.join(KNOWN)})")
        entry = self.entry(found)
        for key, value in entry.items():
            ctx.say(f"{key}: {('yes' if value else 'no') if isinstance(value, bool) else value}")
        return entry


# -- configuration -------------------------------------------------------------------------


def _check_path(t: Table, key: str, value: str) -> None:
    if not value.startswith("/"):
        t.error(key, f"must be an absolute path, got {json.dumps(value)}")
    elif any(c in value for c in ":\n\0"):
        t.error(key, f"must not contain ':', a newline or NUL (they end a binfmt_misc field), "
                     f"got {json.dumps(value)}")


def _read_platforms(t: Table) -> tuple[Platform, ...]:
    raw = t.raw("platforms", [])
    if not isinstance(raw, list):
        t.error("platforms", f"expected an array of platform names, got {json.dumps(raw, default=str)}")
        return ()
    known = ", ".join(KNOWN)
    out: list[Platform] = []
    for i, name in enumerate(raw):
        key = f"platforms[{i}]"
        if not isinstance(name, str):
            t.error(key, f"expected a platform name (a string), got {json.dumps(name, default=str)}")
        elif name not in BY_NAME:
            t.error(key, f"unknown platform {json.dumps(name)} (known: {known})")
        elif not BY_NAME[name].listed:
            t.error(key, f"platform {json.dumps(name)} is defined by Guix but not in %qemu-platforms, "
                         f"so it is not available (known: {known})")
        elif BY_NAME[name] in out:
            t.error(key, f"{json.dumps(name)} is listed twice")
        else:
            out.append(BY_NAME[name])
    return tuple(out)


def _read_directory(t: Table) -> str:
    """``interpreter-directory``, or Guix's ``qemu`` (where QEMU is installed: the
    interpreters are ``QEMU/bin/qemu-NAME-static``); not both."""
    t.raw("qemu")  # a known key, even when absent
    if t.has("qemu") and t.has("interpreter-directory"):
        t.raw("interpreter-directory")
        t.error("qemu", "give either qemu (QEMU's installation prefix; the interpreters are in its bin/) "
                        "or interpreter-directory, not both")
        return "/usr/bin"
    if t.has("qemu"):
        prefix = t.str("qemu", "/usr", nonempty=True)
        _check_path(t, "qemu", prefix)
        return f"{prefix.rstrip('/')}/bin"
    directory = t.str("interpreter-directory", "/usr/bin", nonempty=True)
    _check_path(t, "interpreter-directory", directory)
    return directory


def read_settings(t: Table) -> Settings:
    """Validate the table; errors are recorded on `t`, each naming its key path."""
    platforms = _read_platforms(t)
    directory = _read_directory(t)
    suffix = t.str("interpreter-suffix", "-static")
    if any(c in suffix for c in "/:\n\0"):
        t.error("interpreter-suffix", f"must not contain '/', ':', a newline or NUL, got {json.dumps(suffix)}")
    flags = t.str("flags", "FP")
    if any(c not in KERNEL_FLAGS for c in flags) or len(set(flags)) != len(flags):
        t.error("flags", f'expected letters from "{KERNEL_FLAGS}", each at most once, got {json.dumps(flags)}')
        flags = "FP"
    binfmt_misc = t.str("binfmt-misc-path", DEFAULT_BINFMT_MISC, nonempty=True)
    _check_path(t, "binfmt-misc-path", binfmt_misc)
    settings = Settings(platforms=platforms, guix_support=t.bool("guix-support", False),
                        interpreter_directory=directory, interpreter_suffix=suffix, flags=flags,
                        binfmt_misc=os.path.normpath(binfmt_misc), auto_start=t.bool("auto-start", True))
    t.finish()
    return settings


def _documentation(s: Settings) -> str:
    names = ", ".join(p.name for p in s.platforms) or "none (the safest default: nothing is registered)"
    pattern = f"{s.interpreter_directory.rstrip('/')}/qemu-NAME{s.interpreter_suffix}"
    return (
        "Install binfmt_misc handlers for QEMU, so that programs built for another architecture run "
        "transparently under QEMU's user-mode emulator.\n"
        f"Platforms: {names}.\n"
        f"Start writes one registration per platform to {s.binfmt_misc}/register, "
        f":qemu-NAME:M::MAGIC:MASK:{pattern}:{s.flags}, with Guix's magic and mask. An identical "
        "handler already there is kept; a different one is an error; when one registration fails, "
        "those made before it are removed and the start fails.\n"
        "Stop writes -1 to each qemu-NAME entry whose content is this service's.\n"
        f"guix-support: {'true' if s.guix_support else 'false'} (no effect outside Guix, where it "
        "added QEMU to guix-daemon's build chroot).\n"
        "`herd status qemu-binfmt` shows what the kernel has registered for each platform; "
        "`herd lookup qemu-binfmt [NAME]` shows Guix's table entry for a platform (all without NAME)."
    )


def build(t: Table, ctx: BuildContext) -> list[ServiceSpec]:
    """``[qemu-binfmt]`` → the mount service and ``qemu-binfmt``; never raises, never writes."""
    if not t.ok:
        return []
    s = read_settings(t)
    impl = QemuBinfmt(s)
    mount = ServiceSpec(
        name=MOUNT_SERVICE,
        provides=(f"file-system-{s.binfmt_misc}",),
        documentation=(f"Mount the binfmt_misc file system on {s.binfmt_misc} unless it is mounted. "
                       "Stopping it leaves binfmt_misc mounted: other tools' handlers live there "
                       "too, and unmounting would hide or drop them all."),
        auto_start=s.auto_start,
        respawn=False,  # no process: nothing to respawn
        start_hook=impl.mount,
        details_hook=impl.mount_details,
        parameters=s.binfmt_misc,
        source=t.path,
    )
    service = ServiceSpec(
        name="qemu-binfmt",
        requires=(MOUNT_SERVICE,),
        documentation=_documentation(s),
        auto_start=s.auto_start,
        respawn=False,
        actions=(ActionSpec("lookup", "lookup [NAME]: Guix's table entry for a platform (family, magic, "
                                      "mask) and its registration string; every platform without NAME.",
                            impl.lookup, read_only=True),),
        start_hook=impl.start,
        stop_hook=impl.stop,
        details_hook=impl.details,
        parameters=s,
        source=t.path,
    )
    return [mount, service]


SERVICE_TYPES = [ServiceType(
    table="qemu-binfmt", build=build,
    documentation="QEMU user-mode emulators registered with binfmt_misc (Guix's qemu-binfmt-service-type).",
)]
