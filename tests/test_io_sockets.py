"""Issue 3 acceptance: socket activation, systemd-style.

``sockets = [{ path = "/abs/x.sock", mode = "0660", group = "G", name = "main" },
{ address = "127.0.0.1:PORT", name = "tcp" }]``: the supervisor binds them once,
keeps them open across restarts, and passes them as fds 3, 4, … with
``LISTEN_FDS``, ``LISTEN_PID`` (the child's own pid) and ``LISTEN_FDNAMES``.
``activation = "lazy"``: no process until the first connection.

The service under test (`SERVE`) refuses to run unless ``LISTEN_PID`` is its
own pid, reports what it received, and answers every connection with
``pid PID name NAME``.
"""

from __future__ import annotations

import grp
import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from helpers import (
    Supervisor,
    base_env,
    crash,
    find_pids,
    pid_alive,
    py_service,
    restart,
    sleeper,
    wait_until,
)

#: argv: MARKER [STOPFLAG].  On SIGTERM prints TERM and, when STOPFLAG is
#: given, waits for that file before exiting (so a test can act while the
#: service is mid-restart and accepting nothing).
SERVE = r'''
import json, os, select, signal, socket, sys, time
if os.environ.get("LISTEN_PID") != str(os.getpid()):
    print("BAD LISTEN_PID %r, my pid is %d" % (os.environ.get("LISTEN_PID"), os.getpid()), flush=True)
    sys.exit(3)
n = int(os.environ["LISTEN_FDS"])
names = os.environ.get("LISTEN_FDNAMES", "").split(":")
fds = {}
for entry in os.listdir("/proc/self/fd"):
    fd = int(entry)
    try:
        os.fstat(fd)
    except OSError:
        continue
    fds[fd] = os.readlink("/proc/self/fd/%d" % fd)
socks = [socket.socket(fileno=3 + i) for i in range(n)]
info = {
    "pid": os.getpid(), "n": n, "names": names, "fds": sorted(fds), "targets": {str(k): v for k, v in fds.items()},
    "listening": [s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) for s in socks],
    "families": [s.family.name for s in socks],
}
print("LISTEN " + json.dumps(info), flush=True)
stopflag = sys.argv[2] if len(sys.argv) > 2 else ""
def term(*_):
    print("TERM", flush=True)
    if stopflag:
        while not os.path.exists(stopflag):
            time.sleep(0.01)
    os._exit(0)
signal.signal(signal.SIGTERM, term)
while True:
    ready, _, _ = select.select(socks, [], [])
    for s in ready:
        c, _ = s.accept()
        c.sendall(("pid %d name %s\n" % (os.getpid(), names[socks.index(s)])).encode())
        c.close()
'''


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def connect(where: str, timeout: float = 15.0) -> socket.socket:
    """Connect (once: a refused connection is a failure) to a path or host:port."""
    if where.startswith("/"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: Any = where
    else:
        host, port = where.rsplit(":", 1)
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        target = (host, int(port))
    s.settimeout(timeout)
    try:
        s.connect(target)
    except OSError as exc:
        s.close()
        raise AssertionError(f"connecting to {where} failed: {exc!r}") from None
    return s


def answer(s: socket.socket) -> tuple[int, str]:
    """Read the service's one-line answer ``pid PID name NAME``."""
    data = b""
    try:
        while not data.endswith(b"\n"):
            chunk = s.recv(256)
            if not chunk:
                break
            data += chunk
    except socket.timeout:
        raise AssertionError(f"no answer in time (got {data!r})") from None
    finally:
        s.close()
    words = data.decode().split()
    assert len(words) == 4 and words[0] == "pid" and words[2] == "name", data
    return int(words[1]), words[3]


def ask(where: str, timeout: float = 15.0) -> tuple[int, str]:
    return answer(connect(where, timeout))


def listen_info(sup: Supervisor, name: str, pid: int) -> dict[str, Any]:
    _, _, text = sup.wait_log(name, lambda t: t.startswith("LISTEN ") and f'"pid": {pid},' in t)
    return json.loads(text[len("LISTEN "):])


def other_group() -> tuple[str, int]:
    """A group to give a socket: not our primary one when we may chown (root)."""
    if os.geteuid() == 0:
        for name in ("nogroup", "daemon", "adm", "users", "sys"):
            try:
                g = grp.getgrnam(name)
            except KeyError:
                continue
            if g.gr_gid != os.getegid():
                return g.gr_name, g.gr_gid
    g = grp.getgrgid(os.getegid())
    return g.gr_name, g.gr_gid


def herd_popen(sup: Supervisor, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "herd", "-s", str(sup.socket), *args],
        env=base_env(), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


# --------------------------------------------------------------------------


def test_sockets_are_passed_as_fds_3_and_up(sup: Supervisor) -> None:
    main = str(sup.sockdir / "main.sock")
    plain = str(sup.sockdir / "plain.sock")
    tcp = f"127.0.0.1:{free_port()}"
    group, gid = other_group()
    sup.start({"services": {
        "web": py_service(SERVE, sup.marker("web"), sockets=[
            {"path": main, "mode": "0660", "group": group, "name": "main"},
            {"address": tcp, "name": "tcp"},
        ]),
        "plain": py_service(SERVE, sup.marker("plain"), sockets=[{"path": plain}]),
    }})
    st = wait_until(lambda: (s := sup.rstatus("web"))["state"] == "running" and s, 10, "web to run")
    pid = st["pid"]
    info = listen_info(sup, "web", pid)
    assert info["n"] == 2, info
    assert info["names"] == ["main", "tcp"], info
    # 0-2, the two sockets, then its guards (its own stdout and stderr pipes again: docs/keeper.md)
    assert info["fds"] == [0, 1, 2, 3, 4, 5, 6], f"the child should see 0-2, the sockets and guards only: {info}"
    assert [info["targets"][k] for k in ("5", "6")] == [info["targets"][k] for k in ("1", "2")], info
    assert info["listening"] == [1, 1], info
    assert info["families"] == ["AF_UNIX", "AF_INET"], info
    assert find_pids(sup.marker("web")) == {pid}, "LISTEN_PID was not the service's own pid"

    s = os.stat(main)
    assert stat.S_ISSOCK(s.st_mode)
    assert stat.S_IMODE(s.st_mode) == 0o660, oct(s.st_mode)
    assert s.st_gid == gid, (s.st_gid, gid)
    assert stat.S_IMODE(os.stat(plain).st_mode) == 0o666, "default mode is 0666"

    assert ask(main) == (pid, "main")
    assert ask(tcp) == (pid, "tcp")

    pst = wait_until(lambda: (s := sup.rstatus("plain"))["state"] == "running" and s, 10, "plain to run")
    assert listen_info(sup, "plain", pst["pid"])["names"] == ["plain"], "default name is the service's"
    assert ask(plain) == (pst["pid"], "plain")


@pytest.mark.parametrize("auto_start", [None, False], ids=["auto-start-default", "auto-start-false"])
def test_lazy_activation_starts_on_first_connection(sup: Supervisor, auto_start: bool | None) -> None:
    path = str(sup.sockdir / "lazy.sock")
    tcp = f"127.0.0.1:{free_port()}"
    marker = sup.marker("lazy")
    keys: dict[str, Any] = {} if auto_start is None else {"auto-start": auto_start}
    sup.start({"services": {
        # Lazy means "not at boot": with or without auto-start, no process yet.
        "lazy": py_service(SERVE, marker, activation="lazy", **keys, sockets=[
            {"path": path, "name": "main"}, {"address": tcp, "name": "tcp"}]),
        # An ordinary auto-start service: once it runs, the boot has happened.
        "witness": sleeper(sup.marker("witness")),
    }})
    wait_until(lambda: sup.rstatus("witness")["state"] == "running", 10, "the boot to start services")
    st = sup.status("lazy")
    assert st["state"] == "stopped", st
    assert st["pid"] is None, st
    assert find_pids(marker) == set(), "a lazy service was started before any connection"
    assert stat.S_ISSOCK(os.stat(path).st_mode), "the lazy service's socket is not bound"

    # The first connection (here on TCP) starts it, and is served.
    pid, name = ask(tcp)
    assert name == "tcp"
    st = sup.status("lazy")
    assert st["state"] == "running" and st["pid"] == pid, st
    assert find_pids(marker) == {pid}
    # Later connections go to the same process.
    assert ask(path) == (pid, "main")
    assert ask(tcp) == (pid, "tcp")
    assert find_pids(marker) == {pid}


def test_connections_during_a_restart_are_served(sup: Supervisor, tmp_path: Path) -> None:
    path = str(sup.sockdir / "svc.sock")
    tcp = f"127.0.0.1:{free_port()}"
    stopflag = tmp_path / "may-exit"
    marker = sup.marker("svc")
    sup.start({"services": {
        "svc": py_service(SERVE, marker, str(stopflag), **{"stop-timeout": 20}, sockets=[
            {"path": path, "name": "main"}, {"address": tcp, "name": "tcp"}]),
    }})
    first = wait_until(lambda: (s := sup.rstatus("svc"))["state"] == "running" and s["pid"], 10, "svc to run")
    assert ask(path) == (first, "main")
    inode = os.stat(path).st_ino

    restart = herd_popen(sup, "restart", "svc")
    try:
        # The old process got SIGTERM and accepts nothing any more.
        sup.wait_log("svc", lambda t: t == "TERM")
        assert sup.rstatus("svc")["state"] == "stopping"
        # Connecting now is not refused: the supervisor holds the sockets.
        pending = [connect(path), connect(tcp)]
        stopflag.touch()
        answers = [answer(s) for s in pending]
        out, err = restart.communicate(timeout=20)
    finally:
        if restart.poll() is None:
            restart.kill()
            restart.wait()
    assert restart.returncode == 0, (out, err)
    second = answers[0][0]
    assert second != first, "the connection was served by the old process"
    assert answers == [(second, "main"), (second, "tcp")], answers
    st = sup.status("svc")
    assert st["state"] == "running" and st["pid"] == second, st
    assert not pid_alive(first)
    assert find_pids(marker) == {second}
    assert os.stat(path).st_ino == inode, "the Unix socket was re-created instead of kept open"
    assert ask(tcp) == (second, "tcp")


def refused(where: str) -> bool:
    host, port = where.rsplit(":", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        try:
            s.connect((host, int(port)))
        except ConnectionRefusedError:
            return True
        return False


def test_a_socket_taken_out_of_the_definition_is_closed_by_everyone_who_held_it(sup: Supervisor) -> None:
    """A reload moves the service's socket to another port; at its restart the
    old port is closed by the supervisor and by its keeper (which holds every
    listening socket for crash recovery): a client there is refused, not left
    waiting in a backlog nobody reads.  Still so after a SIGKILL of the
    supervisor, when the keeper hands back what it holds."""
    old, new = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    marker = sup.marker("svc")

    def config(address: str) -> dict[str, Any]:
        return {"services": {"svc": py_service(SERVE, marker, sockets=[{"address": address, "name": "tcp"}])}}

    sup.start(config(old))
    first = wait_until(lambda: (s := sup.rstatus("svc"))["state"] == "running" and s["pid"], 10, "svc to run")
    assert ask(old) == (first, "tcp")

    sup.write_config(config(new))
    sup.herd("reload", "root", check=0)
    sup.herd("restart", "svc", check=0)
    second = wait_until(lambda: (s := sup.rstatus("svc"))["state"] == "running" and s["pid"] != first
                        and s["pid"], 10, "svc to run again")
    assert ask(new) == (second, "tcp")
    assert refused(old), "the old port still accepts connections"

    crash(sup)
    restart(sup)
    assert wait_until(lambda: (s := sup.rstatus("svc"))["state"] == "running" and s["pid"], 10,
                      "svc adopted") == second
    assert ask(new) == (second, "tcp")
    assert refused(old), "the old port accepts connections after crash recovery"
