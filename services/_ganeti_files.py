"""The files of ``[ganeti]``: file-storage-paths, hooks and the OS variants.

Guix puts them under ``/etc/ganeti`` through its etc service; here they are
written (atomically) by the daemons' prepare hook, before each start, into
``config-directory`` (default ``/etc/ganeti``):

* ``file-storage-paths``: the paths joined by newlines, no trailing newline;
  only when the list is not empty.
* ``hooks``: a symlink to the configured Ganeti hooks directory, when set.
* for each OS: ``instance-NAME/variants/VARIANT[EXT]`` (a symlink to a file
  given by path, or a file with the given or generated content) and
  ``instance-NAME/variants/variants.list`` (the names, one per line).
* for a debootstrap variant whose ``hooks`` is a table (or the default): the
  hooks directory ``instance-NAME/customize/VARIANT/`` named by its
  ``CUSTOMIZE_DIR``.

Reading these tables is in ``services/ganeti.py``'s style: errors are recorded
on the `Table`, nothing raises for bad input.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

from supervisor import Table, replace_file

__all__ = ["DEFAULT_EXTRA_PKGS", "DEFAULT_HOOKS", "DEFAULT_OS", "Debootstrap", "Files", "GanetiOS", "Hook",
           "Variant", "debootstrap_conf", "plan", "read_files", "write_files"]

#: Guix's ``%default-debootstrap-extra-pkgs``.
DEFAULT_EXTRA_PKGS: tuple[str, ...] = ("acpi-support-base", "udev", "linux-image-amd64", "openssh-server",
                                       "locales-all", "grub-pc")

_INTERFACES_HOOK = """#!/bin/sh
# Configure the instance's first network interface (eth0) for DHCP.
# Written by the supervisor's [ganeti] service type (default debootstrap hooks).
set -e
if [ -z "$TARGET" ] || [ ! -d "$TARGET/etc/network" ]; then
  echo "10-interfaces: missing target directory $TARGET/etc/network" >&2
  exit 1
fi
if [ "${NIC_COUNT:-0}" -gt 0 ]; then
  cat > "$TARGET/etc/network/interfaces" <<'EOF'
auto lo
iface lo inet loopback

auto eth0
iface eth0 inet dhcp
EOF
fi
"""

_GRUB_HOOK = """#!/bin/sh
# Install GRUB in the instance, with a serial console (ttyS0, 115200 baud).
# Written by the supervisor's [ganeti] service type (default debootstrap hooks).
set -e
if [ -z "$TARGET" ] || [ ! -d "$TARGET" ] || [ -z "$BLOCKDEV" ]; then
  echo "90-grub: TARGET and BLOCKDEV must be set" >&2
  exit 1
fi
cleanup() {
  for d in dev sys proc; do umount "$TARGET/$d" 2>/dev/null || true; done
}
trap cleanup EXIT
for d in proc sys dev; do mount --bind "/$d" "$TARGET/$d"; done
cat >> "$TARGET/etc/default/grub" <<'EOF'
GRUB_TIMEOUT_STYLE=menu
GRUB_CMDLINE_LINUX="console=ttyS0,115200 net.ifnames=0"
GRUB_TERMINAL=serial
GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"
EOF
chroot "$TARGET" grub-install "$BLOCKDEV"
chroot "$TARGET" update-grub
"""


@dataclass(frozen=True, slots=True)
class Hook:
    """One debootstrap hook: a copy of the file at `source`, or `content`."""

    name: str
    source: str | None = None
    content: str | None = None


#: Guix's ``%default-debootstrap-hooks``: network configuration, then GRUB.
DEFAULT_HOOKS: tuple[Hook, ...] = (Hook("10-interfaces", content=_INTERFACES_HOOK),
                                   Hook("90-grub", content=_GRUB_HOOK))


@dataclass(frozen=True, slots=True)
class Debootstrap:
    """``debootstrap-configuration``: one variant of the debootstrap OS provider.

    `hooks`: a tuple of hooks (a directory is generated), a directory path
    (used as it is), or None (no ``CUSTOMIZE_DIR``).
    """

    hooks: tuple[Hook, ...] | str | None = DEFAULT_HOOKS
    proxy: str | None = None
    mirror: str | None = None
    arch: str | None = None
    suite: str | None = "stable"
    extra_pkgs: tuple[str, ...] = DEFAULT_EXTRA_PKGS
    components: tuple[str, ...] = ()
    generate_cache: bool = True
    clean_cache: int | None = 14
    partition_style: str | None = "msdos"
    partition_alignment: int | None = 2048


@dataclass(frozen=True, slots=True)
class Variant:
    """``ganeti-os-variant``: exactly one of `configuration` (a file, linked),
    `content` (the file's text) or `debootstrap` (generated)."""

    name: str
    configuration: str | None = None
    content: str | None = None
    debootstrap: Debootstrap | None = None


@dataclass(frozen=True, slots=True)
class GanetiOS:
    """``ganeti-os``: an OS provider's name, its variants' file extension, its variants."""

    name: str
    extension: str | None = None
    variants: tuple[Variant, ...] = ()


#: ``%default-ganeti-os`` as far as Debian has it: debootstrap with one default variant
#: (Guix's second entry, the ``guix`` provider, is not packaged in Debian).
DEFAULT_OS: tuple[GanetiOS, ...] = (GanetiOS("debootstrap", ".conf", (Variant("default", debootstrap=Debootstrap()),)),)


@dataclass(frozen=True, slots=True)
class Files:
    """What ``[ganeti]`` writes under `directory`."""

    directory: str = "/etc/ganeti"
    file_storage_paths: tuple[str, ...] = ()
    hooks: str | None = None
    os: tuple[GanetiOS, ...] = DEFAULT_OS


# -- contents ------------------------------------------------------------------------------


def customize_dir(directory: str, os_name: str, variant: str) -> str:
    """Where a generated debootstrap hooks directory goes."""
    return os.path.join(directory, f"instance-{os_name}", "customize", variant)


def debootstrap_conf(d: Debootstrap, customize: str | None) -> str:
    """The variant file, in Guix's order: ``KEY=value`` lines, no quoting.

    `customize`: the ``CUSTOMIZE_DIR`` (None: no such line).
    """
    lines: list[str] = []
    for key, value in (("PROXY", d.proxy), ("MIRROR", d.mirror), ("ARCH", d.arch), ("SUITE", d.suite)):
        if value is not None:
            lines.append(f"{key}={value}")
    if d.extra_pkgs:
        lines.append("EXTRA_PKGS=" + ",".join(d.extra_pkgs))
    if d.components:
        lines.append("COMPONENTS=" + ",".join(d.components))
    if customize is not None:
        lines.append(f"CUSTOMIZE_DIR={customize}")
    lines.append(f"GENERATE_CACHE={'yes' if d.generate_cache else 'no'}")
    if d.clean_cache is not None:
        lines.append(f"CLEAN_CACHE={d.clean_cache}")
    if d.partition_style is not None:
        lines.append(f"PARTITION_STYLE={d.partition_style}")
    if d.partition_alignment is not None:
        lines.append(f"PARTITION_ALIGNMENT={d.partition_alignment}")
    return "".join(line + "\n" for line in lines)


@dataclass(frozen=True, slots=True)
class Entry:
    """One thing to put in place: a file (`text`, `mode`), a symlink (`target`) or a
    copy of a file (`source`, `mode`)."""

    path: str
    text: str | None = None
    target: str | None = None
    source: str | None = None
    mode: int = 0o644


def plan(files: Files) -> list[Entry]:
    """Every file and link `files` puts in place, in writing order."""
    out: list[Entry] = []
    d = files.directory
    if files.file_storage_paths:
        out.append(Entry(os.path.join(d, "file-storage-paths"), text="\n".join(files.file_storage_paths)))
    if files.hooks is not None:
        out.append(Entry(os.path.join(d, "hooks"), target=files.hooks))
    for gos in files.os:
        variants_dir = os.path.join(d, f"instance-{gos.name}", "variants")
        for v in gos.variants:
            path = os.path.join(variants_dir, v.name + (gos.extension or ""))
            if v.configuration is not None:
                out.append(Entry(path, target=v.configuration))
            elif v.content is not None:
                out.append(Entry(path, text=v.content))
            elif v.debootstrap is not None:
                hooks = v.debootstrap.hooks
                customize: str | None = hooks if isinstance(hooks, str) else None
                if isinstance(hooks, tuple):
                    customize = customize_dir(d, gos.name, v.name)
                    for hook in hooks:
                        hook_path = os.path.join(customize, hook.name)
                        if hook.source is not None:
                            out.append(Entry(hook_path, source=hook.source, mode=0o555))
                        else:
                            out.append(Entry(hook_path, text=hook.content or "", mode=0o555))
                out.append(Entry(path, text=debootstrap_conf(v.debootstrap, customize)))
        if gos.variants:
            out.append(Entry(os.path.join(variants_dir, "variants.list"),
                             text="".join(v.name + "\n" for v in gos.variants)))
    return out


# -- writing ---------------------------------------------------------------------------------


def _write_file(path: str, data: bytes, mode: int) -> None:
    """Replace `path` atomically (`supervisor.replace_file`), unless it already
    holds `data` with `mode`."""
    try:
        st = os.lstat(path)
        if not os.path.islink(path) and (st.st_mode & 0o7777) == mode:
            with open(path, "rb") as f:
                if f.read() == data:
                    return
    except OSError:
        pass
    replace_file(path, data, mode)


def _write_link(path: str, target: str) -> None:
    """Point the symlink `path` at `target`, atomically."""
    try:
        if os.readlink(path) == target:
            return
    except OSError:
        pass
    parent = os.path.dirname(path)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{os.getpid()}.link")
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    os.symlink(target, tmp)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_files(files: Files) -> list[str]:
    """Put every planned file in place; return their paths.

    Raises:
        OSError: a directory could not be created or a file written (the
            message names the path).
    """
    written = []
    for entry in plan(files):
        os.makedirs(os.path.dirname(entry.path), mode=0o755, exist_ok=True)
        if entry.target is not None:
            _write_link(entry.path, entry.target)
        elif entry.source is not None:
            with open(entry.source, "rb") as f:
                _write_file(entry.path, f.read(), entry.mode)
        else:
            _write_file(entry.path, (entry.text or "").encode(), entry.mode)
        written.append(entry.path)
    return written


# -- configuration ----------------------------------------------------------------------------

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
#: Characters a shell would treat specially in an unquoted ``KEY=value`` line.
_UNSAFE_RE = re.compile(r"[\s'\"$`\\;&|<>()#*?\[\]{}!]")
_MISSING: Any = object()


def _q(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    return json.dumps(value, default=str, ensure_ascii=False)


def _abs_path(t: Table, key: str, value: str) -> bool:
    if not value.startswith("/") or "\n" in value or "\0" in value:
        t.error(key, f"must be an absolute path, got {_q(value)}")
        return False
    return True


def _name(t: Table, key: str) -> str | None:
    name = t.str(key, required=True, nonempty=True)
    if name is not None and not _NAME_RE.match(name):
        t.error(key, f"{_q(name)} is not a valid name (letters, digits, '.', '_', '+', '-'; "
                     "it becomes a file name)")
        return None
    return name


def _shell_word(t: Table, key: str, value: str) -> str | None:
    if _UNSAFE_RE.search(value):
        t.error(key, f"must not contain whitespace or shell special characters (the variant file is "
                     f"read by a shell, unquoted), got {_q(value)}")
        return None
    return value


def _str_or_false(t: Table, key: str, default: str | None) -> str | None:
    value = t.raw(key, _MISSING)
    if value is _MISSING:
        return default
    if value is False:
        return None
    if isinstance(value, str) and value:
        return _shell_word(t, key, value)
    t.error(key, f"expected a non-empty string or false, got {_q(value)}")
    return default


def _int_or_false(t: Table, key: str, default: int | None) -> int | None:
    value = t.raw(key, _MISSING)
    if value is _MISSING:
        return default
    if value is False:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    t.error(key, f"expected a non-negative integer or false, got {_q(value)}")
    return default


def _words(t: Table, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    items = t.str_list(key, default)
    for i, item in enumerate(items):
        if not item or "," in item or _UNSAFE_RE.search(item):
            t.error(f"{key}[{i}]", f"expected a package or component name, got {_q(item)}")
            return default
    return items


def _read_hooks(t: Table) -> tuple[Hook, ...] | str | None:
    value = t.raw("hooks", _MISSING)
    if value is _MISSING:
        return DEFAULT_HOOKS
    if value is False:
        return None
    if isinstance(value, str):
        return value if _abs_path(t, "hooks", value) and _shell_word(t, "hooks", value) else DEFAULT_HOOKS
    if not isinstance(value, dict):
        t.error("hooks", f"expected false, a directory path or a table of hook name = file path, got {_q(value)}")
        return DEFAULT_HOOKS
    hooks = []
    for name, item in value.items():
        key = f"hooks.{name}"
        if not _NAME_RE.match(name):
            t.error(key, f"{_q(name)} is not a valid hook file name")
        elif isinstance(item, str):
            if _abs_path(t, key, item):
                hooks.append(Hook(name, source=item))
        elif isinstance(item, dict) and set(item) == {"content"} and isinstance(item["content"], str):
            hooks.append(Hook(name, content=item["content"]))
        else:
            t.error(key, f'expected a file path or {{ content = "..." }}, got {_q(item)}')
    return tuple(sorted(hooks, key=lambda h: h.name))


def _read_debootstrap(t: Table) -> Debootstrap:
    d = Debootstrap(
        hooks=_read_hooks(t),
        proxy=_str_or_false(t, "proxy", None),
        mirror=_str_or_false(t, "mirror", None),
        arch=_str_or_false(t, "arch", None),
        suite=_str_or_false(t, "suite", "stable"),
        extra_pkgs=_words(t, "extra-pkgs", DEFAULT_EXTRA_PKGS),
        components=() if t.raw("components", None) is False else _words(t, "components", ()),  # #f: none
        generate_cache=t.bool("generate-cache", True),
        clean_cache=_int_or_false(t, "clean-cache", 14),
        partition_style=_str_or_false(t, "partition-style", "msdos"),
        partition_alignment=_int_or_false(t, "partition-alignment", 2048),
    )
    t.finish()
    return d


def _read_variant(t: Table) -> Variant | None:
    name = _name(t, "name")
    configuration = t.str("configuration", nonempty=True)
    if configuration is not None and not _abs_path(t, "configuration", configuration):
        configuration = None
    content = t.str("content")
    sub = t.table("debootstrap")
    debootstrap = _read_debootstrap(sub) if sub is not None and sub.ok else None
    given = [k for k in ("configuration", "content", "debootstrap") if t.has(k)]
    if len(given) != 1:
        t.error(None, 'needs exactly one of "configuration" (a file, linked), "content" (the file\'s text) or '
                      '"debootstrap" (a debootstrap-configuration table)'
                + (f"; got {', '.join(given)}" if given else ""))
    t.finish()
    if name is None or len(given) != 1:
        return None
    return Variant(name, configuration=configuration, content=content, debootstrap=debootstrap)


def _read_os(t: Table) -> GanetiOS | None:
    name = _name(t, "name")
    extension = t.str("extension", nonempty=True)
    if extension is not None and ("/" in extension or "\n" in extension or "\0" in extension):
        t.error("extension", f"must not contain '/' or a newline, got {_q(extension)}")
        extension = None
    variants: list[Variant] = []
    for vt in t.table_list("variants"):
        if not vt.ok:
            continue
        v = _read_variant(vt)
        if v is None:
            continue
        if any(other.name == v.name for other in variants):
            vt.error("name", f"variant {_q(v.name)} is listed twice")
            continue
        variants.append(v)
    t.finish()
    return GanetiOS(name, extension, tuple(variants)) if name is not None else None


def read_files(t: Table) -> Files:
    """The file-related keys of ``[ganeti]`` (the caller calls `t.finish()`)."""
    directory = t.str("config-directory", "/etc/ganeti", nonempty=True)
    if not _abs_path(t, "config-directory", directory):
        directory = "/etc/ganeti"
    paths = t.str_list("file-storage-paths")
    for i, p in enumerate(paths):
        _abs_path(t, f"file-storage-paths[{i}]", p)
    hooks_value = t.raw("hooks", _MISSING)
    hooks: str | None = None
    if hooks_value is _MISSING or hooks_value is False:
        hooks = None
    elif isinstance(hooks_value, str) and _abs_path(t, "hooks", hooks_value):
        hooks = hooks_value
    elif not isinstance(hooks_value, str):
        t.error("hooks", f"expected false or the path of a Ganeti hooks directory, got {_q(hooks_value)}")
    oses: tuple[GanetiOS, ...] = DEFAULT_OS
    if t.has("os"):
        found: list[GanetiOS] = []
        for ot in t.table_list("os"):
            if not ot.ok:
                continue
            gos = _read_os(ot)
            if gos is None:
                continue
            if any(other.name == gos.name for other in found):
                ot.error("name", f"OS {_q(gos.name)} is listed twice")
                continue
            found.append(gos)
        oses = tuple(found)
    return Files(directory=os.path.normpath(directory), file_storage_paths=paths, hooks=hooks, os=oses)
