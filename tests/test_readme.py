"""The README runs verbatim (issue 16): its command blocks, replayed on a fresh clone.

The test clones this checkout (with its uncommitted changes: ``git stash
create``), sharing only ``.cache/`` (the downloaded test guest and busybox,
as a second checkout would), and then does what a newcomer does:

1. ``contrib/dev run``, the README's first command, in a session of its own
   (as on a terminal): it sets up ``.venv`` and starts the demo VM host;
   the test waits for the line saying it is up;
2. every other ```sh block of the README, line by line, in one bash
   (``set -e``), from the top of the clone: each command must succeed (a
   block that starts with ``# as root`` only as root);
3. ``herd status`` lists libvirtd, virtlogd, qemu-binfmt and the childhurd as
   started (as a normal user: qemu-binfmt, and the demo says what needs root);
4. Ctrl-C (SIGINT to the process group, as a terminal sends it) stops the
   demo: exit 0, no process of it and no mount of it left, the host's
   binfmt_misc untouched;
5. ``contrib/dev test``, the README's second command, with ``--collect-only``
   (the suite itself is what runs this test): it sets up the test
   dependencies and collects the suite.

It runs twice: as root, and as a normal user (uid 65534, in a clone of its
own under /tmp).  The test itself needs root (CI runs as root) to be both;
it needs the Debian packages ``contrib/dev run`` installs, and the network or
pip's configured index for the new ``.venv``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from helpers import wait_until

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
UP = "the demo VM host is up"
HOST_AARCH64 = "/proc/sys/fs/binfmt_misc/qemu-aarch64"


def sh_blocks(text: str) -> list[str]:
    """The README's ```sh blocks, in order."""
    return re.findall(r"^```sh\n(.*?)^```", text, flags=re.S | re.M)


NOBODY = 65534


def fresh_clone(parent: Path) -> Path:
    """A clone of this checkout as it is (uncommitted changes included), sharing .cache/."""
    rev = subprocess.run(["git", "stash", "create"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip() or "HEAD"
    clone = parent / "clone"
    subprocess.run(["git", "clone", "-q", "--no-checkout", str(ROOT), str(clone)], check=True)
    if rev != "HEAD":
        subprocess.run(["git", "fetch", "-q", str(ROOT), rev], cwd=clone, check=True)
    subprocess.run(["git", "checkout", "-q", rev if rev != "HEAD" else "HEAD"], cwd=clone, check=True)
    (ROOT / ".cache").mkdir(exist_ok=True)
    (clone / ".cache").symlink_to(os.path.realpath(ROOT / ".cache"))
    return clone


def newcomer_env(home: Path | None) -> dict[str, str]:
    """A login shell's environment: no virtualenv, no socket, no PYTHONPATH of the tests."""
    keep = ("HOME", "USER", "LOGNAME", "LANG", "TERM", "http_proxy", "https_proxy", "no_proxy")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    if home is not None:
        env.update(HOME=str(home), USER="nobody", LOGNAME="nobody")
    return env


def demo_processes(clone: Path) -> list[str]:
    """Processes of the demo still alive: their command lines."""
    left = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if p.info["status"] != psutil.STATUS_ZOMBIE and (str(clone) in cmdline or "/run/demo-guest/" in cmdline):
            left.append(f"{p.pid}: {cmdline}")
    return left


def mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] + " " + line.split(" - ")[1].split()[0] for line in f]


@pytest.fixture(params=["root", "user"])
def who(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Path, list[str], dict[str, str]]]:
    """Where the clone goes, the prefix that runs a command as the newcomer, their environment."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to run the demo as root and as another user (CI runs as root)")
    if request.param == "root":
        yield tmp_path, [], newcomer_env(None)
        return
    parent = Path(tempfile.mkdtemp(prefix="readme-user-", dir="/tmp"))
    os.chmod(parent, 0o755)
    (parent / "home").mkdir()
    os.chown(parent / "home", NOBODY, NOBODY)
    try:
        yield parent, ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"], newcomer_env(
            parent / "home")
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def test_readme_blocks_run_verbatim_on_a_fresh_clone(who: tuple[Path, list[str], dict[str, str]],
                                                     tmp_path: Path) -> None:
    parent, as_user, env = who
    root = not as_user
    blocks = sh_blocks(README.read_text())
    assert len(blocks) >= 3, blocks
    first = [line.split("#")[0].strip() for line in blocks[0].splitlines()]
    assert first == ["contrib/dev run", "contrib/dev test"], first
    clone = fresh_clone(parent)
    if not root:
        subprocess.run(["chown", "-R", "-h", f"{NOBODY}:{NOBODY}", str(clone)], check=True)
    mounts_before = mounts()
    aarch64_before = os.path.exists(HOST_AARCH64)
    out = tmp_path / "run.out"
    with open(out, "wb") as f:
        demo = subprocess.Popen([*as_user, "contrib/dev", "run"], cwd=clone, env=env, stdin=subprocess.DEVNULL,
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: UP in out.read_text(errors="replace") or demo.poll() is not None, timeout=900,
                   interval=0.5, what="the demo to come up")
        text = out.read_text(errors="replace")
        assert UP in text, text[-5000:]
        # The set-up was quiet: no pip or setuptools chatter, each step timed.
        setup = text.split("contrib/demo:")[0]
        assert "warning" not in setup.lower(), setup
        assert re.search(r"contrib/dev: installing the project into \.venv \.\.\. done \(\d+\.\d s\)", setup), setup
        assert not (clone / ".venv" / "bin" / "pytest").exists(), "run installed the test dependencies"

        script = "set -ex\n" + "".join(b for b in blocks[1:] if root or not b.startswith("# as root"))
        replay = subprocess.run([*as_user, "bash", "-c", script], cwd=clone, env=env, capture_output=True, text=True,
                                timeout=300)
        assert replay.returncode == 0, f"{replay.stderr[-5000:]}\n{replay.stdout[-3000:]}"

        status = subprocess.run([*as_user, str(clone / ".venv" / "bin" / "herd"), "status"], capture_output=True,
                                text=True,
                                env=dict(env, SUPERVISOR_SOCKET=str(clone / ".demo" / "control.sock")), timeout=30)
        assert status.returncode == 0, status.stderr
        started = status.stdout.split("Started:")[1].split(":")[0]
        for name in ("libvirtd", "virtlogd", "qemu-binfmt", "hurd-vm") if root else ("qemu-binfmt",):
            assert f"+ {name}" in started, status.stdout
        if not root:
            assert "need root" in text, text
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGINT)  # Ctrl-C
        try:
            code = demo.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(demo.pid, signal.SIGKILL)
            raise
    text = out.read_text(errors="replace")
    assert code == 0, text[-5000:]
    assert "stopped: every service and the namespaces are gone" in text, text[-3000:]
    wait_until(lambda: not demo_processes(clone), timeout=10, what="no process of the demo left")
    left = [m for m in mounts() if m not in mounts_before]
    assert [m for m in left if str(clone) in m or "libvirt" in m or "binfmt" in m or "demo" in m] == [], left
    assert os.path.exists(HOST_AARCH64) == aarch64_before, "the demo changed the host's binfmt_misc"

    collect = subprocess.run([*as_user, "contrib/dev", "test", "--collect-only", "-q"], cwd=clone, env=env,
                             capture_output=True, text=True, timeout=1800)
    assert collect.returncode == 0, collect.stdout[-3000:] + collect.stderr[-3000:]
    assert "tests collected" in collect.stdout, collect.stdout[-2000:]
