"""Containment and trust (issue 12): every process of a service is the
supervisor's to account for, and only the service's own processes can speak
for it.

Services fork away, exit early, double-fork, call setsid, or name other
processes as their main PID; the daemon must stop all of theirs and none of
anyone else's.  The cases marked ``cgroup_only`` are what the fallback
(--no-cgroups) documents as out of its reach; the trust cases run both ways.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from helpers import (
    PY,
    PY_FORK_CHILD,
    Supervisor,
    cgroup_of,
    find_pids,
    pid_alive,
    py_service,
    nobody_python,
    wait_until,
)

SH = shutil.which("sh") or "/bin/sh"
SLEEP = shutil.which("sleep") or "/bin/sleep"


def marked_sleep(marker: str) -> list[str]:
    """argv of a sleep that psutil finds by `marker` (in its argv)."""
    return [PY, "-c", "import time; time.sleep(1e6)", marker]


def gone(marker: str) -> bool:
    return not find_pids(marker)


@pytest.mark.cgroup_only
def test_what_an_exited_main_process_left_is_stopped(sup: Supervisor) -> None:
    """``sh -c "sleep 600 & exit 0"`` with respawn off: nothing remains."""
    m = sup.marker("bg")
    script = f'{PY} -c "import time; time.sleep(1e6)" {m} & exit 0'
    sup.start({"services": {"bg": {"command": [SH, "-c", script], "respawn": False}}})
    wait_until(lambda: sup.rstatus("bg")["state"] == "stopped", 20, "bg stopped after its shell exited")
    wait_until(lambda: gone(m), 10, "the background sleep to be stopped with its service")
    assert "stopping the processes it left" in "\n".join(line for _, _, line in sup.log_lines("bg"))


@pytest.mark.cgroup_only
def test_respawn_finds_the_leftovers_gone(sup: Supervisor) -> None:
    """A crashed main process's children are stopped before the respawn."""
    m = sup.marker("worker")
    script = f'{PY} -c "import time; time.sleep(1e6)" {m} & sleep 1000000'
    sup.start({"services": {"srv": {"command": [SH, "-c", script]}}})
    wait_until(lambda: len(find_pids(m)) == 1, 10, "the first worker")
    first_worker = find_pids(m).pop()
    main = sup.rstatus("srv")["pid"]
    os.kill(main, signal.SIGKILL)
    wait_until(lambda: sup.rstatus("srv")["state"] == "running" and sup.rstatus("srv")["pid"] not in (None, main),
               20, "srv respawned")
    wait_until(lambda: not pid_alive(first_worker), 10, "the old worker to be gone")
    wait_until(lambda: len(find_pids(m)) == 1, 10, "exactly one (new) worker")


@pytest.mark.cgroup_only
def test_setsid_escape_is_stopped_under_tree(sup: Supervisor) -> None:
    """``setsid -f`` (fork, new session, parent returns): stop reaches it."""
    m = sup.marker("escaped")
    setsid = shutil.which("setsid")
    assert setsid, "util-linux's setsid is needed (contrib/dev installs util-linux)"
    script = f'{setsid} -f {PY} -c "import time; time.sleep(1e6)" {m}; exec {SLEEP} 1000000'
    sup.start({"services": {"t": {"command": [SH, "-c", script], "kill-mode": "tree"},
                            "p": {"command": [SH, "-c", script.replace(m, m + "-p")], "kill-mode": "process"}}})
    wait_until(lambda: find_pids(m) and find_pids(m + "-p"), 10, "both escapes running")
    escaped_p = find_pids(m + "-p")
    sup.herd("stop", "t", check=0)
    assert gone(m), "the setsid'd child of a kill-mode=tree service survived herd stop"
    sup.herd("stop", "p", check=0)
    # kill-mode "process": the main process only; the rest stays, and is shown
    assert all(pid_alive(p) for p in escaped_p), "kill-mode=process must leave the other processes alone"
    st = sup.status("p")
    assert st["state"] == "stopped"
    cp = sup.herd("status", "p", check=0)
    assert "Left-over processes: 1" in cp.stdout, cp.stdout
    # the next start reuses the cgroup; a stop of kill-mode tree would not leave them
    sup.herd("start", "p", check=0)
    assert all(pid_alive(p) for p in escaped_p)


@pytest.mark.cgroup_only
def test_service_processes_are_in_their_own_cgroup(sup: Supervisor) -> None:
    sup.start({"services": {"a": py_service(PY_FORK_CHILD, sup.marker("a"), "setsid"),
                            "b": py_service(PY_FORK_CHILD, sup.marker("b"), "setsid")}})
    def pids(name: str) -> set[int]:
        return find_pids(sup.marker(name)) | find_pids(sup.marker(name) + "-child")

    wait_until(lambda: len(pids("a")) == 2 and len(pids("b")) == 2, 10, "both services and their children")
    groups = {name: {cgroup_of(p) for p in pids(name)} for name in ("a", "b")}
    assert all(len(g) == 1 for g in groups.values()), groups
    a, b = groups["a"].pop(), groups["b"].pop()
    assert a != b and a.endswith("/a.service") and b.endswith("/b.service"), (a, b)
    assert cgroup_of(sup.proc.pid) not in (a, b)
    ping = sup.request({"id": 1, "action": "ping"})["result"]
    assert ping["containment"]["mode"] == "cgroup"
    assert a.startswith(ping["containment"]["cgroup"] + "/")
    # one-service status shows the process count, CPU time and memory
    procs = sup.status("a")["processes"]
    assert procs["processes"] == 2 and procs["cpu-usec"] is not None and procs["memory-bytes"], procs
    cp = sup.herd("status", "a", check=0)
    assert "Processes: 2" in cp.stdout, cp.stdout


def test_the_containment_mode_is_said(sup: Supervisor, containment: str) -> None:
    sup.start({"services": {}})
    ping = sup.request({"id": 1, "action": "ping"})["result"]
    if containment == "fallback":
        assert ping["containment"] == {"mode": "process-tree", "reason": "cgroups turned off (--no-cgroups)"}
        assert "not by cgroup" in sup.stderr_path.read_text()
    else:
        assert ping["containment"]["mode"] == "cgroup"
        assert "not by cgroup" not in sup.stderr_path.read_text()


# -- trust -----------------------------------------------------------------------------

NOTIFY_LIAR = r"""
import os, socket, sys, time
addr = os.environ["NOTIFY_SOCKET"]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
def say(msg):
    s.sendto(msg.encode(), addr)
say("READY=1")
for target in sys.argv[2:]:
    say(f"MAINPID={target}")
say("WATCHDOG=trigger")  # handled after the lies: one sender's datagrams keep their order
time.sleep(1e6)
"""


@pytest.fixture
def decoy() -> subprocess.Popen[bytes]:
    """An unrelated root process (not the supervisor's, not any service's)."""
    p = subprocess.Popen([SLEEP, "1000000"], start_new_session=True)
    yield p
    p.kill()
    p.wait()


def test_mainpid_naming_others_is_ignored(sup: Supervisor, decoy: subprocess.Popen[bytes]) -> None:
    python = nobody_python()
    # The daemon's own PID is known only once it runs: start it, then add the liar.
    sup.start({"services": {}})
    os.chmod(sup.sockdir, 0o711)  # nobody must reach the notify socket in it
    targets = [str(sup.proc.pid), "1", str(decoy.pid)]
    sup.write_config({"services": {"liar": {
        "command": [python, "-c", NOTIFY_LIAR, sup.marker("liar"), *targets],
        "user": "nobody", "ready": {"type": "notify"}, "watchdog-sec": 600, "respawn": False}}})
    sup.herd("reload", "root", check=0)
    sup.herd("start", "liar", check=0)
    # WATCHDOG=trigger acts on the main process: still the liar itself (a
    # lie believed would have made it the supervisor, PID 1 or the decoy)
    wait_until(lambda: (sup.rstatus("liar").get("last-exit") or {}).get("signal") == "SIGABRT", 10,
               "the liar to be aborted on its own WATCHDOG=trigger")
    assert sup.proc.poll() is None, "the supervisor died"
    assert decoy.poll() is None and pid_alive(1)
    log = "\n".join(line for _, _, line in sup.log_lines("liar"))
    assert "ignored MAINPID=" in log and "the supervisor itself" in log and "PID 1" in log, log
    assert log.count("the supervisor itself") == 1, "a refusal is said once per service"
    sup.herd("stop", "liar", check=0)
    assert decoy.poll() is None, "herd stop killed an unrelated root process"
    assert sup.proc.poll() is None


PID_FILE_LIAR = r"""
import sys
open(sys.argv[1], "w").write(sys.argv[2] + "\n")
"""


def test_pid_file_naming_others_is_refused(sup: Supervisor, decoy: subprocess.Popen[bytes],
                                           request: pytest.FixtureRequest) -> None:
    python = nobody_python()
    run = Path(tempfile.mkdtemp(prefix="svt-run-", dir="/tmp"))  # reachable by nobody
    os.chmod(run, 0o755)
    shutil.chown(run, "nobody")
    request.addfinalizer(lambda: shutil.rmtree(run, ignore_errors=True))
    sup.start({"services": {}})
    svcs = {}
    for name, target in (("sup", sup.proc.pid), ("init", 1), ("other", decoy.pid)):
        svcs[f"liar-{name}"] = {"command": [python, "-c", PID_FILE_LIAR, str(run / f"{name}.pid"), str(target)],
                                "user": "nobody", "ready": {"type": "pid-file", "path": str(run / f"{name}.pid")},
                                "respawn": False, "start-timeout": 10}
    sup.write_config({"services": svcs})
    sup.herd("reload", "root", check=0)
    for name in svcs:
        cp = sup.herd("start", name)
        assert cp.returncode != 0, cp
        assert "is not the service's" in cp.stderr + cp.stdout, cp
        sup.herd("stop", name, check=0)
    assert decoy.poll() is None and sup.proc.poll() is None


HANDOFF = r"""
"$0" -c 'import time; time.sleep(1e6)' "$1" &
systemd-notify --ready --pid=$!
exit 0
"""


@pytest.mark.cgroup_only
def test_mainpid_hand_off_from_a_helper_is_followed(sup: Supervisor) -> None:
    """``systemd-notify --ready --pid=$!`` from a wrapper (MAINPID from a helper)."""
    assert shutil.which("systemd-notify"), "systemd-notify is needed (Debian package systemd)"
    m = sup.marker("daemon")
    sup.start({"services": {"wrapped": {"command": [SH, "-c", HANDOFF, PY, m], "ready": {"type": "notify"}}}})
    sup.herd("start", "wrapped", check=0)
    wait_until(lambda: len(find_pids(m)) == 1, 10, "the daemon")
    daemon = find_pids(m).pop()
    wait_until(lambda: sup.rstatus("wrapped")["pid"] == daemon, 10, "the daemon to become the main PID")
    assert sup.rstatus("wrapped")["state"] == "running"
    os.kill(daemon, signal.SIGKILL)  # supervised: its death is noticed and it is respawned
    wait_until(lambda: sup.rstatus("wrapped")["state"] == "running" and sup.rstatus("wrapped")["pid"] not in (None, daemon),
               20, "the wrapped daemon respawned")


#: READY=1, then exit at once: the datagram may still be unread when the exit is seen.
READY_AND_GONE = r"""
import os, socket
socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"READY=1", os.environ["NOTIFY_SOCKET"])
"""

def test_ready_sent_just_before_the_main_process_exits_counts(sup: Supervisor) -> None:
    """A notify service whose main process says READY=1 and exits at once has
    started (and then ended): the message is heard before the exit is judged,
    every time (it was a race: "exited with code 0 before it was ready")."""
    sup.start({"services": {"quick": py_service(READY_AND_GONE, ready={"type": "notify"}, respawn=False,
                                                **{"auto-start": False})}})
    for i in range(15):
        cp = sup.herd("start", "quick")
        assert cp.returncode == 0, f"start {i + 1}: {cp.stdout}{cp.stderr}"
        wait_until(lambda: sup.rstatus("quick")["state"] == "stopped", 10, "quick to end")
        assert sup.rstatus("quick")["last-exit"]["code"] == 0


@pytest.mark.cgroup_only
def test_a_handoff_is_followed_every_time(sup: Supervisor) -> None:
    """``systemd-notify --ready --pid=$!`` then ``exit 0``, ten times: the wrapper's
    exit and its READY=1 (heard just before) may reach the start in the same
    pass of the loop, and the readiness counts (it was a race: "exited with
    code 0 before it was ready", once in a CI run)."""
    assert shutil.which("systemd-notify"), "systemd-notify is needed (Debian package systemd)"
    m = sup.marker("daemon")
    sup.start({"services": {"wrapped": {"command": [SH, "-c", HANDOFF, PY, m], "ready": {"type": "notify"},
                                        "auto-start": False}}})
    for i in range(10):
        cp = sup.herd("start", "wrapped")
        assert cp.returncode == 0, f"start {i + 1}: {cp.stdout}{cp.stderr}"
        st = sup.rstatus("wrapped")
        assert st["state"] == "running" and st["pid"] in find_pids(m), st
        sup.herd("stop", "wrapped", check=0)
        assert find_pids(m) == set()


DOUBLE_FORK_READY = r"""
import os, socket, sys, time
if os.fork():
    time.sleep(1e6)  # the parent waits; the grandchild is the real daemon
os.setsid()
if os.fork():
    os._exit(0)
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(f"READY=1\nMAINPID={os.getpid()}".encode(), os.environ["NOTIFY_SOCKET"])
time.sleep(1e6)
"""


@pytest.mark.cgroup_only
def test_ready_from_a_double_forked_grandchild_is_accepted(sup: Supervisor) -> None:
    m = sup.marker("df")
    sup.start({"services": {"df": py_service(DOUBLE_FORK_READY, m, ready={"type": "notify"}, **{"start-timeout": 15})}})
    sup.herd("start", "df", check=0)
    st = sup.rstatus("df")
    assert st["state"] == "running"
    pids = find_pids(m)
    assert st["pid"] in pids and len(pids) == 2, (st, pids)
    sup.herd("stop", "df", check=0)
    assert gone(m)


# -- a real forking daemon: Debian's nginx --------------------------------------------

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nginx_conf(d: Path, port: int, marker: str, *, foreground: bool) -> Path:
    (d / "tmp").mkdir(parents=True, exist_ok=True)
    conf = d / "nginx.conf"
    conf.write_text(f"""
{"daemon off;" if foreground else ""}
user nobody nogroup;
worker_processes 2;
error_log {d}/error.log;
pid {d}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "{marker}\\n"; }}
    }}
}}
""")
    return conf


def _get(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
        return r.read().decode().strip()


def _served(port: int, marker: str) -> bool:
    try:
        return _get(port) == marker
    except OSError:
        return False


def _tree(pid: int) -> set[int]:
    import psutil

    try:
        p = psutil.Process(pid)
        return {pid, *(c.pid for c in p.children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()


@pytest.mark.cgroup_only
@pytest.mark.parametrize("how", ["forking", "foreground"])
def test_nginx_master_killed_leaves_no_worker_behind(sup: Supervisor, tmp_path: Path, how: str) -> None:
    """Debian's nginx: kill -9 of the master must not leave workers that keep
    the port (the respawned master could not bind); stop leaves nothing."""
    assert os.path.exists(NGINX), "nginx is needed (Debian package nginx; contrib/dev installs it)"
    port, marker = _free_port(), sup.marker("nginx")
    d = tmp_path / "nginx"
    conf = _nginx_conf(d, port, marker, foreground=how == "foreground")
    svc = {"command": [NGINX, "-c", str(conf), "-p", str(d)], "stop-timeout": 10}
    if how == "forking":
        svc["ready"] = {"type": "pid-file", "path": str(d / "nginx.pid")}
    else:
        svc["ready"] = {"type": "tcp", "address": f"127.0.0.1:{port}"}
    sup.start({"services": {"nginx": svc}})
    wait_until(lambda: sup.rstatus("nginx")["state"] == "running", 20, "nginx running")
    assert _get(port) == marker
    master = sup.rstatus("nginx")["pid"]
    old = _tree(master)
    assert len(old) == 3, f"a master and two workers: {old}"

    os.kill(master, signal.SIGKILL)
    wait_until(lambda: not any(pid_alive(p) for p in old), 20, "the old master's workers to be stopped")
    wait_until(lambda: sup.rstatus("nginx")["state"] == "running" and sup.rstatus("nginx")["pid"] not in (None, master),
               20, "a respawned master")
    wait_until(lambda: _served(port, marker), 20, "the respawned nginx to serve HTTP")
    new_master = sup.rstatus("nginx")["pid"]
    new = _tree(new_master)
    assert len(new) == 3 and not new & old, (old, new)
    assert sup.rstatus("nginx")["state"] == "running"
    assert sup.rstatus("nginx")["respawns"], "the crash was a respawn"

    sup.herd("stop", "nginx", check=0)
    assert not any(pid_alive(p) for p in new | old), "herd stop left nginx processes"
    assert not _served(port, marker)
