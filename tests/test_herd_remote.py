"""``herd --host [USER@]HOST[:SOCKET]``: a remote supervisor through a real sshd.

A private sshd (tests/sshd.py) on localhost, key authentication; ``herd``
finds its aliases through ``$HERD_SSH_CONFIG``.  The "remote" supervisors are
the test's own daemons, reached over ssh as root.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from helpers import PY_SLEEP, Supervisor, base_env, py_service, wait_until
from sshd import SSHServer


def herd(sshd: SSHServer | None, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = base_env()
    if sshd is not None:
        env["HERD_SSH_CONFIG"] = str(sshd.config)
    return subprocess.run(
        [sys.executable, "-m", "herd", *args], env=env, capture_output=True, text=True,
        timeout=timeout, stdin=subprocess.DEVNULL,
    )


def two_services(sup: Supervisor) -> dict[str, Any]:
    return {
        "services": {
            "web": py_service(PY_SLEEP, sup.marker("web")),
            "db": py_service(PY_SLEEP, sup.marker("db")),
            "off": py_service(PY_SLEEP, sup.marker("off"), **{"auto-start": False}),
        }
    }


def started(sup: Supervisor, config: dict[str, Any]) -> Supervisor:
    sup.start(config)
    wait_until(lambda: all(s["state"] == "running" for n, s in sup.status().items() if n != "off"),
               10, "web and db running")
    return sup


def test_json_status_through_ssh_is_the_local_one(sup: Supervisor, sshd: SSHServer) -> None:
    started(sup, two_services(sup))
    local = herd(None, "-s", str(sup.socket), "--json", "status")
    remote = herd(sshd, "-s", str(sup.socket), "--json", "--host", "localhost", "status")
    assert remote.returncode == 0, remote.stderr
    assert json.loads(remote.stdout) == json.loads(local.stdout)
    # The socket may be named in the host string, the user too; the text is the local text.
    local = herd(None, "-s", str(sup.socket), "status")
    remote = herd(sshd, "status", f"--host=root@localhost:{sup.socket}")
    assert remote.returncode == 0, remote.stderr
    assert remote.stdout == local.stdout
    assert "Started:" in remote.stdout and "web" in remote.stdout


def bridges() -> list[psutil.Process]:
    """The remote ends (herd's bridge under sshd) still alive."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["status"] != psutil.STATUS_ZOMBIE and "herd-bridge" in " ".join(p.info["cmdline"] or []):
            found.append(p)
    return found


def test_follow_through_ssh_and_nothing_left_behind(sup: Supervisor, sshd: SSHServer) -> None:
    started(sup, two_services(sup))
    env = base_env()
    env["HERD_SSH_CONFIG"] = str(sshd.config)
    proc = subprocess.Popen([sys.executable, "-m", "herd", "--json", "--host", f"alpha:{sup.status_socket}", "events"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    buf = b""

    def line(timeout: float = 30.0) -> dict[str, Any]:
        nonlocal buf
        deadline = time.monotonic() + timeout
        while b"\n" not in buf:
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"no line from herd events within {timeout} s (so far {buf!r})"
            chunk = os.read(proc.stdout.fileno(), 65536)
            assert chunk, f"herd events ended: {proc.stderr.read() if proc.stderr else ''}"
            buf += chunk
        first, buf = buf.split(b"\n", 1)
        return json.loads(first)

    try:
        assert line()["subscribed"] is True  # the subscription is in place
        sup.herd("restart", "web", check=True)
        seen: list[dict[str, Any]] = []
        while not any(e.get("service") == "web" and e.get("to") == "running" for e in seen):
            seen.append(line())
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()
    assert [e["to"] for e in seen if e.get("service") == "web"][-2:] == ["starting", "running"]
    # herd's ssh and the remote bridge end with herd.
    wait_until(lambda: not bridges(), 15, "no bridge left after herd exits")
    for args in (["status"], ["restart", "web"]):
        cp = herd(sshd, "--host", f"alpha:{sup.socket}", *args)
        assert cp.returncode == 0, cp.stderr
    wait_until(lambda: not bridges(), 15, "no bridge left after herd exits")
    # Following several hosts at once is refused.
    cp = herd(sshd, "events", "--host", f"alpha:{sup.socket}", "--host", f"beta:{sup.socket}")
    assert cp.returncode == 2 and "one --host" in cp.stderr


def test_actions_through_ssh(sup: Supervisor, sshd: SSHServer) -> None:
    started(sup, two_services(sup))
    before = sup.status("web")["pid"]
    cp = herd(sshd, "--host", f"alpha:{sup.socket}", "restart", "web")
    assert cp.returncode == 0, cp.stderr
    after = sup.status("web")
    assert after["state"] == "running" and after["pid"] != before
    # Errors keep their exit status across ssh.
    cp = herd(sshd, "--host", f"alpha:{sup.socket}", "start", "nonesuch")
    assert cp.returncode == 2 and "nonesuch" in cp.stderr
    # The read-only socket refuses writes there as here.
    cp = herd(sshd, "--host", f"alpha:{sup.status_socket}", "stop", "web")
    assert cp.returncode == 1 and "read-only" in cp.stderr.lower()
    assert sup.status("web")["state"] == "running"


def test_two_hosts_one_section_each(make_sup: Callable[[], Supervisor], sshd: SSHServer) -> None:
    a, b = make_sup(), make_sup()
    started(a, {"services": {"alpha-svc": py_service(PY_SLEEP, a.marker("x"))}})
    started(b, {"services": {"beta-svc": py_service(PY_SLEEP, b.marker("y"))}})
    hosts = ["--host", f"alpha:{a.socket}", "--host", f"beta:{b.socket}"]
    cp = herd(sshd, "status", *hosts)
    assert cp.returncode == 0, cp.stderr
    text = cp.stdout
    assert text.index(f"Host alpha:{a.socket}:") < text.index("alpha-svc") < text.index(f"Host beta:{b.socket}:")
    assert text.index(f"Host beta:{b.socket}:") < text.index("beta-svc")
    local_b = herd(None, "-s", str(b.socket), "status").stdout
    assert text.endswith(local_b)  # the same format as a local herd, section by section

    cp = herd(sshd, "--json", "status", *hosts)
    assert cp.returncode == 0, cp.stderr
    objs = [json.loads(line) for line in cp.stdout.splitlines()]
    assert [o["host"] for o in objs] == [f"alpha:{a.socket}", f"beta:{b.socket}"]
    assert [s["name"] for s in objs[0]["result"]["services"]] == ["alpha-svc"]
    assert objs[1]["result"] == json.loads(herd(None, "-s", str(b.socket), "--json", "status").stdout)


def test_unreachable_host_is_named_and_the_others_shown(sup: Supervisor, sshd: SSHServer) -> None:
    started(sup, two_services(sup))
    cp = herd(sshd, "status", "--host", f"dead:{sup.socket}", "--host", f"alpha:{sup.socket}")
    assert cp.returncode == 3
    assert f"herd: error: dead:{sup.socket}: ssh failed:" in cp.stderr
    assert "web" in cp.stdout.split(f"Host alpha:{sup.socket}:")[1]
    cp = herd(sshd, "--json", "status", "--host", f"dead:{sup.socket}", "--host", f"alpha:{sup.socket}")
    objs = [json.loads(line) for line in cp.stdout.splitlines()]
    assert objs[0]["host"] == f"dead:{sup.socket}" and objs[0]["error"]["code"] == "unreachable"
    assert "result" in objs[1]
    # One unreachable host alone: exit 3 and its name.
    cp = herd(sshd, "status", "--host", "dead")
    assert cp.returncode == 3 and "dead: ssh failed:" in cp.stderr


def test_host_whose_supervisor_is_down(sup: Supervisor, sshd: SSHServer, tmp_path: Path) -> None:
    started(sup, two_services(sup))
    gone = tmp_path / "no-such.sock"
    cp = herd(sshd, "status", "--host", f"alpha:{gone}", "--host", f"beta:{sup.socket}")
    assert cp.returncode == 3
    assert f"alpha:{gone}: no supervisor at {gone}" in cp.stderr
    assert "is the supervisor running?" in cp.stderr
    assert "web" in cp.stdout
    # Something else listens there: it says so, naming the host and the socket.
    impostor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    impostor.bind(str(tmp_path / "impostor.sock"))
    impostor.listen()

    def answer() -> None:
        conn, _ = impostor.accept()
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        conn.close()

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    cp = herd(sshd, "status", "--host", f"alpha:{tmp_path}/impostor.sock")
    thread.join(30)
    impostor.close()
    assert cp.returncode == 3
    assert cp.stderr == f"herd: error: alpha:{tmp_path}/impostor.sock does not speak the supervisor protocol\n"
    sup.stop()
    cp = herd(sshd, "-s", str(sup.socket), "status", "--host", "beta")
    assert cp.returncode == 3 and f"beta: no supervisor at {sup.socket}" in cp.stderr


@pytest.mark.parametrize("host", [
    "-oProxyCommand=touch {canary}",
    "-F{canary}",
    "--",
    "",
    "alpha;touch {canary}",
    "$(touch {canary})",
    "alpha touch",
    "alpha\n-oProxyCommand=x",
    "-lroot@alpha",
    "alpha:relative.sock",
    "root;x@alpha",
    "[::1",
    "%h",
])
def test_hostile_host_strings_are_refused(host: str, tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    value = host.format(canary=canary)
    for args in (["--host", value, "status"], [f"--host={value}", "status"], ["status", "--host", value]):
        cp = herd(None, *args)
        assert cp.returncode == 2, (args, cp)
        assert "herd: error:" in cp.stderr and ("host" in cp.stderr or "option" in cp.stderr)
    assert not canary.exists()


@pytest.mark.parametrize("host,shown", [
    ("root@127.0.0.1:/run/x.sock", "root@127.0.0.1:/run/x.sock"),
    ("[::1]:/run/x.sock", "[::1]:/run/x.sock"),
    ("user_1@host-a.example.org", "user_1@host-a.example.org"),
    ("127.0.0.1", "127.0.0.1"),
])
def test_valid_host_forms_reach_ssh(host: str, shown: str, tmp_path: Path) -> None:
    # Every host is sent to port 1, where nothing listens: ssh runs and fails, and herd names the host.
    config = tmp_path / "ssh_config"
    config.write_text("Host *\n  Port 1\n  HostName 127.0.0.1\n  ConnectTimeout 5\n")
    env = base_env()
    env["HERD_SSH_CONFIG"] = str(config)
    cp = subprocess.run([sys.executable, "-m", "herd", "--host", host, "status"], env=env,
                        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert cp.returncode == 3, cp
    assert cp.stderr.startswith(f"herd: error: {shown}: ssh failed:"), cp.stderr
