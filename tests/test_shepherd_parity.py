"""Issue 16: Shepherd's own scenarios, black-box -- startup failure, one-shots.

(Shepherd's tests/startup-failure.sh and tests/one-shot.sh, translated: the
real daemon and the real herd; what a service ran is counted in a file it
appends to.)
"""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from helpers import (
    REPO,
    SLEEP,
    Supervisor,
    cgroup_of,
    check_config,
    crash,
    find_pids,
    make_gate,
    nobody_python,
    open_gate,
    pid_alive,
    py_service,
    read_records,
    reexec,
    restart,
    sleeper,
    wait_running,
    wait_until,
)
from test_io_sockets import SERVE, ask, free_port

#: argv: FLAG MARKER.  Exits 1 unless FLAG exists; then READY=1 and sleeps.
FAILS_UNTIL_FLAG = r"""
import os, socket, sys, time
if not os.path.exists(sys.argv[1]):
    sys.exit(1)
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(b"READY=1", os.environ["NOTIFY_SOCKET"])
time.sleep(1e6)
"""

#: argv: FILE.  Appends one line to FILE (a one-shot's run, counted).
APPEND = "import sys; open(sys.argv[1], 'a').write('ran\\n')"


def _section(summary: str, header: str) -> list[str]:
    """The names listed under `header` in `herd status`'s summary."""
    names: list[str] = []
    inside = False
    for line in summary.splitlines():
        if not line.startswith(" "):
            inside = line == header
        elif inside:
            names.append(line.split()[-1])
    return names


def test_a_good_start_clears_the_startup_failure(sup: Supervisor, tmp_path: Path) -> None:
    flag = tmp_path / "flag"
    sup.start({"services": {"flaky": py_service(FAILS_UNTIL_FLAG, str(flag), sup.marker("flaky"),
                                                ready={"type": "notify"}, respawn=False,
                                                **{"auto-start": False})}})
    sup.herd("start", "flaky", check=1)
    assert _section(sup.herd("status", check=True).stdout, "Failed to start:") == ["flaky"]
    flag.touch()
    sup.herd("start", "flaky", check=True)
    sup.herd("stop", "flaky", check=True)
    summary = sup.herd("status", check=True).stdout
    assert _section(summary, "Stopped:") == ["flaky"], summary
    assert "Failed to start:" not in summary, summary
    assert "failing" not in sup.herd("status", "flaky", check=True).stdout


def test_one_shots_run_on_explicit_starts_only(sup: Supervisor, tmp_path: Path) -> None:
    runs = tmp_path / "runs"

    def count() -> int:
        return len(runs.read_text().splitlines()) if runs.exists() else 0

    sup.start({"services": {
        "once": py_service(APPEND, str(runs), **{"one-shot": True}),
        "dep": sleeper(sup.marker("dep"), requires=["once"]),
        "top": sleeper(sup.marker("top"), requires=["dep", "once"], **{"auto-start": False}),
    }})
    wait_running(sup, ["dep"])
    assert count() == 1  # boot: once, for dep
    assert _section(sup.herd("status", check=True).stdout, "One-shot:") == ["once"]
    # a dependent started again by hand runs its one-shot again ...
    sup.herd("stop", "dep", check=True)
    assert count() == 1
    sup.herd("start", "dep", check=True)
    assert count() == 2
    # ... not when the dependent already runs
    assert "already running" in sup.herd("start", "dep", check=True).stdout
    assert count() == 2
    # one request, two dependents requiring it: one run satisfies both
    sup.herd("stop", "dep", check=True)
    out = sup.herd("start", "top", check=True).stdout
    assert count() == 3, out
    assert out.count("Service once has run (one-shot).") == 1, out
    # naming the one-shot runs it
    sup.herd("start", "once", check=True)
    assert count() == 4
    status = sup.herd("status", "once", check=True).stdout
    assert "(one-shot)" in status and "Will be respawned." not in status, status
    # a re-exec and crash recovery never run it
    reexec(sup)
    wait_running(sup, ["dep", "top"])
    assert count() == 4
    crash(sup)
    restart(sup)
    wait_running(sup, ["dep"])
    assert count() == 4
    assert _section(sup.herd("status", check=True).stdout, "One-shot:") == ["once"]


# --------------------------------------------------------------------------
# Socket services (Shepherd's tests/inetd.sh and systemd.sh, in part)


def _refused(where: str) -> bool:
    """True when a connect to `where` (a path or host:port) is refused outright."""
    if where.startswith("/"):
        s, target = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), where
    else:
        host, port = where.rsplit(":", 1)
        s, target = socket.socket(socket.AF_INET, socket.SOCK_STREAM), (host, int(port))
    s.settimeout(5)
    try:
        s.connect(target)
    except (ConnectionRefusedError, FileNotFoundError):
        return True
    finally:
        s.close()
    return False


def test_a_stopped_or_disabled_lazy_service_refuses_connections(sup: Supervisor) -> None:
    path = str(sup.sockdir / "lazy.sock")
    tcp = f"127.0.0.1:{free_port()}"
    sup.start({"services": {"lazy": py_service(SERVE, sup.marker("lazy"), activation="lazy", sockets=[
        {"path": path, "name": "main"}, {"address": tcp, "name": "tcp"}])}})
    # disabled: refused; enabled again: a connection starts it
    sup.herd("disable", "lazy", check=True)
    assert _refused(path) and _refused(tcp)
    sup.herd("enable", "lazy", check=True)
    pid, _ = ask(path)
    # stopped by the operator: refused, until it is started again
    sup.herd("stop", "lazy", check=True)
    assert _refused(path) and _refused(tcp)
    assert sup.status("lazy")["state"] == "stopped"
    sup.herd("start", "lazy", check=True)
    new_pid, _ = ask(tcp)
    assert new_pid != pid
    assert ask(path)[0] == new_pid


def test_duplicate_socket_paths_are_a_check_error(tmp_path: Path) -> None:
    sock = tmp_path / "x.sock"
    cp = check_config(tmp_path, f"""
[services.first]
command = ["/bin/true"]
sockets = [{{ path = "{sock}" }}]
[services.second]
command = ["/bin/true"]
sockets = [{{ address = "127.0.0.1:1811" }}, {{ path = "{tmp_path}/./x.sock" }}]
""")
    assert cp.returncode == 1, cp
    assert f"services.second.sockets[1].path: {tmp_path}/./x.sock is also a socket of service first" in cp.stdout, cp


def _open_files(pid: int) -> set[str]:
    return {f.path for f in psutil.Process(pid).open_files()}


def test_a_stopped_services_log_file_is_closed(sup: Supervisor) -> None:
    code = "import sys, time; print('hello', flush=True); time.sleep(1e6)"
    sup.start({"services": {"talker": py_service(code, sup.marker("talker"))}})
    sup.wait_log("talker", lambda text: text == "hello")
    assert sup.proc is not None
    log = str(sup.log_file("talker"))
    assert log in _open_files(sup.proc.pid)
    sup.herd("stop", "talker", check=True)
    assert log not in _open_files(sup.proc.pid)
    sup.herd("start", "talker", check=True)
    wait_until(lambda: len([t for _, _, t in sup.log_lines("talker") if t == "hello"]) == 2, 15,
               "the second run's output in the log file")


# --------------------------------------------------------------------------
# Custom actions (Shepherd's tests/custom-actions.sh)


def test_configured_custom_actions(sup: Supervisor) -> None:
    service = sleeper(sup.marker("web"), user="nobody", group="nogroup")
    service["actions"] = {
        "whoami": {"command": ["/usr/bin/id", "-u"], "documentation": "Print the service's uid.",
                   "read-only": True},
        "where": {"command": ["/bin/cat", "/proc/self/cgroup"]},
        "echo": {"command": ["/bin/echo", "said:"], "read-only": True},
        "fail": {"command": ["/bin/sh", "-c", "echo broken >&2; exit 3"]},
    }
    sup.start({"services": {"web": service}})
    pid = wait_running(sup, ["web"])["web"]
    assert sup.herd("whoami", "web", check=True).stdout == f"{pwd.getpwnam('nobody').pw_uid}\n"
    # the read-only socket runs read-only actions only
    assert sup.herd("whoami", "web", check=True, socket_path=sup.status_socket).stdout.strip().isdigit()
    cp = sup.herd("where", "web", check=1, socket_path=sup.status_socket)
    assert "read-only" in cp.stderr, cp.stderr
    # in the service's cgroup
    assert f"0::{cgroup_of(pid)}" in sup.herd("where", "web", check=True).stdout.splitlines()
    # arguments are appended, never through a shell
    assert sup.herd("echo", "web", "a b", "$HOME;", check=True).stdout == "said: a b $HOME;\n"
    cp = sup.herd("fail", "web", check=1)
    assert cp.stdout == "broken\n" and "exited with code 3" in cp.stderr, cp
    # output also goes to the service's log
    sup.wait_log("web", lambda text: text == "fail: broken")
    doc = sup.herd("doc", "web", check=True).stdout
    assert "  whoami: Print the service's uid." in doc and "  where" in doc, doc
    assert "whoami" in sup.status("web")["actions"]
    # a reload that changes an action's command takes effect
    service["actions"]["echo"]["command"] = ["/bin/echo", "now:"]
    sup.write_config({"services": {"web": service}})
    sup.herd("reload", "root", check=True)
    assert sup.herd("echo", "web", "x", check=True).stdout == "now: x\n"


def test_custom_action_configuration_errors(tmp_path: Path) -> None:
    cp = check_config(tmp_path, """
[services.a]
command = ["/bin/true"]
[services.a.actions.start]
command = ["/bin/true"]
[services.a.actions.ok]
command = ["/bin/true"]
read-olny = true
""")
    assert cp.returncode == 1, cp
    assert "services.a.actions.start: 'start' cannot name an action" in cp.stdout, cp.stdout
    assert "services.a.actions.ok.read-olny: unknown key (did you mean 'read-only'?)" in cp.stdout, cp.stdout


# --------------------------------------------------------------------------
# Transient services (Shepherd 1.0's tests/transient.sh; systemd-run)


def test_spawn_runs_a_transient_service(sup: Supervisor, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    sup.start({"services": {"web": sleeper(sup.marker("web"))}})
    code = "import os, sys; print('hello', flush=True); open(sys.argv[1]).read(); print('bye')"
    cp = sup.herd("spawn", "job", "--", sys.executable, "-c", code, str(make_gate(gate)), check=True)
    assert cp.stdout.startswith("Service job has been started (PID "), cp.stdout
    job = sup.status("job")
    assert job["state"] == "running" and job["respawn"] is False, job
    assert " + job" in sup.herd("status", check=True).stdout
    sup.wait_log("job", lambda text: text == "hello")
    # supervised in its own cgroup, under its own name
    assert cgroup_of(job["pid"]).endswith("/job.service")
    # a reload may not define a service under a running transient's name
    sup.write_config({"services": {"web": sleeper(sup.marker("web")), "job": sleeper(sup.marker("job"))}})
    cp = sup.herd("reload", "root", check=1)
    assert "services.job: a transient service (herd spawn) runs under this name" in cp.stderr, cp.stderr
    assert sup.status("job")["command"][0] == sys.executable
    open_gate(gate)
    wait_until(lambda: "job" not in sup.status(), 20, "the ended transient to leave status")
    assert "job" not in sup.herd("status", check=True).stdout
    log = sup.herd("log", "job", check=True).stdout
    assert "stdout: hello" in log and "stdout: bye" in log and "exited with code 0" in log, log
    assert any(text == "bye" for _, _, text in sup.log_lines("job"))
    # refused: an existing name, the read-only socket, no command
    assert "exists already" in sup.herd("spawn", "web", "--", "/bin/true", check=2).stderr
    cp = sup.herd("spawn", "x", "--", "/bin/true", check=1, socket_path=sup.status_socket)
    assert "read-only" in cp.stderr
    sup.herd("spawn", "x", check=2)


def test_spawn_runs_as_the_requesting_user(sup: Supervisor) -> None:
    python = nobody_python()
    sup.start({"services": {}})
    os.chmod(sup.sockdir, 0o711)
    os.chmod(sup.socket, 0o666)  # let nobody in (socket-group's job, in real life)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "NO_COLOR": "1"}
    cp = subprocess.run([python, "-m", "herd", "-s", str(sup.socket), "spawn", "who", "--", "/usr/bin/id", "-u"],
                        env=env, user="nobody", capture_output=True, text=True, timeout=60, cwd="/",
                        stdin=subprocess.DEVNULL)
    assert cp.returncode == 0, cp
    sup.wait_log("who", lambda text: text.isdigit())
    uids = [text for _, stream, text in sup.log_lines("who") if stream == "stdout"]
    assert uids == [str(pwd.getpwnam("nobody").pw_uid)], uids
    sup.herd("spawn", "root-job", "--", "/usr/bin/id", "-u", check=True)
    sup.wait_log("root-job", lambda text: text == "0")


@pytest.mark.parametrize("how", ["reexec", "crash"])
def test_a_transient_service_stays_supervised_across_a_reexec_or_a_crash(sup: Supervisor, tmp_path: Path,
                                                                          how: str) -> None:
    """`herd spawn`'s processes are taken back by the new image (re-exec) or
    the next supervisor (SIGKILL): still in status with their PID, their later
    output captured, their end seen, `herd stop` obeyed.  One that ended while
    no supervisor ran is simply gone."""
    sup.start({"services": {"web": sleeper(sup.marker("web"))}})
    code = "import sys; print('hello', flush=True); open(sys.argv[1]).read(); print('bye')"
    gates = {n: make_gate(tmp_path / n) for n in ("job", "brief")}
    for name in ("job", "other", "brief"):
        gate = gates.get(name, tmp_path / "never")
        if name == "other":
            gate = make_gate(gate)
        sup.herd("spawn", name, "--", sys.executable, "-c", code, str(gate), check=True)
        sup.wait_log(name, lambda text: text == "hello")
    pids = {name: sup.status(name)["pid"] for name in ("job", "other", "brief")}

    if how == "reexec":
        reexec(sup)
        open_gate(gates["brief"])  # ends under the new image
    else:
        crash(sup)
        open_gate(gates["brief"])  # ends while no supervisor runs
        wait_until(lambda: not pid_alive(pids["brief"]), 20, "brief to end")
        restart(sup)

    status = sup.status()
    assert status["job"]["state"] == "running" and status["job"]["pid"] == pids["job"], status["job"]
    assert status["other"]["state"] == "running" and status["other"]["pid"] == pids["other"]
    assert " + job" in sup.herd("status", check=True).stdout
    wait_until(lambda: "brief" not in sup.status(), 20, "the ended transient to leave status")

    open_gate(gates["job"])
    wait_until(lambda: "job" not in sup.status(), 20, "job to end and leave status")
    log = sup.herd("log", "job", check=True).stdout
    # (after a crash it is no child of the new supervisor: its exit status is not known)
    assert "stdout: bye" in log and ("exited with code 0" if how == "reexec" else "exited") in log, log

    sup.herd("stop", "other", check=True)
    assert not pid_alive(pids["other"])
    wait_until(lambda: "other" not in sup.status(), 20, "other to leave status")
    # (after a re-exec, the ended one's last lines are still there)
    if how == "reexec":
        assert "stdout: bye" in sup.herd("log", "brief", check=True).stdout
    # Ended transients leave the service records too: spawned names must not pile up there.
    assert sorted(read_records(sup.state_dir)) == ["web"]


def test_a_configured_service_does_not_adopt_a_transient_of_the_same_name(sup: Supervisor) -> None:
    """A transient runs as "job"; the supervisor is SIGKILLed and the
    configuration meanwhile defines a service "job": the next supervisor runs
    the configured command, and does not take the transient's process (or its
    record) for its own.  (A reload refuses such a name while the transient
    runs; a crash is the way around that.)"""
    sup.start({"services": {"web": sleeper(sup.marker("web"))}})
    sup.herd("spawn", "job", "--", SLEEP, "1000", check=True)
    transient = sup.status("job")["pid"]
    crash(sup)
    sup.write_config({"services": {"web": sleeper(sup.marker("web")), "job": sleeper(sup.marker("job"))}})
    restart(sup)
    job = wait_until(lambda: (s := sup.status("job"))["state"] == "running" and s, 20, "the configured job")
    assert job["pid"] != transient, job
    assert find_pids(sup.marker("job")) == {job["pid"]}
    adopted = [line for line in sup.stderr_path.read_text().splitlines()
               if "adopted a running service" in line and '"job"' in line]
    assert not adopted, adopted
    # it ran in the configured service's cgroup, which is its own now: stopped there
    wait_until(lambda: not pid_alive(transient), 20, "the transient's process stopped")


def test_a_transient_not_found_where_it_ran_is_forgotten(sup: Supervisor, tmp_path: Path) -> None:
    """After a SIGKILL of the supervisor, a transient's process was moved out
    of its cgroup: the next supervisor does not adopt it, and does not keep a
    stopped "job" either (the name is free for a new spawn)."""
    sup.start({"services": {"web": sleeper(sup.marker("web"))}})
    sup.herd("spawn", "job", "--", SLEEP, "1000", check=True)
    pid = sup.status("job")["pid"]
    crash(sup)
    elsewhere = Path("/sys/fs/cgroup/unified" + cgroup_of(pid)).parent.parent / f"svt-elsewhere-{os.getpid()}"
    elsewhere.mkdir()
    try:
        (elsewhere / "cgroup.procs").write_text(str(pid))
        restart(sup)
        wait_running(sup, ["web"])
        assert "job" not in sup.status()
        assert sup.herd("spawn", "job", "--", SLEEP, "1000", check=True).returncode == 0
        assert sup.status("job")["pid"] != pid
        assert pid_alive(pid)  # not ours any more: left alone
    finally:
        os.kill(pid, 9)
        wait_until(lambda: not pid_alive(pid), 10, "the moved process gone")
        elsewhere.rmdir()


# --------------------------------------------------------------------------
# inetd-style sockets (Shepherd's tests/inetd.sh; systemd's Accept=yes)

#: One instance per connection: answers "PID LINE", then waits for EOF.
INSTANCE = "import os, sys; line = sys.stdin.readline(); print(os.getpid(), line.strip(), flush=True); sys.stdin.read()"


def _talk(path: str, line: str) -> tuple[socket.socket, bytes]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(15)
    s.connect(path)
    data = b""
    try:
        s.sendall(line.encode() + b"\n")
        while not data.endswith(b"\n"):
            chunk = s.recv(100)
            if not chunk:
                break
            data += chunk
    except (ConnectionResetError, BrokenPipeError):  # closed at once by the supervisor
        pass
    return s, data


def test_accept_sockets_run_an_instance_per_connection(sup: Supervisor) -> None:
    path = str(sup.sockdir / "inetd.sock")
    sup.start({"services": {"echo": py_service(INSTANCE, sup.marker("echo"), sockets=[
        {"path": path, "accept": True, "max-connections": 2}])}})
    wait_until(lambda: sup.status("echo")["state"] == "running", 15, "echo to listen")
    c1, a1 = _talk(path, "one")
    c2, a2 = _talk(path, "two")
    pid1, pid2 = int(a1.split()[0]), int(a2.split()[0])
    assert a1.split()[1] == b"one" and a2.split()[1] == b"two" and pid1 != pid2
    assert sup.status("echo")["inetd"]["connections"] == 2
    # beyond max-connections: closed at once
    c3, a3 = _talk(path, "three")
    assert a3 == b""
    sup.wait_log("echo", lambda text: "max-connections" in text)
    # an instance that ends frees its slot
    c1.close()
    wait_until(lambda: sup.status("echo")["inetd"]["connections"] == 1, 15, "the first instance to end")
    c4, a4 = _talk(path, "four")
    assert a4.split()[1] == b"four"
    # stopping the service stops its instances
    sup.herd("stop", "echo", check=True)
    wait_until(lambda: not (pid_alive(pid2) or pid_alive(int(a4.split()[0]))), 15, "the instances to stop")
    for s in (c2, c3, c4):
        s.close()


def test_accept_socket_configuration_errors(tmp_path: Path) -> None:
    cp = check_config(tmp_path, """
[services.a]
command = ["/bin/cat"]
one-shot = true
sockets = [{ address = "127.0.0.1:1811", accept = true }, { address = "127.0.0.1:1812" }]
""")
    assert cp.returncode == 1, cp
    assert "services.a.sockets: either every socket has accept = true" in cp.stdout, cp.stdout
    assert "services.a.one-shot: does not apply to an inetd-style service" in cp.stdout, cp.stdout
