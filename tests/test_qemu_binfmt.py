"""qemu-binfmt (issue 5): the Guix table, configuration errors, and the real thing.

The end-to-end tests run the real daemon and herd inside a private user, mount
and PID namespace (``unshare --user --map-root-user --mount --pid``), where
the kernel (6.7+) gives binfmt_misc a private instance: nothing is registered
on the machine itself.  The namespace driver (``namespaces.py``) runs inside
the namespace: it starts the supervisor, waits for its ``READY=1``, runs the steps the test asks for (herd commands, the arm64
busybox, reads of binfmt_misc) and reports the results in JSON for the test
to check.

They need Debian's ``qemu-user-static`` and an arm64 ``busybox-static``,
which ``contrib/dev test`` provides (as root).  Without them the tests skip
when not root and fail as root (CI runs as root).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import binfmt_table as guix
import namespaces
from helpers import check_config
from services import qemu_binfmt

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
QEMU_AARCH64 = "/usr/bin/qemu-aarch64-static"
BINFMT = "/proc/sys/fs/binfmt_misc"
ENOEXEC = 8
UNSHARE = namespaces.unshare("--user", "--map-root-user")

#: Inside the namespace: the step kinds of these tests besides the driver's own.
INSIDE = r'''
def write(path, data):
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)
    return {"ok": True}


def mounts(step):
    return {"binfmt_misc": [l.split()[1] for l in open("/proc/self/mounts") if l.split()[2] == "binfmt_misc"]}


KINDS.update(write=lambda step: attempt(lambda: write(step["arg"], step["data"])), mounts=mounts)
'''


# -- requirements --------------------------------------------------------------------------


def _busybox() -> Path | None:
    for rel in ("bin/busybox", "usr/bin/busybox"):
        path = ROOT / ".cache" / "busybox-arm64" / "root" / rel
        if os.access(path, os.X_OK):
            return path
    return None


def _missing(what: list[str]) -> None:
    """Skip (not root) or fail (root: CI provides everything) naming what is missing."""
    message = "missing: " + "; ".join(what)
    if os.geteuid() == 0:
        pytest.fail(message + " -- run `contrib/dev test` (as root it installs them)")
    pytest.skip(message)


@pytest.fixture(scope="module")
def real() -> Path:
    """What the namespace tests need; the arm64 busybox's path."""
    missing = []
    if shutil.which("unshare") is None:
        missing.append("util-linux (unshare)")
    if not os.access(QEMU_AARCH64, os.X_OK):
        missing.append(f"Debian package qemu-user-static ({QEMU_AARCH64})")
    busybox = _busybox()
    if busybox is None:
        missing.append("Debian package busybox-static:arm64 (fetched into .cache/busybox-arm64/root by "
                       "`contrib/dev test`)")
    if not missing:
        probe = subprocess.run([*UNSHARE, "true"], capture_output=True, text=True)
        if probe.returncode != 0:
            missing.append(f"user namespaces (unshare: {probe.stderr.strip()})")
    if missing:
        _missing(missing)
    assert busybox is not None
    return busybox


# -- the driver ----------------------------------------------------------------------------


def drive(tmp_path: Path, table: dict[str, Any], steps: list[dict[str, Any]], *,
          namespace: bool = True) -> namespaces.Run:
    """Run the daemon with ``[qemu-binfmt] = table`` and do `steps` (in the namespace)."""
    return namespaces.drive(tmp_path, {"qemu-binfmt": table}, steps, inside=INSIDE,
                            namespaces=UNSHARE if namespace else None)


def herd(step_id: str, *args: str, ro: bool = False) -> dict[str, Any]:
    return {"id": step_id, "do": "herd", "arg": list(args), "ro": ro}


def run(step_id: str, *argv: str | Path) -> dict[str, Any]:
    return {"id": step_id, "do": "run", "arg": [str(a) for a in argv]}


def details(result: Any) -> dict[str, Any]:
    [service] = result["services"]
    return service["details"]


def qemu_entries(listing: dict[str, Any]) -> list[str]:
    return [e for e in listing["entries"] if e.startswith("qemu-")]


# -- the table -----------------------------------------------------------------------------


def test_platform_table_is_guix_table() -> None:
    assert [p.name for p in qemu_binfmt.PLATFORMS] == list(guix.GUIX_TABLE)
    assert list(qemu_binfmt.KNOWN) == guix.QEMU_PLATFORMS
    assert {p.name for p in qemu_binfmt.PLATFORMS if not p.listed} == set(guix.NOT_LISTED)
    for p in qemu_binfmt.PLATFORMS:
        family, listed, _magic, _mask = guix.GUIX_TABLE[p.name]
        assert (p.family, p.listed) == (family, listed), p.name


@pytest.mark.parametrize("name", list(guix.GUIX_TABLE))
def test_registration_string_matches_guix_byte_for_byte(name: str) -> None:
    store = "/gnu/store/0123456789abcdefghijklmnopqrstuv-qemu-9.1.3-static/bin"
    platform = qemu_binfmt.BY_NAME[name]
    expected = guix.guix_registration(name, f"{store}/qemu-{name}")
    assert qemu_binfmt.registration(platform, f"{store}/qemu-{name}").encode() == expected.encode()
    settings = qemu_binfmt.Settings(interpreter_directory=store, interpreter_suffix="")
    assert settings.registration(platform).encode() == expected.encode()
    # the defaults: Debian's qemu-user-static, flags FP
    assert qemu_binfmt.Settings().registration(platform) == guix.guix_registration(
        name, f"/usr/bin/qemu-{name}-static", "FP")


def test_registration_examples_from_guix_and_debian() -> None:
    settings = qemu_binfmt.Settings(interpreter_directory="/gnu/store/<hash>-qemu-<ver>-static/bin",
                                    interpreter_suffix="")
    assert settings.registration(qemu_binfmt.BY_NAME["arm"]) == guix.GUIX_ARM_EXAMPLE
    ours = qemu_binfmt.Settings().registration(qemu_binfmt.BY_NAME["aarch64"]).split(":")
    debian = guix.DEBIAN_AARCH64_CONF.split(":")
    assert ours[1:6] == debian[1:6]  # name, type, offset, magic, mask


# -- configuration -------------------------------------------------------------------------


KNOWN_LIST = ", ".join(guix.QEMU_PLATFORMS)


@pytest.mark.parametrize(("toml", "line"), [
    ('platforms = ["aarch64", "arm", "foo"]',
     f'qemu-binfmt.platforms[2]: unknown platform "foo" (known: {KNOWN_LIST})'),
    ('platforms = ["sparc"]', ('qemu-binfmt.platforms[0]: platform "sparc" is defined by Guix but not in '
                               f'%qemu-platforms, so it is not available (known: {KNOWN_LIST})')),
    ('platforms = ["arm", "arm"]', 'qemu-binfmt.platforms[1]: "arm" is listed twice'),
    ('platforms = "aarch64"', 'qemu-binfmt.platforms: expected an array of platform names, got "aarch64"'),
    ('platforms = ["arm", 7]', "qemu-binfmt.platforms[1]: expected a platform name (a string), got 7"),
    ('guix-support = "yes"', 'qemu-binfmt.guix-support: expected true or false, got "yes"'),
    ("flags = 3", "qemu-binfmt.flags: expected a string, got 3"),
    ('flags = "FX"', 'qemu-binfmt.flags: expected letters from "POCF", each at most once, got "FX"'),
    ('interpreter-directory = "usr/bin"', 'qemu-binfmt.interpreter-directory: must be an absolute path, got "usr/bin"'),
    ('interpreter-directory = "/a:b"', ("qemu-binfmt.interpreter-directory: must not contain ':', a newline or NUL "
                                        '(they end a binfmt_misc field), got "/a:b"')),
    ('binfmt-misc-path = ""', 'qemu-binfmt.binfmt-misc-path: expected a non-empty string, got ""'),
    ("auto-start = 1", "qemu-binfmt.auto-start: expected true or false, got 1"),
    ('bogus = "qemu"', ("qemu-binfmt.bogus: unknown key (known keys: auto-start, binfmt-misc-path, flags, "
                        "guix-support, interpreter-directory, interpreter-suffix, platforms, qemu)")),
    ('qemu = "usr"', 'qemu-binfmt.qemu: must be an absolute path, got "usr"'),
    ('qemu = "/usr"\ninterpreter-directory = "/usr/bin"',
     "qemu-binfmt.qemu: give either qemu (QEMU's installation prefix; the interpreters are in its bin/) "
     "or interpreter-directory, not both"),
])
def test_config_errors_name_the_key(tmp_path: Path, toml: str, line: str) -> None:
    proc = check_config(tmp_path, f"[qemu-binfmt]\n{toml}\n")
    assert proc.returncode == 1, proc
    assert proc.stdout.splitlines() == [line]


def test_guix_qemu_field_names_where_the_interpreters_live(tmp_path: Path) -> None:
    """Guix's `qemu` (the package; here its installation prefix): QEMU/bin/qemu-NAME-static."""
    r = drive(tmp_path, {"platforms": ["aarch64"], "qemu": "/opt/qemu", "auto-start": False}, [
        herd("one", "lookup", "qemu-binfmt", "aarch64"),
    ], namespace=False)
    assert (f"registration: {guix.guix_registration('aarch64', '/opt/qemu/bin/qemu-aarch64-static')}"
            in r.ok("one")["out"])


def test_config_reports_every_error(tmp_path: Path) -> None:
    proc = check_config(tmp_path, '[qemu-binfmt]\nplatforms = ["x"]\nguix-support = 1\nbogus = true\n')
    assert proc.returncode == 1
    assert [line.split(":")[0] for line in proc.stdout.splitlines()] == [
        "qemu-binfmt.platforms[0]", "qemu-binfmt.guix-support", "qemu-binfmt.bogus"]


def test_valid_config_has_the_mount_service_as_requirement(tmp_path: Path) -> None:
    proc = check_config(tmp_path, '[qemu-binfmt]\nplatforms = ["arm", "aarch64"]\nguix-support = true\n')
    assert proc.returncode == 0, proc
    lines = [line.strip() for line in proc.stdout.splitlines()[1:]]
    assert lines == ["file-system-binfmt_misc  provides: file-system-/proc/sys/fs/binfmt_misc  requires: -",
                     "qemu-binfmt  requires: file-system-binfmt_misc"]


# -- the daemon: lookup, doc, status (no namespace needed: nothing is registered) ------------


def test_lookup_doc_and_status(tmp_path: Path) -> None:
    store = "/gnu/store/0123456789abcdefghijklmnopqrstuv-qemu-9.1.3-static/bin"
    table = {"platforms": ["aarch64", "arm"], "interpreter-directory": store, "interpreter-suffix": "",
             "guix-support": True, "auto-start": False}
    r = drive(tmp_path, table, [
        herd("all", "--json", "lookup", "qemu-binfmt"),
        herd("one", "lookup", "qemu-binfmt", "aarch64"),
        herd("one-json", "--json", "lookup", "qemu-binfmt", "riscv64"),
        herd("unknown", "lookup", "qemu-binfmt", "vax"),
        herd("doc", "doc", "qemu-binfmt"),
        herd("doc-mount", "doc", "file-system-/proc/sys/fs/binfmt_misc"),
        herd("status", "--json", "status", "qemu-binfmt"),
        herd("status-mount", "--json", "status", "file-system-/proc/sys/fs/binfmt_misc"),
    ], namespace=False)
    entries = r.json("all")["platforms"]
    assert [e["name"] for e in entries] == list(guix.GUIX_TABLE)
    for e in entries:  # every platform, byte for byte, through the daemon
        assert e["registration"] == guix.guix_registration(e["name"], f"{store}/qemu-{e['name']}"), e["name"]
        assert e["family"] == guix.GUIX_TABLE[e["name"]][0]
        assert e["magic"] == guix.escaped(guix.GUIX_TABLE[e["name"]][2])
        assert e["mask"] == guix.escaped(guix.GUIX_TABLE[e["name"]][3])
    assert [e["name"] for e in entries if e["configured"]] == ["arm", "aarch64"]

    assert f"registration: {guix.guix_registration('aarch64', f'{store}/qemu-aarch64')}" in r.ok("one")["out"]
    one = r.json("one-json")
    assert one["name"] == "riscv64" and one["family"] == "riscv" and one["in-qemu-platforms"] is True
    unknown = r.step("unknown")
    assert unknown["rc"] == 1 and 'unknown platform "vax"' in unknown["err"]

    doc = r.ok("doc")["out"]
    assert "Install binfmt_misc handlers for QEMU" in doc
    assert "Platforms: aarch64, arm." in doc and "lookup" in doc and "guix-support: true" in doc
    assert "leaves binfmt_misc mounted" in r.ok("doc-mount")["out"]

    [svc] = r.json("status")["services"]
    assert svc["state"] == "stopped" and svc["requires"] == ["file-system-binfmt_misc"]
    assert svc["actions"] == ["lookup"] and svc["respawn"] is False and svc["command"] is None
    assert details(r.json("status"))["guix-support"] is True
    assert [p["name"] for p in details(r.json("status"))["platforms"]] == ["aarch64", "arm"]
    [mount] = r.json("status-mount")["services"]
    assert mount["name"] == "file-system-binfmt_misc" and mount["state"] == "stopped"
    assert mount["provides"] == ["file-system-binfmt_misc", "file-system-/proc/sys/fs/binfmt_misc"]


def test_lookup_on_the_status_socket(tmp_path: Path) -> None:
    r = drive(tmp_path, {"platforms": ["arm"], "auto-start": False},
              [herd("ro", "--json", "lookup", "qemu-binfmt", "arm", ro=True)], namespace=False)
    assert r.json("ro")["name"] == "arm"


# -- the real thing, in a private user+mount namespace ----------------------------------------


def test_emulation_start_and_stop(tmp_path: Path, real: Path) -> None:
    r = drive(tmp_path, {"platforms": ["aarch64"], "auto-start": False}, [
        {"id": "mounts-before", "do": "mounts"},
        run("before", real, "uname", "-m"),
        herd("start", "start", "qemu-binfmt"),
        {"id": "mounts-after", "do": "mounts"},
        run("emulated", real, "uname", "-m"),
        {"id": "entry", "do": "read", "arg": f"{BINFMT}/qemu-aarch64"},
        herd("status", "--json", "status", "qemu-binfmt"),
        herd("status-human", "status", "qemu-binfmt"),
        herd("stop", "stop", "qemu-binfmt"),
        run("after", real, "uname", "-m"),
        {"id": "ls-after", "do": "ls", "arg": BINFMT},
        herd("status-after", "--json", "status", "qemu-binfmt"),
        herd("mount-after", "--json", "status", "file-system-binfmt_misc"),
        herd("again", "start", "qemu-binfmt"),
        run("emulated-again", real, "uname", "-m"),
    ])
    assert r.step("mounts-before") == {"binfmt_misc": []}
    assert r.step("before")["errno"] == ENOEXEC
    r.ok("start")
    assert r.step("mounts-after") == {"binfmt_misc": [BINFMT]}  # the requirement service mounted it
    assert r.ok("emulated")["out"] == "aarch64\n"
    entry = r.step("entry")["text"].splitlines()
    assert entry[0] == "enabled"
    assert f"interpreter {QEMU_AARCH64}" in entry and "flags: PF" in entry
    assert details(r.json("status")) == {
        "platforms": [{"name": "aarch64", "registered": True, "enabled": True, "matches": True,
                       "interpreter": QEMU_AARCH64, "flags": "PF"}],
        "guix-support": False, "flags": "FP", "binfmt-misc": {"path": BINFMT, "mounted": True}}
    r.ok("status-human")

    r.ok("stop")
    assert r.step("after") == {"errno": ENOEXEC, "error": "Exec format error"}
    assert qemu_entries(r.step("ls-after")) == []
    [platform] = details(r.json("status-after"))["platforms"]
    assert platform["registered"] is False and platform["enabled"] is False
    [mount] = r.json("mount-after")["services"]
    assert mount["state"] == "running" and mount["details"] == {"path": BINFMT, "mounted": True}
    r.ok("again")
    assert r.ok("emulated-again")["out"] == "aarch64\n"
    assert r.out["daemon-exit"] == 0


@pytest.mark.parametrize("case", ["first-fails", "second-fails"])
def test_rejected_registration_leaves_no_partial_state(tmp_path: Path, real: Path, case: str) -> None:
    interp = tmp_path / "interp"
    interp.mkdir()
    (interp / "qemu-aarch64-static").symlink_to(QEMU_AARCH64)  # only aarch64 has an interpreter here
    if case == "first-fails":
        table = {"platforms": ["riscv64", "aarch64"], "interpreter-directory": str(interp), "auto-start": False}
        failing = "riscv64"
    else:
        table = {"platforms": ["aarch64", "arm"], "interpreter-directory": str(interp), "auto-start": False}
        failing = "arm"
    r = drive(tmp_path, table, [
        herd("start", "start", "qemu-binfmt"),
        {"id": "ls", "do": "ls", "arg": BINFMT},
        run("busybox", real, "uname", "-m"),
        herd("status", "--json", "status", "qemu-binfmt"),
    ])
    start = r.step("start")
    assert start["rc"] == 1
    assert (f"{failing}: interpreter {interp}/qemu-{failing}-static not found (No such file or directory)"
            in start["err"]), start
    assert qemu_entries(r.step("ls")) == []  # aarch64, registered first in one case, was removed again
    assert r.step("busybox")["errno"] == ENOEXEC
    [svc] = r.json("status")["services"]
    assert svc["state"] == "stopped" and failing in svc["last-failure"]


def test_existing_handlers_identical_conflicting_disabled(tmp_path: Path, real: Path) -> None:
    ours = guix.guix_registration("aarch64", QEMU_AARCH64, "FP")
    other = guix.guix_registration("aarch64", "/opt/elsewhere/qemu-aarch64", "P")
    entry = f"{BINFMT}/qemu-aarch64"
    r = drive(tmp_path, {"platforms": ["arm", "aarch64"], "auto-start": False}, [
        herd("mount", "start", "file-system-binfmt_misc"),
        {"id": "foreign", "do": "write", "arg": f"{BINFMT}/register", "data": other},
        herd("conflict", "start", "qemu-binfmt"),
        {"id": "ls-conflict", "do": "ls", "arg": BINFMT},
        {"id": "foreign-entry", "do": "read", "arg": entry},
        {"id": "remove-foreign", "do": "write", "arg": entry, "data": "-1"},
        {"id": "identical", "do": "write", "arg": f"{BINFMT}/register", "data": ours},
        {"id": "disable", "do": "write", "arg": entry, "data": "0"},
        herd("adopt", "start", "qemu-binfmt"),
        {"id": "adopted-entry", "do": "read", "arg": entry},
        run("emulated", real, "uname", "-m"),
        herd("stop", "stop", "qemu-binfmt"),
        {"id": "ls-stopped", "do": "ls", "arg": BINFMT},
    ])
    r.ok("mount")
    assert r.step("foreign") == {"ok": True}
    conflict = r.step("conflict")
    assert conflict["rc"] == 1
    assert "aarch64: a different handler qemu-aarch64 is already registered" in conflict["err"]
    assert qemu_entries(r.step("ls-conflict")) == ["qemu-aarch64"]  # arm was not registered either
    assert "interpreter /opt/elsewhere/qemu-aarch64" in r.step("foreign-entry")["text"]  # left untouched
    assert r.step("identical") == {"ok": True} and r.step("disable") == {"ok": True}
    r.ok("adopt")  # identical content is fine; it was disabled, so the start enabled it
    assert r.step("adopted-entry")["text"].startswith("enabled\n")
    assert r.ok("emulated")["out"] == "aarch64\n"
    r.ok("stop")
    assert qemu_entries(r.step("ls-stopped")) == []
