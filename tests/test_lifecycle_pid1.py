"""Issue 8 acceptance: the supervisor as PID 1 of a PID namespace.

``unshare --pid --fork --mount-proc`` runs a small driver script as the
namespace's PID 1.  It forks: the parent exec's the supervisor (which so
becomes PID 1), the child drives it -- waits for ``READY=1``, runs ``herd``,
watches ``/proc`` of the namespace -- prints its findings as one JSON line
and sends SIGTERM to PID 1.  The test then checks those findings, how the
supervisor went down (files the processes write when they get SIGTERM, the
daemon's log) and that ``unshare`` reports the supervisor's exit status 0.

As PID 1 the supervisor must reap every orphan (here: grandchildren that a
service double-forks, which exit at once: no zombie may be left after 1 s)
without stealing the exit status of a supervised process, and on SIGTERM
stop the services in reverse dependency order, then terminate stray
processes, then exit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from helpers import REPO, cgroup_subtree, find_pids, kill_all, procs_with_token, remove_cgroup_tree

PY = sys.executable

#: Runs as PID 1 of the new namespace; argv[1] is a JSON spec file.
DRIVER = r'''
import json, os, signal, socket, subprocess, sys, time

spec = json.load(open(sys.argv[1]))
env = dict(os.environ, PYTHONPATH=spec["root"], NO_COLOR="1", SVTEST_TOKEN=spec["token"])
env.pop("NOTIFY_SOCKET", None)
notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
notify.bind(spec["notify"])

if os.fork() != 0:
    # PID 1: become the supervisor.
    notify.close()
    log = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.chdir(spec["tmp"])
    env["NOTIFY_SOCKET"] = spec["notify"]
    os.execve(spec["python"], [spec["python"], "-m", "supervisor", *spec["args"]], env)

# The driver.
out = {"ready": False}


def herd(*args):
    p = subprocess.run([spec["python"], "-m", "herd", "-s", spec["socket"], "--json", *args],
                       capture_output=True, text=True, env=env, timeout=30)
    try:
        data = json.loads(p.stdout) if p.stdout.strip() else None
    except ValueError:
        data = None
    return {"rc": p.returncode, "data": data, "out": p.stdout, "err": p.stderr}


def status(name):
    res = herd("status", name)
    return res["data"]["services"][0] if res["rc"] == 0 else None


def stat(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rfind(b")") + 2:].split()
    return rest[0].decode(), int(rest[1])  # state, ppid


def zombies():
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := stat(int(name))) is not None and st[0] == "Z":
            found.append({"pid": int(name), "ppid": st[1]})
    return found


def wait_for(pred, timeout, interval=0.01):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def sig_caught(pid, signum):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) & (1 << (signum - 1)))
    except OSError:
        pass
    return False


try:
    notify.settimeout(0.25)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not out["ready"]:
        try:
            if b"READY=1" in notify.recv(4096).split(b"\n"):
                out["ready"] = True
        except socket.timeout:
            pass
    if out["ready"]:
        out["ping"] = herd("ping")["data"]
        running = ["orphaner", "spawner", "term-a", "term-b"]
        ok = wait_for(lambda: all((s := status(n)) and s["state"] == "running" for n in running), 15, 0.05)
        out["running"] = bool(ok)

        # Orphans: each grandchild writes "PID PPID" once re-parented, then exits.
        orphans = []
        for i in range(spec["orphans"]):
            path = os.path.join(spec["dir"], f"gc{i}")
            if not wait_for(lambda: os.path.exists(path), 10):
                orphans.append({"i": i, "error": "no pid file"})
                continue
            seen = time.monotonic()
            pid, ppid = map(int, open(path).read().split())
            gone = wait_for(lambda: stat(pid) is None, 1.0, 0.005)
            orphans.append({"i": i, "pid": pid, "ppid": ppid, "reaped": bool(gone),
                            "after": round(time.monotonic() - seen, 3), "left": stat(pid)})
        out["orphans"] = orphans
        wait_for(lambda: not zombies(), 1.0)
        out["zombies"] = zombies()

        # The exit status of a supervised process is its own (not taken by the reaper).
        out["exiter-start"] = herd("start", "exiter")["rc"]
        wait_for(lambda: (s := status("exiter")) and s["state"] == "stopped", 10, 0.05)
        out["exiter"] = status("exiter")

        # Every process that records its SIGTERM has its handler in place.
        stray_file = os.path.join(spec["dir"], "stray.pid")
        wait_for(lambda: os.path.exists(stray_file), 10)
        pids = [status(n)["pid"] for n in ("term-a", "term-b")]
        if os.path.exists(stray_file):
            pids.append(int(open(stray_file).read()))
        out["handlers"] = bool(wait_for(lambda: all(sig_caught(p, signal.SIGTERM) for p in pids), 10))
        out["stray"] = os.path.exists(stray_file)
finally:
    print(json.dumps(out), flush=True)
    os.kill(1, signal.SIGTERM)
    os._exit(0)
'''

#: argv: MARKER DIR COUNT.  Forks COUNT children; each forks a grandchild and
#: exits at once.  A grandchild waits to be re-parented, writes
#: "PID PPID" to DIR/gcI, and exits.
ORPHANER = r"""
import os, sys, time
d, n = sys.argv[2], int(sys.argv[3])
for i in range(n):
    c = os.fork()
    if c == 0:
        parent = os.getpid()
        if os.fork() == 0:
            deadline = time.monotonic() + 5
            while os.getppid() == parent and time.monotonic() < deadline:
                time.sleep(0.002)
            tmp = f"{d}/.gc{i}"
            with open(tmp, "w") as f:
                f.write(f"{os.getpid()} {os.getppid()}")
            os.rename(tmp, f"{d}/gc{i}")
            os._exit(0)
        os._exit(0)
    os.waitpid(c, 0)
time.sleep(1e6)
"""

#: argv: MARKER FILE NAME.  On SIGTERM appends NAME to FILE and exits 0.
TERM_RECORDER = r"""
import os, signal, sys, time
def bye(*_):
    fd = os.open(sys.argv[2], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, (sys.argv[3] + "\n").encode())
    os.close(fd)
    os._exit(0)
signal.signal(signal.SIGTERM, bye)
while True:
    time.sleep(1e6)
"""

#: argv: MARKER FILE PIDFILE.  A process of its own session (a stray: it
#: escapes the service's process group) that appends "stray" to FILE on
#: SIGTERM and exits; it writes its PID to PIDFILE once its handler is set.
STRAY = r"""
import os, signal, sys, time
def bye(*_):
    fd = os.open(sys.argv[2], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, b"stray\n")
    os.close(fd)
    os._exit(0)
signal.signal(signal.SIGTERM, bye)
with open(sys.argv[3] + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.rename(sys.argv[3] + ".tmp", sys.argv[3])
while True:
    time.sleep(1e6)
"""

#: argv: MARKER FILE PIDFILE.  Starts STRAY (marked MARKER-stray) in a new
#: session, then sleeps.
SPAWNER = r"""
import os, sys, time
if os.fork() == 0:
    os.setsid()
    os.execv(sys.executable, [sys.executable, "-c", sys.argv[4], sys.argv[1] + "-stray", sys.argv[2], sys.argv[3]])
time.sleep(1e6)
"""


def _unshare() -> list[str]:
    argv = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"]
    if os.geteuid() != 0:
        argv[1:1] = ["--user", "--map-root-user"]
    return argv


@pytest.fixture
def namespace() -> list[str]:
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux)")
    argv = _unshare()
    probe = subprocess.run([*argv, "true"], check=False, capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a PID namespace: {probe.stderr.strip()}")
    return argv


def test_pid1_reaps_orphans_and_shuts_down_on_sigterm(namespace: list[str], tmp_path: Path, containment: str) -> None:
    token = uuid.uuid4().hex[:12]
    sockdir = Path(tempfile.mkdtemp(prefix="svt-", dir="/tmp"))
    work = tmp_path / "work"
    work.mkdir()
    record = work / "sigterm.order"
    orphans = 5

    def marker(name: str) -> str:
        return f"svt-{token}-{name}"

    config = {"services": {
        "orphaner": {"command": [PY, "-c", ORPHANER, marker("orphaner"), str(work), str(orphans)]},
        "spawner": {"command": [PY, "-c", SPAWNER, marker("spawner"), str(record),
                                str(work / "stray.pid"), STRAY]},
        "term-b": {"command": [PY, "-c", TERM_RECORDER, marker("term-b"), str(record), "term-b"]},
        "term-a": {"command": [PY, "-c", TERM_RECORDER, marker("term-a"), str(record), "term-a"],
                   "requires": ["term-b"]},
        "exiter": {"command": [PY, "-c", "import time; time.sleep(0.3); raise SystemExit(7)", marker("exiter")],
                   "auto-start": False, "respawn": False},
    }}
    config_path = tmp_path / "init.toml"
    config_path.write_text(tomli_w.dumps(config))
    log = tmp_path / "daemon.log"
    spec = {
        "root": str(REPO), "python": PY, "token": token, "tmp": str(tmp_path), "dir": str(work),
        "log": str(log), "notify": str(sockdir / "notify"), "socket": str(sockdir / "rw.sock"),
        "orphans": orphans,
        "args": ["-c", str(config_path), "-s", str(sockdir / "rw.sock"),
                 "--status-socket", str(sockdir / "ro.sock"), "--state-dir", str(tmp_path / "state"),
                 "--log-dir", str(tmp_path / "log"), "--log-format", "json",
                 *(["--no-cgroups"] if containment == "fallback" else [])],
    }
    spec_file, driver = tmp_path / "spec.json", tmp_path / "driver.py"
    spec_file.write_text(json.dumps(spec))
    driver.write_text(DRIVER)
    try:
        proc = subprocess.run([*namespace, PY, str(driver), str(spec_file)],
                              check=False, capture_output=True, text=True, timeout=120)
    finally:
        kill_all(procs_with_token(token))
        shutil.rmtree(sockdir, ignore_errors=True)
        subtree = cgroup_subtree(tmp_path / "state")
        if subtree is not None:
            remove_cgroup_tree(subtree)
    daemon_log = log.read_text(errors="replace") if log.exists() else ""
    context = f"\nunshare stderr: {proc.stderr}\ndaemon log:\n{daemon_log[-6000:]}"
    lines = proc.stdout.strip().splitlines()
    assert lines, f"the driver printed nothing (rc {proc.returncode}){context}"
    out: dict[str, Any] = json.loads(lines[-1])
    assert out["ready"], f"the supervisor never sent READY=1{context}"

    # It really was PID 1.
    assert out["ping"]["pid"] == 1, out["ping"]
    assert out["running"], f"services did not come up: {out}{context}"

    # Orphaned grandchildren were re-parented to it and reaped: no zombie after 1 s.
    assert len(out["orphans"]) == orphans
    for orphan in out["orphans"]:
        assert "error" not in orphan, orphan
        assert orphan["ppid"] == 1, f"not re-parented to PID 1: {orphan}"
        assert orphan["reaped"], f"orphan {orphan['pid']} not reaped within 1 s: {orphan}{context}"
    assert out["zombies"] == [], f"zombies left: {out['zombies']}"

    # Reaping orphans did not take the exit status of a supervised process.
    assert out["exiter-start"] == 0
    assert out["exiter"]["state"] == "stopped", out["exiter"]
    assert out["exiter"]["last-exit"]["code"] == 7, out["exiter"]["last-exit"]

    # SIGTERM: services down in reverse dependency order, then the stray, then exit 0.
    assert out["handlers"] and out["stray"], out
    assert proc.returncode == 0, f"unshare/supervisor exited {proc.returncode}{context}"
    order = record.read_text().split() if record.exists() else []
    events = [json.loads(line) for line in daemon_log.splitlines() if line.startswith("{")]
    names = [ev.get("event") for ev in events]
    if containment == "fallback":
        assert order == ["term-a", "term-b", "stray"], f"SIGTERM order {order}{context}"
        assert "all services stopped" in names and "terminating stray processes" in names, names
        assert names.index("all services stopped") < names.index("terminating stray processes")
    else:
        # The spawner's setsid'd child is in the spawner's cgroup: no stray at
        # all, it is stopped (with SIGTERM first) along with its service.
        assert sorted(order) == ["stray", "term-a", "term-b"], f"SIGTERM order {order}{context}"
        assert order.index("term-a") < order.index("term-b"), f"SIGTERM order {order}{context}"
        assert "all services stopped" in names, names
    for name in ("orphaner", "spawner", "spawner-stray", "term-a", "term-b", "exiter"):
        assert find_pids(marker(name)) == set(), f"{name} survived"
