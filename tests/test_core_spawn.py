"""Issue 19: a spawn never forks the daemon.  Into a cgroup the process is
born there by the helper (supervisor/_cgspawn.c), or, without it
(SUPERVISOR_CGSPAWN=0 here), is a vfork+exec'd stub that the supervisor
moves into the cgroup and releases (supervisor/_held.py); what the command
sees is what a direct exec would give it.  Each test runs both ways."""

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
from test_core_exec import needs_root  # the project's one marker for "switches user and group"
from test_core_stop import test_stop_racing_start_leaves_no_stray_process as _racing


HELPER = REPO / "supervisor" / "_cgspawn"


@pytest.fixture
def way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, containment: str) -> str:
    """How a process gets into its cgroup: born there by the helper, or moved
    (parametrized with `containment` in conftest.py: without cgroups, moved only)."""
    if request.param == "born":
        if not os.access(HELPER, os.X_OK):
            need("supervisor/_cgspawn (contrib/dev compiles it)")
    else:
        monkeypatch.setenv("SUPERVISOR_CGSPAWN", "0")  # the daemon inherits it
    return str(request.param)


def _minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    return int(data[data.rfind(")") + 2:].split()[7])


@pytest.mark.parametrize("keys", [{"resource-limits": {"core": 0}},
                                  pytest.param({"user": "nobody", "group": "nogroup"}, marks=needs_root)],
                         ids=["limits", "user"])
def test_spawn_does_not_fork_the_supervisor(sup: Supervisor, way: str, keys: dict[str, Any]) -> None:
    """A fork leaves every page of the daemon copy-on-write: it then takes a
    fault on each page it writes (about 1400 per start and stop at 100
    services, measured); a vfork+exec leaves it none.  (In its cgroup, with
    resource limits, or as another user.)"""
    if "user" in keys:
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


def test_environment_kept_exactly(sup: Supervisor, way: str) -> None:
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


def test_missing_command_fails_the_start(sup: Supervisor, way: str) -> None:
    sup.start({"services": {"gone": {"command": ["/nonexistent/prog"], "auto-start": False},
                            "bare": {"command": ["no-such-program-here"], "auto-start": False}}})
    for name, command in (("gone", "/nonexistent/prog"), ("bare", "no-such-program-here")):
        rep = sup.request({"action": "start", "service": name})
        assert not rep["ok"] and f"command not found: {command}" in json.dumps(rep), rep


#: Prints the cgroup it runs in, first thing, then sleeps.
_WHERE = "import sys, time; print('CGROUP ' + open('/proc/self/cgroup').read().split('::')[-1].strip(), flush=True); time.sleep(1e6)"


@pytest.mark.cgroup_only
def test_command_runs_only_in_its_cgroup(sup: Supervisor, way: str) -> None:
    sup.start({"services": {"where": py_service(_WHERE, sup.marker("where"), **{"resource-limits": {"core": 0}})}})
    line = sup.wait_log("where", lambda text: text.startswith("CGROUP "))[2]
    assert line.endswith("/where.service"), line
    assert sup.rstatus("where")["state"] == "running"


def test_stop_racing_start_leaves_no_stray_process(sup: Supervisor, way: str) -> None:
    """tests/test_core_stop.py's, each way."""
    _racing(sup)


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
