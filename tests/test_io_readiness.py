"""Issue 3 acceptance: readiness (`ready` = notify, pid-file, tcp, unix),
`start-timeout`, the sd_notify watchdog, and real libvirtd/virtlogd announcing
readiness with sd_notify.

Everything is observed from outside: `herd` (human and JSON), the raw status
socket for tight polling, psutil for processes, the files services write.
Services that must stay `starting` for a while wait for a flag file the test
creates, so no test sleeps to "give it time".
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from helpers import (
    MARKER_ENV,
    SLEEP,
    Supervisor,
    base_env,
    find_pids,
    pid_alive,
    py_service,
    sleeper,
    wait_until,
)

# --------------------------------------------------------------------------
# Helpers of this file

#: sd_notify for the services below: a plain sendto on NOTIFY_SOCKET.
NOTIFY_LIB = r'''
import os, socket, sys, time
def notify(msg):
    addr = os.environ["NOTIFY_SOCKET"]
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        s.sendto(msg.encode(), addr)
    finally:
        s.close()
def wait_file(path):
    while not os.path.exists(path):
        time.sleep(0.01)
'''

#: argv: MARKER FLAG.  STATUS=warming up; once FLAG exists READY=1 + STATUS=serving.
NOTIFY_AFTER_FLAG = NOTIFY_LIB + r'''
notify("STATUS=warming up")
wait_file(sys.argv[2])
notify("READY=1\nSTATUS=serving")
time.sleep(1e6)
'''

#: argv: MARKER FLAG1 FLAG2.  Prints its NOTIFY_SOCKET, forks a helper that
#: leaves the service's session (so it is only a descendant) and, once FLAG1
#: exists, sends STATUS=genuine; once FLAG2 exists, READY=1.  The helper lives
#: on (a notify from a process that is already gone cannot be attributed).
NOTIFY_BY_DESCENDANT = NOTIFY_LIB + r'''
print("NOTIFY_SOCKET=" + os.environ["NOTIFY_SOCKET"], flush=True)
if os.fork() == 0:
    os.setsid()
    wait_file(sys.argv[2])
    notify("STATUS=genuine")
    wait_file(sys.argv[3])
    notify("READY=1")
    time.sleep(1e6)
time.sleep(1e6)
'''


#: Never notifies; forks a child in its process group (argv[1] + "-child").
NEVER_READY_WITH_CHILD = r'''
import os, sys, time
if os.fork() == 0:
    os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(1e6)", sys.argv[1] + "-child"])
time.sleep(1e6)
'''


def herd_popen(sup: Supervisor, *args: str) -> subprocess.Popen[str]:
    """``herd ARGS`` in the background (for requests that block)."""
    return subprocess.Popen(
        [sys.executable, "-m", "herd", "-s", str(sup.socket), *args],
        env=base_env(), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 20.0) -> tuple[int, str, str]:
    """Wait (bounded) for a background herd; kill it when the deadline passes."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"herd did not return within {timeout} s\nstdout: {out!r}\nstderr: {err!r}")
    return proc.returncode, out, err


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gone(pid: int) -> bool:
    """The process no longer exists at all (not even as a zombie)."""
    try:
        psutil.Process(pid)
    except psutil.NoSuchProcess:
        return True
    return False


def zombie_children(pid: int) -> list[int]:
    """Zombies whose parent is ``pid`` (a subreaper must reap its orphans)."""
    try:
        return [c.pid for c in psutil.Process(pid).children() if c.status() == psutil.STATUS_ZOMBIE]
    except psutil.NoSuchProcess:
        return []


# --------------------------------------------------------------------------
# notify


def test_notify_service_is_starting_until_ready_and_dependent_waits(sup: Supervisor, tmp_path: Path) -> None:
    flag = tmp_path / "go"
    sup.start({"services": {
        "db": py_service(NOTIFY_AFTER_FLAG, sup.marker("db"), str(flag),
                         ready={"type": "notify"}, **{"auto-start": False}),
        "app": sleeper(sup.marker("app"), requires=["db"], **{"auto-start": False}),
    }})
    events = sup.subscribe()
    start = herd_popen(sup, "start", "app")
    try:
        db = wait_until(lambda: (s := sup.rstatus("db"))["status-text"] == "warming up" and s,
                        10, "db to report STATUS=warming up")
        # The process runs and talks to us, yet it is not ready: starting.
        assert db["state"] == "starting", db
        assert db["pid"] is not None and db["pid"] in find_pids(sup.marker("db")), db
        app = sup.rstatus("app")
        assert app["state"] == "stopped", "the dependent must wait for db to be ready"
        assert find_pids(sup.marker("app")) == set(), "the dependent was spawned before db was ready"
        assert start.poll() is None, "`herd start app` returned before its requirement was ready"

        human = sup.herd("status", "db", check=True).stdout
        assert "It is starting." in human, human
        assert "Status: warming up" in human, human
        summary = sup.herd("status", check=True).stdout
        assert "Starting:" in summary and " ^ db" in summary, summary

        flag.touch()
        rc, out, err = finish(start)
    finally:
        if start.poll() is None:
            start.kill()
            start.wait()
    assert rc == 0, (out, err)

    status = sup.status()
    assert status["db"]["state"] == "running", status["db"]
    assert status["db"]["status-text"] == "serving", status["db"]
    assert status["app"]["state"] == "running", status["app"]
    assert find_pids(sup.marker("app")) == {status["app"]["pid"]}
    human = sup.herd("status", "db", check=True).stdout
    assert "Status: serving" in human, human

    got = events.events(
        lambda ev: any(e["service"] == "app" and e["to"] == "running" for e in ev), timeout=10)
    states = [(e["service"], e["to"]) for e in got if e.get("event") == "state" and e["from"] != e["to"]]
    assert states.index(("db", "running")) < states.index(("app", "starting")), states


def test_herd_start_returns_only_when_ready(sup: Supervisor, tmp_path: Path) -> None:
    flag = tmp_path / "go"
    sup.start({"services": {
        "slow": py_service(NOTIFY_AFTER_FLAG, sup.marker("slow"), str(flag),
                           ready={"type": "notify"}, **{"auto-start": False}),
    }})
    start = herd_popen(sup, "--json", "start", "slow")
    try:
        wait_until(lambda: sup.rstatus("slow")["status-text"] == "warming up", 10, "the service to run")
        assert start.poll() is None, "`herd start` returned while the service was not ready"
        flag.touch()
        rc, out, err = finish(start)
    finally:
        if start.poll() is None:
            start.kill()
            start.wait()
    assert rc == 0, (out, err)
    result = json.loads(out)
    assert result["state"] == "running", result
    assert find_pids(sup.marker("slow")) == {result["pid"]}


def test_notify_from_a_foreign_process_is_ignored(sup: Supervisor, tmp_path: Path) -> None:
    flag1, flag2 = tmp_path / "one", tmp_path / "two"
    sup.start({"services": {
        "guarded": py_service(NOTIFY_BY_DESCENDANT, sup.marker("guarded"), str(flag1), str(flag2),
                              ready={"type": "notify"}, **{"auto-start": False, "kill-mode": "tree"}),
    }})
    # A harmless process for a forged MAINPID= to name.
    bystander = subprocess.Popen([SLEEP, "1000"], stdin=subprocess.DEVNULL)
    start = herd_popen(sup, "start", "guarded")
    try:
        _, _, line = sup.wait_log("guarded", lambda t: t.startswith("NOTIFY_SOCKET="))
        path = line.split("=", 1)[1]
        assert sup.rstatus("guarded")["state"] == "starting"

        # The test process is no process of the service: both messages must be ignored.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            addr = "\0" + path[1:] if path.startswith("@") else path
            s.sendto(b"READY=1\nSTATUS=forged", addr)
            s.sendto(f"MAINPID={bystander.pid}".encode(), addr)
        # A later message from the service itself (sent by its helper) is
        # processed after the forged ones: once it shows, they have been seen.
        flag1.touch()
        wait_until(lambda: sup.rstatus("guarded")["status-text"] == "genuine", 10,
                   "STATUS=genuine from the service's helper")
        st = sup.rstatus("guarded")
        assert st["state"] == "starting", f"a forged READY=1 made the service {st['state']}"
        assert st["pid"] != bystander.pid, "a forged MAINPID= was accepted"
        assert st["pid"] in find_pids(sup.marker("guarded")), st
        assert start.poll() is None, "`herd start` returned on a forged READY=1"

        flag2.touch()
        rc, out, err = finish(start)
        assert rc == 0, (out, err)
        st = sup.status("guarded")
        assert st["state"] == "running", st
        assert st["status-text"] == "genuine", st
        assert st["pid"] != bystander.pid, st
        sup.herd("stop", "guarded", check=True)
        assert bystander.poll() is None, "stopping the service killed the process a forged MAINPID= named"
    finally:
        if start.poll() is None:
            start.kill()
            start.wait()
        bystander.kill()
        bystander.wait()
    assert find_pids(sup.marker("guarded")) == set()


def test_notify_never_ready_fails_at_start_timeout(sup: Supervisor) -> None:
    marker = sup.marker("mute")
    sup.start({"services": {
        "mute": py_service(NEVER_READY_WITH_CHILD, marker, ready={"type": "notify"},
                           **{"start-timeout": 1, "auto-start": False, "stop-timeout": 2}),
    }})
    t0 = time.monotonic()
    cp = sup.herd("start", "mute", check=1)
    elapsed = time.monotonic() - t0
    assert elapsed >= 0.95, f"start failed after {elapsed:.2f} s, before the 1 s start-timeout"
    assert elapsed < 8, f"start-timeout = 1 took {elapsed:.2f} s to fail"
    text = cp.stdout + cp.stderr
    assert "mute" in text and "start-timeout" in text, text
    assert "Traceback" not in cp.stderr

    # No process left: neither the main process nor its child.
    assert find_pids(marker) == set(), "the never-ready process was left running"
    assert find_pids(marker + "-child") == set(), "the never-ready process's child was left running"
    st = sup.status("mute")
    assert st["state"] == "stopped", st
    assert st["pid"] is None, st
    assert st["startup-failures"], st
    assert "start-timeout" in (st["last-failure"] or ""), st
    summary = sup.herd("status", check=True).stdout
    assert "Failed to start:" in summary, summary
    assert " ! mute" in summary.split("Failed to start:", 1)[1], summary
    assert "start-timeout" in sup.herd("status", "mute", check=True).stdout


#: argv: MARKER.  Sends RELOADING=1, then exits 4 without ever being ready.
RELOADING_THEN_EXIT = NOTIFY_LIB + r'''
notify("RELOADING=1")
time.sleep(0.2)
sys.exit(4)
'''


def test_exit_before_ready_fails_the_start(sup: Supervisor) -> None:
    sup.start({"services": {
        "flaky": py_service(RELOADING_THEN_EXIT, sup.marker("flaky"), ready={"type": "notify"},
                            **{"auto-start": False, "start-timeout": 30}),
    }})
    t0 = time.monotonic()
    cp = sup.herd("start", "flaky", check=1)
    assert time.monotonic() - t0 < 10, "a process that died before READY=1 waited for start-timeout"
    assert "flaky" in cp.stdout + cp.stderr
    st = sup.status("flaky")
    assert st["state"] == "stopped", st
    assert st["startup-failures"], st
    assert st["last-exit"]["code"] == 4, st
    assert find_pids(sup.marker("flaky")) == set()


#: argv: MARKER FLAG.  Forks a worker (marked MARKER-worker), announces it
#: with MAINPID= and READY=1, then exits 0 once FLAG exists.
MAINPID_HANDOVER = NOTIFY_LIB + r'''
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(1e6)", sys.argv[1] + "-worker"])
notify("MAINPID=%d\nREADY=1" % pid)
wait_file(sys.argv[2])
sys.exit(0)
'''


def test_mainpid_moves_supervision_to_the_named_process(sup: Supervisor, tmp_path: Path) -> None:
    flag = tmp_path / "leave"
    marker = sup.marker("handover")
    sup.start({"services": {
        "handover": py_service(MAINPID_HANDOVER, marker, str(flag), ready={"type": "notify"},
                               **{"auto-start": False, "respawn": False}),
    }})
    sup.herd("start", "handover", check=True)
    (worker,) = wait_until(lambda: find_pids(marker + "-worker"), 5, "the worker")
    st = sup.status("handover")
    assert st["state"] == "running" and st["pid"] == worker, st
    # The launcher leaves: the service is still running, supervised through the worker.
    (launcher,) = find_pids(marker)
    flag.touch()
    wait_until(lambda: not pid_alive(launcher), 5, "the launcher to exit")
    st = sup.status("handover")
    assert st["state"] == "running" and st["pid"] == worker, st
    sup.herd("stop", "handover", check=True)
    assert not pid_alive(worker), "herd stop left the MAINPID process running"
    assert sup.status("handover")["state"] == "stopped"


# --------------------------------------------------------------------------
# watchdog

#: argv: MARKER FIRSTRUN.  The first run (FIRSTRUN absent) sends READY=1 and
#: one WATCHDOG=1, then goes silent; later runs ping every 0.1 s, printing
#: "ping N".  Both print WATCHDOG_USEC.
WATCHDOG_SVC = NOTIFY_LIB + r'''
print("WATCHDOG_USEC=" + os.environ.get("WATCHDOG_USEC", ""), flush=True)
first = not os.path.exists(sys.argv[2])
open(sys.argv[2], "a").close()
notify("READY=1\nWATCHDOG=1")
if first:
    time.sleep(1e6)
n = 0
while True:
    time.sleep(0.1)
    n += 1
    notify("WATCHDOG=1")
    print("ping %d pid %d" % (n, os.getpid()), flush=True)
'''


def test_watchdog_aborts_a_silent_service_and_respawns_it(sup: Supervisor, tmp_path: Path) -> None:
    marker = sup.marker("dog")
    sup.start({"services": {
        "dog": py_service(WATCHDOG_SVC, marker, str(tmp_path / "ran"), ready={"type": "notify"},
                          **{"watchdog-sec": 0.6, "auto-start": False, "respawn-delay": 0,
                             "resource-limits": {"core": 0}}),
    }})
    cp = sup.herd("start", "dog", json=True, check=True)
    first = cp.data["pid"]
    _, _, env_line = sup.wait_log("dog", lambda t: t.startswith("WATCHDOG_USEC="))
    assert env_line == "WATCHDOG_USEC=600000", env_line

    # The first run stops pinging: after 0.6 s it gets SIGABRT and is respawned.
    st = wait_until(lambda: (s := sup.rstatus("dog"))["pid"] not in (None, first)
                    and s["state"] == "running" and s, 10, "the watchdog to abort and respawn")
    second = st["pid"]
    assert st["last-exit"]["signal"] == "SIGABRT", st["last-exit"]
    assert st["respawns"], st
    assert "watchdog" in (st["last-failure"] or "").lower(), st
    assert not pid_alive(first)

    # The second run keeps pinging: it survives well beyond 0.6 s.
    sup.wait_log("dog", lambda t: t == f"ping 15 pid {second}", timeout=15)
    st = sup.status("dog")
    assert st["state"] == "running" and st["pid"] == second, st
    assert len(st["respawns"]) == 1, st


# --------------------------------------------------------------------------
# pid-file

#: argv: MARKER PIDFILE FLAG.  The classic daemon(3) double fork: the parent
#: exits 0 at once; the child calls setsid() and forks again, and exits; the
#: grandchild (the daemon) waits for FLAG, writes PIDFILE and serves forever.
DOUBLE_FORK = r'''
import os, sys, time
if os.fork() > 0:
    os._exit(0)
os.setsid()
if os.fork() > 0:
    os._exit(0)
while not os.path.exists(sys.argv[3]):
    time.sleep(0.01)
tmp = sys.argv[2] + ".tmp"
with open(tmp, "w") as f:
    f.write("%d\n" % os.getpid())
os.rename(tmp, sys.argv[2])
time.sleep(1e6)
'''


def test_double_forking_daemon_with_pid_file(sup: Supervisor, tmp_path: Path) -> None:
    marker = sup.marker("forky")
    pidfile = tmp_path / "forky.pid"
    flag = tmp_path / "go"
    sup.start({"services": {
        "forky": py_service(DOUBLE_FORK, marker, str(pidfile), str(flag),
                            ready={"type": "pid-file", "path": str(pidfile)},
                            **{"auto-start": False, "respawn-delay": 0, "start-timeout": 20}),
    }})
    daemon_pid = sup.proc.pid  # type: ignore[union-attr]
    # A stale pid file naming a live process (a bystander) must not count as ready.
    bystander = subprocess.Popen([SLEEP, "1000"], stdin=subprocess.DEVNULL)
    pidfile.write_text(f"{bystander.pid}\n")
    start = herd_popen(sup, "--json", "start", "forky")
    try:
        wait_until(lambda: not pidfile.exists(), 10, "the stale pid file to be removed")
        st = sup.rstatus("forky")
        assert st["state"] == "starting", st
        assert start.poll() is None, "`herd start` returned before the pid file was written"
        flag.touch()
        rc, out, err = finish(start)
    finally:
        if start.poll() is None:
            start.kill()
            start.wait()
        bystander.kill()
        bystander.wait()
    assert rc == 0, (out, err)
    real = int(pidfile.read_text())
    assert real != bystander.pid
    st = sup.status("forky")
    assert st["state"] == "running" and st["pid"] == real, st
    # Only the daemon is left of the three processes; it is ours to reap.
    wait_until(lambda: find_pids(marker) == {real}, 5, "the forking parents to be gone")
    assert psutil.Process(real).ppid() == daemon_pid, "the orphaned daemon was not re-parented to the supervisor"

    # SIGKILL of the real daemon: respawned (a new double fork, a new pid file).
    flag.unlink()
    os.kill(real, signal.SIGKILL)
    wait_until(lambda: sup.rstatus("forky")["state"] != "running", 10, "the supervisor to notice the death")
    wait_until(lambda: gone(real), 5, "the killed daemon to be reaped (no zombie)")
    flag.touch()
    st = wait_until(lambda: (s := sup.rstatus("forky"))["state"] == "running" and s["pid"] != real and s,
                    15, "the daemon to be respawned")
    second = st["pid"]
    assert second == int(pidfile.read_text())
    assert st["respawns"], st
    assert any(stream == "supervisor" and "SIGKILL" in text for _, stream, text in sup.log_lines("forky")), \
        "the daemon's death by SIGKILL is not in the service's log"
    wait_until(lambda: find_pids(marker) == {second}, 5, "only the respawned daemon to remain")

    # herd stop kills the real daemon, and nothing is left, not even a zombie.
    sup.herd("stop", "forky", check=True)
    assert not pid_alive(second), "herd stop did not kill the daemon named by the pid file"
    wait_until(lambda: gone(second), 5, "the stopped daemon to be reaped (no zombie)")
    assert sup.status("forky")["state"] == "stopped"
    assert find_pids(marker) == set()
    # The launchers and the killed daemon were all reaped: no zombie is left.
    wait_until(lambda: zombie_children(daemon_pid) == [], 5, "the supervisor to reap every zombie")


def test_pid_file_never_written_fails_at_start_timeout(sup: Supervisor, tmp_path: Path) -> None:
    marker = sup.marker("nopid")
    pidfile = tmp_path / "nopid.pid"
    sup.start({"services": {
        "nopid": py_service("import time; time.sleep(1e6)", marker,
                            ready={"type": "pid-file", "path": str(pidfile)},
                            **{"auto-start": False, "start-timeout": 1}),
    }})
    t0 = time.monotonic()
    cp = sup.herd("start", "nopid", check=1)
    assert 0.95 <= time.monotonic() - t0 < 8
    assert "nopid" in cp.stdout + cp.stderr and "start-timeout" in cp.stdout + cp.stderr, cp
    assert find_pids(marker) == set(), "the process whose pid file never came was left running"
    st = sup.status("nopid")
    assert st["state"] == "stopped" and st["startup-failures"], st


def test_double_forking_daemon_without_pid_file_leaves_no_process(sup: Supervisor, tmp_path: Path) -> None:
    """The launcher exits 0 at once; the daemon it left behind never writes
    its pid file: at start-timeout the start fails and the daemon is gone."""
    marker = sup.marker("ghost")
    pidfile = tmp_path / "ghost.pid"
    never = tmp_path / "never-created"
    sup.start({"services": {
        "ghost": py_service(DOUBLE_FORK, marker, str(pidfile), str(never),
                            ready={"type": "pid-file", "path": str(pidfile)},
                            **{"auto-start": False, "start-timeout": 1}),
    }})
    cp = sup.herd("start", "ghost", check=1)
    assert "start-timeout" in cp.stdout + cp.stderr, cp
    st = sup.status("ghost")
    assert st["state"] == "stopped" and st["startup-failures"], st
    left = find_pids(marker)
    assert left == set(), f"the daemon of a failed start was left running: {sorted(left)}"


# --------------------------------------------------------------------------
# tcp / unix

#: argv: MARKER KIND WHERE FLAG.  Listens (tcp "host:port" or unix path) only
#: once FLAG exists.
LISTEN_AFTER_FLAG = r'''
import os, socket, sys, time
kind, where, flag = sys.argv[2], sys.argv[3], sys.argv[4]
while not os.path.exists(flag):
    time.sleep(0.01)
if kind == "tcp":
    host, port = where.rsplit(":", 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, int(port)))
else:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(where)
s.listen(16)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    c.close()
'''


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_connectable_readiness(sup: Supervisor, tmp_path: Path, kind: str) -> None:
    flag = tmp_path / "go"
    if kind == "tcp":
        where = f"127.0.0.1:{free_port()}"
        ready: dict[str, Any] = {"type": "tcp", "address": where}
    else:
        where = str(sup.sockdir / "svc.sock")
        ready = {"type": "unix", "path": where}
    sup.start({"services": {
        "net": py_service(LISTEN_AFTER_FLAG, sup.marker("net"), kind, where, str(flag),
                          ready=ready, **{"auto-start": False}),
        "client": sleeper(sup.marker("client"), requires=["net"], **{"auto-start": False}),
    }})
    start = herd_popen(sup, "start", "client")
    try:
        st = wait_until(lambda: (s := sup.rstatus("net"))["pid"] and s, 10, "the service to be spawned")
        assert st["state"] == "starting", st
        assert sup.rstatus("client")["state"] == "stopped"
        assert start.poll() is None
        flag.touch()
        rc, out, err = finish(start)
    finally:
        if start.poll() is None:
            start.kill()
            start.wait()
    assert rc == 0, (out, err)
    status = sup.status()
    assert status["net"]["state"] == "running", status["net"]
    assert status["client"]["state"] == "running", status["client"]
    # It really listens now.
    if kind == "tcp":
        host, port = where.rsplit(":", 1)
        socket.create_connection((host, int(port)), timeout=5).close()
    else:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.settimeout(5)
            c.connect(where)


# --------------------------------------------------------------------------
# Real libvirtd and virtlogd (Debian's libvirt-daemon-system)

#: Runs the daemon (argv[1..]) in a private mount namespace with tmpfs over
#: the host-state directories libvirt writes even when told otherwise, so
#: nothing on the host is touched and parallel runs cannot collide.
ISOLATE = (
    "set -e\n"
    "for d in /run/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt; do\n"
    "  mkdir -p \"$d\"; mount -t tmpfs -o mode=755 tmpfs \"$d\"\n"
    "done\n"
    "exec \"$@\"\n"
)

PACKAGES = "libvirt-daemon-system and libvirt-clients"


def isolated(argv: list[str]) -> list[str]:
    unshare = shutil.which("unshare") or "/usr/bin/unshare"
    return [unshare, "-m", "--propagation", "private", "/bin/sh", "-c", ISOLATE, "sh", *argv]


def require_binaries(*names: str) -> dict[str, str]:
    found = {}
    for name in names:
        path = shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
        assert path, f"{name} is not installed: install Debian's {PACKAGES} (contrib/dev does)"
        found[name] = path
    return found


def libvirt_conf(dirpath: Path) -> Path:
    run = dirpath / "run"
    run.mkdir(parents=True, exist_ok=True)
    conf = dirpath / "libvirtd.conf"
    conf.write_text(
        "listen_tls = 0\nlisten_tcp = 0\n"
        f'unix_sock_dir = "{run}"\n'
        'unix_sock_group = "root"\nunix_sock_ro_perms = "0777"\nunix_sock_rw_perms = "0770"\n'
        'auth_unix_ro = "none"\nauth_unix_rw = "none"\n'
        'log_level = 3\nlog_outputs = "3:stderr"\n'
    )
    return conf


def ns_path(pid: int, path: str) -> str:
    """``path`` as seen in the mount namespace of process ``pid``."""
    return f"/proc/{pid}/root{path}"


def virtlogd_ready_check(pid: int) -> subprocess.CompletedProcess[str]:
    sock = ns_path(pid, "/run/libvirt/virtlogd-admin-sock")
    return subprocess.run(
        [shutil.which("virt-admin") or "/usr/bin/virt-admin",
         "-c", f"virtlogd+unix:///system?socket={sock}", "srv-list"],
        capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)


def libvirtd_ready_check(run_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [shutil.which("virsh") or "/usr/bin/virsh",
         "-c", f"qemu+unix:///system?socket={run_dir}/libvirt-sock", "list", "--all"],
        capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)


@pytest.mark.root
@pytest.mark.parametrize("daemon", ["virtlogd", "libvirtd"])
def test_real_libvirt_daemons_are_running_only_after_ready(
    sup: Supervisor, tmp_path: Path, daemon: str
) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"needs root: runs {daemon} from Debian's {PACKAGES} in a private mount namespace")
    bins = require_binaries(daemon, "virsh", "virt-admin", "unshare")
    work = tmp_path / daemon
    work.mkdir()
    if daemon == "libvirtd":
        conf = libvirt_conf(work)
    else:
        conf = work / "virtlogd.conf"
        conf.write_text('log_level = 3\nlog_outputs = "3:stderr"\n')
    argv = [bins[daemon], "-f", str(conf), "-p", str(work / f"{daemon}.pid")]
    marker = sup.marker(daemon)
    common = {"auto-start": False, "ready": {"type": "notify"}, "environment": {MARKER_ENV: marker},
              "stop-timeout": 10}
    sup.start({"services": {
        # The same daemon, deprived of NOTIFY_SOCKET: it runs and serves, but
        # never says READY=1, so it must never count as running.
        f"{daemon}-mute": {"command": isolated(["/usr/bin/env", "-u", "NOTIFY_SOCKET", *argv]),
                           **common, "start-timeout": 4, "environment": {MARKER_ENV: marker + "-mute"}},
        daemon: {"command": isolated(argv), **common, "start-timeout": 30},
    }})

    # 1. Without READY=1: `starting` even while it serves, then start-timeout.
    mute = f"{daemon}-mute"
    start = herd_popen(sup, "start", mute)
    try:
        pid = wait_until(lambda: sup.rstatus(mute)["pid"], 10, f"{mute} to be spawned")

        def serving() -> bool:
            if daemon == "virtlogd":
                return virtlogd_ready_check(pid).returncode == 0
            return libvirtd_ready_check(work / "run").returncode == 0

        wait_until(serving, 10, f"{mute} to answer its clients", interval=0.1)
        st = sup.rstatus(mute)
        assert st["state"] == "starting", f"{mute} sent no READY=1 but is {st['state']}"
        rc, out, err = finish(start, timeout=30)
    finally:
        if start.poll() is None:
            start.kill()
            start.wait()
    assert rc == 1, (out, err)
    assert "start-timeout" in out + err, (out, err)
    assert find_pids(marker + "-mute") == set(), f"{mute} was left running after its failed start"

    # 2. With NOTIFY_SOCKET: running as soon as it says READY=1, and then it
    #    answers at once (no retry needed).
    cp = sup.herd("start", daemon, json=True, check=True)
    pid = cp.data["pid"]
    assert cp.data["state"] == "running"
    check = virtlogd_ready_check(pid) if daemon == "virtlogd" else libvirtd_ready_check(work / "run")
    assert check.returncode == 0, f"{daemon} is running but does not answer: {check.stderr}"
    assert find_pids(marker) == {pid}
    assert psutil.Process(pid).exe().endswith(daemon)

    sup.herd("stop", daemon, check=True)
    assert not pid_alive(pid)
    assert find_pids(marker) == set()
    last = sup.status(daemon)["last-exit"]
    assert last["code"] == 0 or last["signal"] == "SIGTERM", last
