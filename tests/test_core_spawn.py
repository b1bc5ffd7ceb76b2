"""Issue 19: a spawn is a vfork+exec of a stub that the supervisor moves into
the service's cgroup and releases (supervisor/_held.py), never a fork of the
daemon; what the command sees is what a direct exec would give it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from helpers import PY_PROBE, REPO, Supervisor, base_env, find_pids, need, py_service, sleeper, wait_until


def _minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    return int(data[data.rfind(")") + 2:].split()[7])


@pytest.mark.parametrize("keys", [{"resource-limits": {"core": 0}}, {"user": "nobody", "group": "nogroup"}],
                         ids=["limits", "user"])
def test_spawn_does_not_fork_the_supervisor(sup: Supervisor, keys: dict[str, Any]) -> None:
    """A fork leaves every page of the daemon copy-on-write: it then takes a
    fault on each page it writes (about 1400 per start and stop at 100
    services, measured); a vfork+exec leaves it none.  (In its cgroup, with
    resource limits, or as another user.)"""
    if "user" in keys:
        if os.geteuid() != 0:
            pytest.skip("needs root (to switch user)")
        if shutil.which("setpriv") is None:
            need("setpriv (util-linux)")
    services = {f"s{i}": sleeper(sup.marker(f"s{i}")) for i in range(100)}
    services["v"] = sleeper(sup.marker("v"), **{"auto-start": False, **keys})
    sup.start({"services": services})
    wait_until(lambda: all(st["state"] == "running" for n, st in sup.rstatus().items() if n != "v"), 60,
               "the 100 services to run")
    conn = sup.connect()
    for _ in range(3):  # warm-up
        assert conn.call("start", "v")["ok"] and conn.call("stop", "v")["ok"]
    before = _minor_faults(sup.proc.pid)
    rounds = 20
    for _ in range(rounds):
        assert conn.call("start", "v")["ok"] and conn.call("stop", "v")["ok"]
    per_round = (_minor_faults(sup.proc.pid) - before) / rounds
    assert per_round < 300, f"{per_round:.0f} page faults in the daemon per start and stop: does it fork?"


def test_environment_kept_exactly(sup: Supervisor) -> None:
    """The stub is a shell, which drops names that are not shell names and
    sets PWD: the command sees neither change."""
    env = {"FOO": "bar", "A-B": "dash", "1X": "digit"}
    sup.start({"services": {
        name: py_service(PY_PROBE, sup.marker(name), environment=e, **{"clear-environment": True,
                                                                      "resource-limits": {"core": 0}})
        for name, e in [("odd", env), ("pwd", {"FOO": "bar", "PWD": "/nowhere"}), ("plain", {"FOO": "bar"})]
    }})
    assert sup.probe("odd")["env"] == env
    assert sup.probe("pwd")["env"] == {"FOO": "bar", "PWD": "/nowhere"}
    assert sup.probe("plain")["env"] == {"FOO": "bar"}


def test_missing_command_fails_the_start(sup: Supervisor) -> None:
    sup.start({"services": {"gone": {"command": ["/nonexistent/prog"], "auto-start": False}}})
    rep = sup.request({"action": "start", "service": "gone"})
    assert not rep["ok"] and "command not found: /nonexistent/prog" in json.dumps(rep), rep


#: A supervisor that starts a held child and is SIGKILLed before it releases it.
_DIES_HOLDING = textwrap.dedent("""
    import os, signal, subprocess, sys
    from supervisor import _held
    marker = sys.argv[1]
    r, w = os.pipe2(os.O_CLOEXEC)
    argv = _held.stub_argv(["touch", marker], os.environ, stdin_is_stdout=False)
    child = subprocess.Popen(argv, stdin=r, start_new_session=True)
    print(child.pid, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_child_of_a_dead_supervisor_never_runs(tmp_path: Path) -> None:
    """The supervisor dies while its child waits in the stub (not yet in its
    cgroup): the stub exits, the command never runs."""
    marker = tmp_path / "ran"
    proc = subprocess.run([sys.executable, "-c", _DIES_HOLDING, str(marker)], env=base_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    pid = int(proc.stdout)
    wait_until(lambda: not os.path.exists(f"/proc/{pid}") or _state(pid) == "Z", 10, "the held stub to exit")
    assert not marker.exists(), "the command ran although nobody released it"
    assert not find_pids(str(marker))


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rfind(")") + 2:].split()[0]
