"""What the supervisor does first, and last, as the init of a machine (``--boot``).

Before the configuration is read: the file systems every Linux system needs
and the supervisor itself uses are mounted (`mount_api_filesystems`: /proc,
/sys, /dev, /dev/pts, /dev/shm, /run and the cgroup v2 hierarchy; each only
if nothing is mounted there yet, so a re-exec or an initramfs that mounted
them already changes nothing), Ctrl-Alt-Del is handed to us as SIGINT
instead of rebooting at once (`reboot(LINUX_REBOOT_CMD_CAD_OFF)`), and the
environment gets a PATH and a umask.  Everything else early boot does (the
hostname, loopback, kernel modules, other file systems) is ordinary one-shot
services of the configuration, so that an operator sees and changes their
order (docs/boot.md).

At the end, after every service stopped: `unmount_all` unmounts what is
mounted, deepest first, or remounts it read-only when it is busy, then
`pid1.reboot` syncs and calls reboot(2).
"""

from __future__ import annotations

import ctypes
import os
from typing import Final

import structlog

__all__ = ["API_MOUNTS", "disable_ctrl_alt_del", "mount_api_filesystems", "prepare", "unmount_all"]

log = structlog.get_logger("supervisor.boot")

MS_RDONLY: Final = 1
MS_NOSUID: Final = 2
MS_NODEV: Final = 4
MS_NOEXEC: Final = 8
MS_REMOUNT: Final = 32
MNT_DETACH: Final = 2
LINUX_REBOOT_CMD_CAD_OFF: Final = 0

#: (source, target, type, flags, options), in the order they are mounted.
API_MOUNTS: Final = (
    ("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
    ("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
    ("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755"),
    ("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=0620,ptmxmode=0666"),
    ("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
    ("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"),
    ("cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC, "nsdelegate"),
)

#: As init, how long the re-exec's check of the new image may take (seconds):
#: a machine booting on an emulated CPU imports the supervisor slowly.
REEXEC_CHECK_TIMEOUT: Final = 600.0

#: A PATH for the services when the kernel gave none.
DEFAULT_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_libc = ctypes.CDLL(None, use_errno=True)


def _mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    """mount(2).

    Raises:
        OSError: the kernel refused.
    """
    if _libc.mount(source.encode(), target.encode(), fstype.encode(), ctypes.c_ulong(flags),
                   data.encode() if data else None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def mount_api_filesystems() -> list[str]:
    """Mount each of `API_MOUNTS` not mounted yet; return the targets mounted.

    A mount that fails is logged (the console is all there is now) and
    skipped: the supervisor runs on without it, and says what is missing.
    """
    done = []
    for source, target, fstype, flags, data in API_MOUNTS:
        try:
            if os.path.ismount(target):
                continue
            os.makedirs(target, mode=0o755, exist_ok=True)
            try:
                _mount(source, target, fstype, flags, data)
            except OSError:
                if not data:
                    raise
                _mount(source, target, fstype, flags, "")  # e.g. an older kernel without nsdelegate
            done.append(target)
        except OSError as exc:
            log.error("cannot mount", target=target, type=fstype, error=exc.strerror or str(exc))
    if done:
        log.info("mounted", targets=done)
    return done


def disable_ctrl_alt_del() -> None:
    """Let the kernel send SIGINT to PID 1 on Ctrl-Alt-Del, instead of rebooting at once."""
    if _libc.reboot(ctypes.c_int(LINUX_REBOOT_CMD_CAD_OFF)) != 0:
        log.warning("cannot take over Ctrl-Alt-Del", error=os.strerror(ctypes.get_errno()))


def prepare() -> None:
    """All of early boot that is built in, in order (see the module's docstring)."""
    os.umask(0o022)
    os.environ.setdefault("PATH", DEFAULT_PATH)
    os.environ.setdefault("HOME", "/")
    os.chdir("/")
    mount_api_filesystems()
    disable_ctrl_alt_del()


def _mounts() -> list[tuple[str, str]]:
    """(target, type) of every mount, in the order they were made."""
    found = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                sep = fields.index("-")
                target = fields[4].replace("\\040", " ")
                found.append((target, fields[sep + 1]))
    except (OSError, ValueError):
        pass
    return found


def unmount_all() -> None:
    """Unmount every file system, the last mounted first; one that is busy
    (or the root) is remounted read-only instead.  Never raises: at this
    point a failure is said on the console and the machine goes down anyway."""
    os.sync()
    for target, fstype in reversed(_mounts()):
        if target == "/":
            continue
        if _libc.umount2(target.encode(), 0) == 0:
            log.info("unmounted", target=target)
            continue
        err = ctypes.get_errno()
        if fstype in ("proc", "sysfs", "devtmpfs", "devpts", "cgroup2", "tmpfs", "mqueue"):
            continue  # nothing to lose: no data outlives the machine in these
        if _libc.mount(None, target.encode(), None, ctypes.c_ulong(MS_REMOUNT | MS_RDONLY), None) == 0:
            log.info("remounted read-only", target=target, busy=os.strerror(err))
        else:
            log.warning("cannot unmount or remount read-only", target=target,
                        error=os.strerror(ctypes.get_errno()))
    if _libc.mount(None, b"/", None, ctypes.c_ulong(MS_REMOUNT | MS_RDONLY), None) == 0:
        log.info("remounted read-only", target="/")
    os.sync()
