"""`status-socket-group` (issue 17): the read-only socket is 0600 by default,
and a monitoring group may be let in; tested with a real unprivileged user
(`nobody`) in that group and not in it."""

from __future__ import annotations

import grp
import json
import os
import stat
import subprocess
from typing import Any

import pytest

from helpers import REPO, Supervisor, nobody_python, sleeper

NOBODY = 65534

#: As `nobody`: connect to argv[1], ask for status then a start; print the replies.
_CLIENT = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(20)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print(json.dumps({"connect": exc.errno}))
    sys.exit(0)
f = s.makefile("rwb")
f.readline()  # hello
for i, action in enumerate(("status", "start")):
    f.write(json.dumps({"id": i, "action": action, "service": None if action == "status" else "a"}).encode() + b"\n")
    f.flush()
    print(f.readline().decode().strip(), flush=True)
"""


def _as_nobody(sup: Supervisor, path: os.PathLike[str], groups: list[int]) -> list[dict[str, Any]]:
    cp = subprocess.run([nobody_python(), "-c", _CLIENT, str(path)], user=NOBODY, group=NOBODY,
                        extra_groups=groups, capture_output=True, text=True, timeout=60, env={})
    assert cp.returncode == 0, cp.stderr
    return [json.loads(line) for line in cp.stdout.splitlines()]


def _herd_as_nobody(sup: Supervisor, groups: list[int], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([nobody_python(), "-m", "herd", "-s", str(sup.status_socket), *args],
                          user=NOBODY, group=NOBODY, extra_groups=groups, capture_output=True, text=True,
                          timeout=60, env={"PYTHONPATH": str(REPO), "NO_COLOR": "1"})


@pytest.fixture
def root_only() -> None:
    if os.getuid() != 0:
        pytest.skip("needs root: the daemon runs as root and the clients as nobody")


def test_the_status_socket_is_closed_to_others_by_default(sup: Supervisor, root_only: None) -> None:
    os.chmod(sup.sockdir, 0o755)  # only the socket's own mode keeps them out
    sup.start({"services": {"a": sleeper(sup.marker("a"), **{"auto-start": False})}})
    for path in (sup.status_socket, sup.socket):
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0, (path, oct(st.st_mode))
    adm = grp.getgrnam("adm").gr_gid
    for groups in ([], [adm]):
        assert _as_nobody(sup, sup.status_socket, groups) == [{"connect": 13}]  # EACCES
    cp = _herd_as_nobody(sup, [], "status")
    assert cp.returncode == 3 and "Permission denied" in cp.stderr, (cp.returncode, cp.stderr)


def test_status_socket_group_lets_its_members_read_and_nothing_more(sup: Supervisor, root_only: None) -> None:
    os.chmod(sup.sockdir, 0o755)
    adm = grp.getgrnam("adm").gr_gid
    sup.start({"supervisor": {"status-socket-group": "adm"},
               "services": {"a": sleeper(sup.marker("a"), **{"auto-start": False})}})
    st = os.stat(sup.status_socket)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == adm, oct(st.st_mode)
    rw = os.stat(sup.socket)
    assert stat.S_IMODE(rw.st_mode) == 0o600, "the read-write socket stays closed to the group"

    status, start = _as_nobody(sup, sup.status_socket, [adm])  # a member of adm
    assert status["ok"] is True and [s["name"] for s in status["result"]["services"]] == ["a"], status
    assert start["ok"] is False and start["error"]["code"] == "read-only", start
    assert sup.rstatus("a")["state"] == "stopped"
    cp = _herd_as_nobody(sup, [adm], "status")
    assert cp.returncode == 0 and "Stopped:" in cp.stdout and "a" in cp.stdout, (cp.stdout, cp.stderr)

    assert _as_nobody(sup, sup.socket, [adm]) == [{"connect": 13}]  # not the read-write one
    assert _as_nobody(sup, sup.status_socket, []) == [{"connect": 13}]  # nobody, not in adm


def test_an_unknown_status_socket_group_stops_the_start_naming_it(sup: Supervisor) -> None:
    sup.spawn({"supervisor": {"status-socket-group": "no-such-group-17"},
               "services": {"a": sleeper(sup.marker("a"))}}).close()
    assert sup.wait_exit(20) == 1
    assert "no-such-group-17" in sup.stderr_tail() and "status-socket-group" in sup.stderr_tail()
    assert not sup.status_socket.exists()
