"""Issue 15, items 2 and 6: a service user cannot redirect root's writes, and
a service's output cannot grow the daemon's memory without bound.

The hostile user is `nobody` (uid 65534).  It owns a directory on the way to
a file the supervisor writes or removes as root (its log directory, its pid
file directory, a misconfigured state directory) and swaps an entry for a
symlink to a file or directory of root's (the act is done as `nobody`, with
``ln``/``mv`` run under its uid).  Whatever the supervisor does next --
re-exec, restart, log rotation, a service start or stop -- root's file must
stay as it was, and the refusal must say which service and which path.

Memory: a service writes 50 MB without a newline.  The daemon's RSS stays
within a generous bound (the rings keep at most 1 MiB for one service and
8 MiB for all; the bound is 40 MiB of growth, where the old daemon kept all
50 MB), every byte reaches the log file in order (as lines of at most
64 KiB), and a second burst does not grow it further.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from helpers import Supervisor, py_service, sleeper, wait_until

NOBODY = 65534
ROOT_TEXT = "root's own file: must not change\n"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the hostile user is another user")


@pytest.fixture
def arena() -> Iterator[Path]:
    """A directory `nobody` can reach (0755 root), removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="svt-hostile-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def users_dir(path: Path) -> Path:
    """`path`, created and owned by nobody (mode 0755)."""
    path.mkdir(parents=True)
    os.chown(path, NOBODY, NOBODY)
    return path


def roots_file(path: Path) -> Path:
    path.write_text(ROOT_TEXT)
    path.chmod(0o600)
    return path


def as_nobody(*argv: str) -> None:
    """Run a coreutils command as `nobody` (the hostile act)."""
    subprocess.run(argv, user=NOBODY, group=NOBODY, extra_groups=[], check=True, timeout=30,
                   stdin=subprocess.DEVNULL, capture_output=True)


def recent(sup: Supervisor, name: str, n: int = 50) -> list[str]:
    rep = sup.request({"action": "log", "service": name, "args": [n]}, ro=True)
    assert rep["ok"] is True, rep
    return [e["line"] for e in rep["result"]["lines"]]


def refusal_shown(sup: Supervisor, name: str, path: Path, why: str) -> bool:
    return any(line.startswith(f"Cannot write the log file {path}") and why in line
               for line in recent(sup, name))


def victim(sup: Supervisor, log_file: Path, **keys: object) -> dict[str, object]:
    return sleeper(sup.marker("victim"), user="nobody", **{"log-file": str(log_file), **keys})


def swap_for_link(target: Path, link: Path) -> None:
    """As nobody: replace `link` (an entry of nobody's directory) with a symlink to `target`."""
    tmp = link.with_name(link.name + ".new-link")
    as_nobody("ln", "-s", str(target), str(tmp))
    as_nobody("mv", "-T", str(tmp), str(link))
    assert link.is_symlink()


# --------------------------------------------------------------------------
# A log file swapped for a symlink


def reexec(sup: Supervisor) -> Supervisor:
    sup.herd("reexec", "root", check=True)
    wait_until(lambda: "resumed after re-exec" in sup.stderr_path.read_text(errors="replace"), 30,
               "the new image to resume")
    return sup


def restart_daemon(sup: Supervisor, make_sup: Callable[[], Supervisor]) -> Supervisor:
    assert sup.stop() == 0
    again = make_sup()
    config = sup.config_path.read_text()
    again.start(config)
    return again


@needs_root
@pytest.mark.parametrize("how", ["reexec", "restart-daemon"])
def test_a_log_symlink_is_refused_not_followed(sup: Supervisor, make_sup: Callable[[], Supervisor],
                                               arena: Path, how: str) -> None:
    secret = roots_file(arena / "secret")
    logs = users_dir(arena / "logs")
    log_file = logs / "victim.log"
    sup.start({"services": {"victim": victim(sup, log_file)}})
    wait_until(lambda: log_file.exists() and "started" in log_file.read_text(), 10, "the first log lines")

    swap_for_link(secret, log_file)
    sup = reexec(sup) if how == "reexec" else restart_daemon(sup, make_sup)
    sup.herd("restart", "victim", check=True)  # output to log: the supervisor's own lines

    # The lines are kept in memory, and the refusal is among them.
    wait_until(lambda: any(l.startswith("Service victim started") for l in recent(sup, "victim")), 10,
               "the restart's lines in herd log")
    assert secret.read_text() == ROOT_TEXT, "root's file was written through the service user's symlink"
    assert log_file.is_symlink()
    wait_until(lambda: refusal_shown(sup, "victim", log_file, "the file is a symlink: refused"), 10,
               "the refusal in herd log")
    status = sup.herd("status", "victim", check=True).stdout
    assert f"Cannot write the log file {log_file}" in status, status
    warnings = [l for l in sup.stderr_path.read_text(errors="replace").splitlines()
                if "log file not writable" in l]
    assert any('"victim"' in l and str(log_file) in l and "symlink" in l for l in warnings), warnings
    assert sup.status("victim")["state"] == "running"


@needs_root
def test_rotation_does_not_follow_a_swapped_log_directory(sup: Supervisor, arena: Path) -> None:
    """The service user owns the directory above its log directory: it
    moves the log directory away and puts a symlink to root's directory in
    its place.  Rotation must not create or rename files there."""
    roots_dir = arena / "root-only"
    roots_dir.mkdir(mode=0o700)
    home = users_dir(arena / "home")
    logs = home / "logs"
    as_nobody("mkdir", str(logs))
    log_file = logs / "victim.log"
    sup.start({"services": {"victim": victim(sup, log_file, **{"log-max-size": 400, "log-max-backups": 2})}})
    wait_until(lambda: log_file.exists() and "started" in log_file.read_text(), 10, "the first log lines")

    as_nobody("mv", "-T", str(logs), str(home / "logs.old"))
    as_nobody("ln", "-s", str(roots_dir), str(logs))
    for _ in range(3):  # each restart writes about 200 bytes: past log-max-size, so it rotates
        sup.herd("restart", "victim", check=True)

    wait_until(lambda: sum(l.startswith("Service victim started") for l in recent(sup, "victim")) >= 4, 10,
               "the restarts' lines in herd log")
    assert os.listdir(roots_dir) == [], "rotation wrote into root's directory through the symlink"
    wait_until(lambda: refusal_shown(sup, "victim", log_file, f"{logs}: refusing to follow this symlink"), 10,
               "the refusal in herd log")


# --------------------------------------------------------------------------
# A pid file's directory swapped for a symlink


@needs_root
def test_a_stale_pid_file_is_not_removed_through_a_symlink(sup: Supervisor, arena: Path) -> None:
    roots_dir = arena / "root-only"
    roots_dir.mkdir(mode=0o755)
    roots_pid = roots_file(roots_dir / "victim.pid")
    run = users_dir(arena / "run")
    pids = run / "pids"
    sup.start({"services": {"victim": sleeper(sup.marker("victim"), user="nobody", **{
        "auto-start": False, "start-timeout": 10,
        "ready": {"type": "pid-file", "path": str(pids / "victim.pid")}})}})
    as_nobody("ln", "-s", str(roots_dir), str(pids))

    cp = sup.herd("start", "victim")
    assert cp.returncode != 0, cp.stdout
    assert roots_pid.exists() and roots_pid.read_text() == ROOT_TEXT, "root's file was removed"
    out = cp.stdout + cp.stderr
    assert "stale pid file" in out and f"{pids}: refusing to follow this symlink" in out, out


# --------------------------------------------------------------------------
# A state directory another user can write


def state_args(sup: Supervisor, state_dir: Path) -> list[str]:
    args = sup.daemon_args()
    args[args.index("--state-dir") + 1] = str(state_dir)
    return args


@needs_root
def test_state_records_are_not_written_through_a_planted_symlink(sup: Supervisor, arena: Path) -> None:
    secret = roots_file(arena / "secret")
    state = arena / "state"
    state.mkdir(mode=0o755)
    records = users_dir(state / "services")  # misconfigured: the service user owns it
    sup.start({"services": {"victim": sleeper(sup.marker("victim"))}}, args=state_args(sup, state))
    # Every name the records go to, or went to in older versions, leads to root's file.
    for name in (".victim.toml.tmp", "victim.toml", "journal", "snapshot"):
        as_nobody("ln", "-sfn", str(secret), str(records / name))

    sup.herd("stop", "victim", check=True)  # the operator's intent is recorded
    sup.herd("start", "victim", check=True)
    assert sup.stop() == 0  # a clean shutdown rewrites the snapshot
    assert secret.read_text() == ROOT_TEXT, "root's file was written through a planted symlink"


@needs_root
def test_a_journal_symlink_planted_before_the_start_is_refused(sup: Supervisor, arena: Path) -> None:
    """The journal is opened once, at the first record: a symlink already
    there (a service user's, in a misconfigured state directory) is refused,
    with a warning, and the services run on."""
    secret = roots_file(arena / "secret")
    state = arena / "state"
    state.mkdir(mode=0o755)
    records = users_dir(state / "services")
    as_nobody("ln", "-s", str(secret), str(records / "journal"))
    sup.start({"services": {"victim": sleeper(sup.marker("victim"))}}, args=state_args(sup, state))
    wait_until(lambda: sup.status("victim")["state"] == "running", 10, "victim to start")
    sup.herd("stop", "victim", check=True)
    assert sup.stop() == 0
    assert secret.read_text() == ROOT_TEXT, "root's file was written through a planted symlink"
    log = sup.stderr_path.read_text(errors="replace")
    assert "cannot save service state" in log and "symlink" in log, log


@needs_root
def test_records_in_a_directory_others_can_write_are_ignored(sup: Supervisor, arena: Path) -> None:
    """A forged record could make the daemon adopt (and later kill) any
    process, or keep a service down: records another user could have written
    are ignored, with a warning."""
    state = arena / "state"
    state.mkdir(mode=0o755)
    records = users_dir(state / "services")
    forged = arena / "forged.toml"
    forged.write_text('name = "victim"\nintent = "down"\n')
    as_nobody("cp", str(forged), str(records / "victim.toml"))
    sup.start({"services": {"victim": sleeper(sup.marker("victim"))}}, args=state_args(sup, state))
    wait_until(lambda: sup.status("victim")["state"] == "running", 10, "victim to start despite the record")
    log = sup.stderr_path.read_text(errors="replace")
    assert "service records ignored" in log and str(records) in log, log


# --------------------------------------------------------------------------
# hurd-vm: the overlay in the QEMU user's directory


@needs_root
def test_a_childhurd_disk_symlink_is_not_given_to_the_vm_user(sup: Supervisor, tmp_path: Path) -> None:
    """`STATE/hurd-vm/` belongs to the QEMU user, who can put a symlink where
    the overlay goes.  The next start must not chown or chmod what it names
    (here a root file standing for /etc/shadow): the start fails instead."""
    image = tmp_path / "base.img"
    image.write_bytes(b"\0" * 65536)
    shadow = tmp_path / "shadow"
    shadow.write_text(ROOT_TEXT)
    shadow.chmod(0o640)
    vm_dir = sup.state_dir / "hurd-vm"
    vm_dir.mkdir(parents=True)
    (vm_dir / "disk.qcow2").symlink_to(shadow)
    sup.start({"hurd-vm": [{"qemu": "/usr/bin/qemu-system-x86_64", "kvm": False, "image": str(image),
                            "disk-size": "64M", "secret-root": str(tmp_path / "secrets"),
                            "options": ["-name", sup.marker("vm")], "auto-start": False}]})
    cp = sup.herd("start", "hurd-vm", timeout=90)
    st = shadow.stat()
    assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o640), "root's file was handed to the VM user"
    assert cp.returncode != 0, cp.stdout
    out = cp.stdout + cp.stderr
    assert f"disk {vm_dir / 'disk.qcow2'}: the file is a symlink: refused" in out, out


# --------------------------------------------------------------------------
# Memory: 50 MB without a newline

#: argv: MARKER SIZE.  Writes SIZE bytes of "%09d," numbers without a newline,
#: then "\nDONE\n", then sleeps.
FLOOD = r'''
import sys, time
out = sys.stdout.buffer
size = int(sys.argv[2])
block = 100000
for start in range(0, size // 10, block):
    out.write("".join("%09d," % i for i in range(start, min(size // 10, start + block))).encode())
out.write(b"\nDONE\n")
out.flush()
time.sleep(1e6)
'''

FLOOD_BYTES = 50 * 1000 * 1000
MiB = 1024 * 1024
#: The RSS growth allowed: the rings' 9 MiB, the pipes and the allocator's slack.
GROWTH = 40 * MiB


def flood_text(size: int) -> str:
    return "".join("%09d," % i for i in range(size // 10))


def test_fifty_megabytes_without_a_newline(sup: Supervisor) -> None:
    marker = sup.marker("flood")
    sup.start({"services": {"flood": py_service(FLOOD, marker, str(FLOOD_BYTES), **{
        "auto-start": False, "log-max-size": 0, "respawn": False})}})
    assert sup.proc is not None
    daemon = psutil.Process(sup.proc.pid)
    baseline = daemon.memory_info().rss
    peaks: list[int] = []

    def burst() -> None:
        sup.herd("start", "flood", check=True)

        def done() -> bool:
            peaks.append(daemon.memory_info().rss)
            return recent(sup, "flood", 1) == ["DONE"]
        wait_until(done, 120, "the 50 MB line and DONE to be read")

    burst()
    after_first = daemon.memory_info().rss
    assert max(peaks) - baseline < GROWTH, \
        f"RSS grew from {baseline / MiB:.0f} to {max(peaks) / MiB:.0f} MiB during the burst"

    # Every byte in the file, in order, as lines of at most 64 KiB.
    texts = [text for _, stream, text in sup.log_lines("flood") if stream == "stdout"]
    assert texts[-1] == "DONE"
    assert max(len(t) for t in texts) == 64 * 1024
    assert "".join(texts[:-1]) == flood_text(FLOOD_BYTES), "the log file does not hold the output in order"
    # In memory: one service's recent lines are bounded in bytes, not only in lines.
    kept = recent(sup, "flood", 200)
    assert 10 <= len(kept) < 200 and sum(map(len, kept)) <= MiB, (len(kept), sum(map(len, kept)))

    # A second burst does not grow the daemon further: the memory is bounded, not kept.
    sup.herd("stop", "flood", check=True)
    peaks.clear()
    burst()
    after_second = daemon.memory_info().rss
    assert after_second - after_first < 20 * MiB, \
        f"RSS {after_first / MiB:.0f} MiB after one burst, {after_second / MiB:.0f} MiB after two"
    assert max(peaks) - baseline < GROWTH
    print(f"daemon RSS: {baseline / MiB:.0f} MiB at start, peak {max(peaks) / MiB:.0f}, "
          f"{after_first / MiB:.0f} after one burst, {after_second / MiB:.0f} after two")


def test_a_line_is_never_cut_inside_a_utf8_character(sup: Supervisor) -> None:
    """65535 ASCII bytes, then "é" (2 bytes) and more: the cut comes before
    the "é", so no byte is replaced."""
    code = ("import sys, time\n"
            "sys.stdout.buffer.write(b'a' * 65535 + 'é'.encode() * 40000 + b'\\nDONE\\n')\n"
            "sys.stdout.flush()\ntime.sleep(1e6)\n")
    sup.start({"services": {"u": py_service(code, sup.marker("u"))}})
    wait_until(lambda: recent(sup, "u", 1) == ["DONE"], 20, "DONE")
    texts = [text for _, stream, text in sup.log_lines("u") if stream == "stdout"]
    assert "\ufffd" not in "".join(texts)
    assert texts[0] == "a" * 65535 and "".join(texts[1:-1]) == "é" * 40000 and texts[-1] == "DONE"
