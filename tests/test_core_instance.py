"""Issue 15, item 4: one supervisor per socket directory, and a notify socket
that every service user reaches and no other user can plant or replace.

Seen from outside: a second daemon's exit status and stderr, which socket
files exist, and whether notify services (as root and as `nobody`) become
ready -- the daemon tells each one its ``NOTIFY_SOCKET``.
"""

from __future__ import annotations

import os
import pwd
import signal
import stat
import subprocess
import sys
from pathlib import Path


from helpers import REPO, Supervisor, base_env, py_service, nobody_python, wait_until

#: Sends READY=1 to $NOTIFY_SOCKET at once (after printing it), then sleeps.
NOTIFY_NOW = r'''
import os, socket, sys, time
path = os.environ["NOTIFY_SOCKET"]
print("NOTIFY_SOCKET=" + path, flush=True)
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(b"READY=1", path)
time.sleep(1e6)
'''


def notify_service(sup: Supervisor, name: str, **keys: object) -> dict[str, object]:
    return py_service(NOTIFY_NOW, sup.marker(name), ready={"type": "notify"},
                      **{"auto-start": False, "start-timeout": 10, **keys})


def second_supervisor(sup: Supervisor, tmp: Path) -> subprocess.Popen[str]:
    """Another daemon on the same socket directory, under other socket names."""
    conf = tmp / "second.toml"
    conf.write_text("")
    return subprocess.Popen(
        [sys.executable, "-m", "supervisor", "-c", str(conf),
         "-s", str(sup.sockdir / "second.sock"), "--status-socket", str(sup.sockdir / "second-ro.sock"),
         "--state-dir", str(tmp / "second-state"), "--log-dir", str(tmp / "second-log")],
        cwd=REPO, env={**base_env(), "NOTIFY_SOCKET": ""}, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def outcome(proc: subprocess.Popen[str], timeout: float = 20.0) -> tuple[int | None, str]:
    """(exit status, stderr); a daemon still running after `timeout` gets SIGTERM, status None."""
    try:
        _, err = proc.communicate(timeout=timeout)
        return proc.returncode, err
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        return None, err


def assert_refused(sup: Supervisor, tmp: Path) -> None:
    assert sup.proc is not None
    code, err = outcome(second_supervisor(sup, tmp))
    assert code is not None, f"a second supervisor started on {sup.sockdir}\nstderr: {err}"
    assert code != 0
    assert f"another supervisor (PID {sup.proc.pid}) already runs on {sup.sockdir}" in err, err
    # It touched no socket before it gave up.
    assert not (sup.sockdir / "second.sock").exists()
    assert not (sup.sockdir / "second-ro.sock").exists()


def test_a_second_supervisor_on_the_same_socket_directory_refuses_to_start(
        sup: Supervisor, tmp_path: Path) -> None:
    sup.start({"services": {"first": notify_service(sup, "first"),
                            "second": notify_service(sup, "second")}})
    sup.herd("start", "first", check=True)

    assert_refused(sup, tmp_path)

    # The first supervisor's notify socket is intact: a notify service still becomes ready.
    sup.herd("start", "second", check=True)
    assert sup.status("second")["state"] == "running"
    assert sup.herd("ping").returncode == 0


def test_the_lock_is_kept_across_a_reexec(sup: Supervisor, tmp_path: Path) -> None:
    sup.start({"services": {"late": notify_service(sup, "late")}})
    assert sup.proc is not None
    before = sup.herd("--json", "ping", check=True)
    sup.herd("reexec", "root", check=True)
    wait_until(lambda: '"resumed after re-exec"' in sup.stderr_path.read_text(errors="replace"), 30,
               "the re-exec to complete")
    assert sup.herd("ping").returncode == 0, before.stdout

    assert_refused(sup, tmp_path)
    # The notify socket handed over still works for a service started after the re-exec.
    sup.herd("start", "late", check=True)
    assert sup.status("late")["state"] == "running"


def test_a_planted_notify_socket_in_a_sticky_directory_does_not_stop_the_daemon(sup: Supervisor) -> None:
    nobody = pwd.getpwnam("nobody")
    os.chmod(sup.sockdir, 0o1777)  # like /tmp: anyone may create files here
    planted = sup.sockdir / "notify.sock"
    planted.write_text("not a socket\n")
    os.chown(planted, nobody.pw_uid, nobody.pw_gid)

    sup.start({"services": {"svc": notify_service(sup, "svc")}})
    sup.herd("start", "svc", check=True)
    assert sup.status("svc")["state"] == "running"
    _, _, line = sup.wait_log("svc", lambda t: t.startswith("NOTIFY_SOCKET="))
    notify = Path(line.split("=", 1)[1])
    assert notify.parent != sup.sockdir, "the notify socket is in a directory others can write"
    assert planted.read_text() == "not a socket\n"


def test_the_notify_socket_is_reachable_by_other_users_and_only_we_write_its_directory(
        sup: Supervisor) -> None:
    python = nobody_python()
    assert stat.S_IMODE(os.stat(sup.sockdir).st_mode) == 0o700  # the control sockets are private
    service = notify_service(sup, "unprivileged", user="nobody")
    service["command"] = [python, *service["command"][1:]]  # type: ignore[index]
    sup.start({"services": {"unprivileged": service}})

    sup.herd("start", "unprivileged", check=True)
    assert sup.status("unprivileged")["state"] == "running"
    _, _, line = sup.wait_log("unprivileged", lambda t: t.startswith("NOTIFY_SOCKET="))
    notify = Path(line.split("=", 1)[1])
    directory = os.lstat(notify.parent)
    assert stat.S_ISDIR(directory.st_mode) and directory.st_uid == os.getuid()
    assert stat.S_IMODE(directory.st_mode) & 0o022 == 0, oct(directory.st_mode)
    assert stat.S_ISSOCK(os.lstat(notify).st_mode)
