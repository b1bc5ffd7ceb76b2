"""Issue 21: health checks (the ``health`` key), black-box.

A service that keeps running but stops answering is restarted after
`failures` failed checks, through its normal stop and start, with the
reason in its status and events, and its dependents left alone; a hanging
exec check is killed at its timeout and counts as a failure; an exec check
runs as the service's user, in its cgroup; a check left running by a
supervisor that re-executed or was killed is killed by the next one.
"""

from __future__ import annotations

import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from helpers import (
    PY,
    PY_SLEEP,
    Collector,
    Supervisor,
    append_record,
    cgroup_of,
    check_config,
    crash,
    find_pids,
    need,
    nobody_python,
    pid_alive,
    py_service,
    read_record,
    reexec,
    restart,
    wait_running,
    wait_until,
)

#: Answers "pong" to each connection on 127.0.0.1:argv[1] until DIR/deaf
#: (argv[2]) appears: then it removes the file, closes its listening socket
#: and keeps running, answering nothing.
PY_PONG = r"""
import os, socket, sys, time
port, deaf = int(sys.argv[1]), sys.argv[2] + "/deaf"
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port)); srv.listen(16); srv.settimeout(0.05)
while not os.path.exists(deaf):
    try:
        conn, _ = srv.accept()
    except socket.timeout:
        continue
    conn.settimeout(2)
    try:
        if conn.recv(100).startswith(b"ping"):
            conn.sendall(b"pong\n")
    except OSError:
        pass
    conn.close()
os.unlink(deaf); srv.close()
print("deaf now", flush=True)
time.sleep(1e6)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def health_of(sup: Supervisor, name: str) -> dict[str, Any]:
    return sup.rstatus(name)["health"]


def with_hung_check(sup: Supervisor, *, timeout: float, failures: int) -> tuple[int, set[int], str]:
    """Start service "svc" whose exec check hangs; its PID, the check's PIDs and marker."""
    marker = sup.marker("hung-check")
    sup.start({"services": {"svc": py_service(PY_SLEEP, health={
        "type": "exec", "command": [PY, "-c", "import time; time.sleep(1e6)", marker],
        "interval": 0.2, "timeout": timeout, "failures": failures})}})
    pid = wait_running(sup, ["svc"])["svc"]
    return pid, wait_until(lambda: find_pids(marker), 20, "the check to run"), marker


def recorded_check(sup: Supervisor, name: str) -> int | None:
    """The exec check the service's record names (what a crash of ours leaves to the next one)."""
    record = read_record(sup.state_dir, name) or {}
    return (record.get("health") or {}).get("check-pid")


def test_a_service_that_stops_answering_is_restarted_with_the_reason(sup: Supervisor, tmp_path: Path) -> None:
    port = free_port()
    sup.start({"services": {
        "web": py_service(PY_PONG, str(port), str(tmp_path), health={
            "type": "tcp", "address": f"127.0.0.1:{port}", "send": "ping\n", "expect": "pong",
            "interval": 0.5, "timeout": 1, "failures": 3}),
        "client": py_service(PY_SLEEP, requires=["web"]),
    }})
    pids = wait_running(sup, ["web", "client"])
    wait_until(lambda: health_of(sup, "web")["last-result"] == "passed", 15, "a passing check")
    first = health_of(sup, "web")
    assert first["last-success"] and first["consecutive-failures"] == 0
    human = sup.herd("status", "web", check=0).stdout
    assert "Health check: tcp, every 0.5 s." in human and "Last check passed" in human
    events = Collector(sup.subscribe())
    (tmp_path / "deaf").write_text("")
    deaf_at = time.time()
    svc = wait_until(lambda: (s := sup.rstatus("web"))["state"] == "running" and s["pid"] != pids["web"] and s,
                     30, "web restarted by its health check")
    # three failed checks, at least an interval apart, came first
    assert time.time() - deaf_at >= 2 * 0.5
    assert "health check failed 3 times in a row" in svc["last-failure"]
    state = events.events("state")
    reasons = [e["reason"] for e in state]
    for n in (1, 2, 3):
        assert any(r and r.startswith(f"health check failed ({n} of 3)") for r in reasons), reasons
    stopping = next(e for e in state if e["to"] == "stopping")
    assert stopping["from"] == "running" and "health check failed 3 times" in stopping["reason"]
    respawned = next(e for e in state if e["to"] == "starting")
    assert "health check failed 3 times" in respawned["reason"]
    # through the respawn policy: it counts as a respawn
    assert len(svc["respawns"]) == 1
    # its dependent was not restarted
    assert sup.rstatus("client")["pid"] == pids["client"]
    assert not [e for e in state if e["service"] == "client"]
    # the new process answers: checks pass again
    wait_until(lambda: health_of(sup, "web")["last-success"] > deaf_at, 15, "a passing check again")
    log = [line[2] for line in sup.log_lines("web")]
    assert any("Health check of web failed (1 of 3)" in line for line in log)
    assert any(line.startswith("Restarting web: health check failed 3 times") for line in log)
    events.stop()


def test_a_hanging_check_is_killed_at_its_timeout_and_counts_as_a_failure(sup: Supervisor) -> None:
    first, check, _ = with_hung_check(sup, timeout=3, failures=2)
    # one check at a time, never two
    assert len(check) == 1
    # killed at its timeout (3 s; bounded generously here)
    wait_until(lambda: not any(pid_alive(p) for p in check), 20, "the hung check to be killed")
    svc = wait_until(lambda: (s := sup.rstatus("svc"))["pid"] not in (None, first) and s, 40,
                     "the restart after two timeouts")
    assert "timed out after 3 s (killed)" in svc["last-failure"]
    log = [line[2] for line in sup.log_lines("svc")]
    assert any("(1 of 2)" in line and "timed out after 3 s (killed)" in line for line in log)


def test_an_exec_check_runs_as_the_service_user_in_its_cgroup_and_logs_there(sup: Supervisor) -> None:
    python = nobody_python()
    code = ("import os; print('CHECK', os.getuid(), os.getpgid(0) == os.getpid(), "
            "open('/proc/self/cgroup').read().strip().rpartition(':')[2], flush=True)")
    sup.start({"services": {"svc": {"command": [python, "-c", PY_SLEEP], "user": "nobody",
                                    "health": {"type": "exec", "command": [python, "-c", code],
                                               "interval": 0.2, "timeout": 5}}}})
    pid = wait_running(sup, ["svc"])["svc"]
    _, stream, text = sup.wait_log("svc", lambda t: t.startswith("CHECK "))
    _, uid, own_group, cgroup = text.split()
    assert stream == "stdout"
    assert int(uid) == pwd.getpwnam("nobody").pw_uid
    assert own_group == "True"  # a process group of its own (killed as one)
    if sup.containment == "cgroup":
        assert cgroup == cgroup_of(pid)
    wait_until(lambda: health_of(sup, "svc")["last-result"] == "passed", 10, "a passing check")


def test_failures_in_the_start_period_are_forgiven(sup: Supervisor) -> None:
    sup.start({"services": {"svc": py_service(PY_SLEEP, health={
        "type": "unix", "path": "/nonexistent/health.sock", "interval": 0.2, "timeout": 1,
        "failures": 1, "start-period": 3})}})
    pid = wait_running(sup, ["svc"])["svc"]
    wait_until(lambda: health_of(sup, "svc")["last-result"] == "failed", 10, "a failed check")
    assert sup.rstatus("svc")["pid"] == pid, "restarted within its start period"
    assert any("forgiven: start period" in line[2] for line in sup.log_lines("svc"))
    svc = wait_until(lambda: (s := sup.rstatus("svc"))["pid"] not in (None, pid) and s, 20,
                     "the restart once the start period is over")
    assert "health check failed 1 time in a row" in svc["last-failure"]


def test_a_check_left_running_by_a_killed_supervisor_is_killed(sup: Supervisor) -> None:
    pid, check, marker = with_hung_check(sup, timeout=60, failures=1)
    wait_until(lambda: recorded_check(sup, "svc") in check, 10, "the check's PID in the record")
    crash(sup)
    assert all(pid_alive(p) for p in check)
    restart(sup)
    wait_until(lambda: not any(pid_alive(p) for p in check), 10, "the orphaned check to be killed")
    assert sup.rstatus("svc")["pid"] == pid  # the service itself was adopted, untouched
    again = wait_until(lambda: find_pids(marker) - check, 10, "the checks to go on")
    assert len(again) == 1


def test_a_check_running_at_a_reexec_is_killed_and_the_checks_go_on(sup: Supervisor) -> None:
    pid, check, marker = with_hung_check(sup, timeout=60, failures=1)
    reexec(sup)
    wait_until(lambda: not any(pid_alive(p) for p in check), 10, "the check of the old image to be killed")
    assert sup.rstatus("svc")["pid"] == pid
    wait_until(lambda: find_pids(marker) - check, 10, "the checks to go on")


def test_health_settings_are_checked(tmp_path: Path) -> None:
    cp = check_config(tmp_path, """
[services.a]
command = ["/bin/true"]
health = { type = "udp", address = "localhost", interval = 0, failures = 0 }
[services.b]
command = ["/bin/true"]
health = { type = "exec", command = ["bin/check"], expect = "x" }
[services.c]
command = ["/bin/true"]
one-shot = true
health = { type = "tcp", address = "127.0.0.1:80" }
[services.d]
command = ["/bin/true"]
health = { type = "ping" }
[services.e]
command = ["/bin/true"]
health = true
""")
    assert cp.returncode != 0
    out = cp.stdout + cp.stderr
    for text in ('services.a.health.address: expected "host:port"',
                 'services.a.health.send: missing; a "udp" check needs a query',
                 "services.a.health.interval: must be greater than 0",
                 "services.a.health.failures: must be at least 1",
                 'services.b.health.command: the program "bin/check" must be an absolute path',
                 "services.b.health.expect: unknown key",
                 "services.c.health: applies to long-running services only",
                 'services.d.health.type: expected one of "tcp", "unix", "udp", "exec"',
                 "services.e.health: this service has no default check"):
        assert text in out, text


#: Echoes each datagram on 127.0.0.1:argv[1] until DIR/mute (argv[2]) appears:
#: then removes it and keeps running, answering nothing.
PY_UDP_ECHO = r"""
import os, socket, sys, time
port, mute = int(sys.argv[1]), sys.argv[2] + "/mute"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", port)); s.settimeout(0.05)
while not os.path.exists(mute):
    try:
        data, peer = s.recvfrom(1000)
    except socket.timeout:
        continue
    s.sendto(b"echo:" + data, peer)
os.unlink(mute)
time.sleep(1e6)
"""

#: Accepts on 127.0.0.1:argv[1] and sends an endless stream of "x" to each client.
PY_FLOOD = r"""
import socket, sys, threading
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1]))); srv.listen(16)
def flood(c):
    try:
        while True:
            c.sendall(b"x" * 65536)
    except OSError:
        c.close()
while True:
    threading.Thread(target=flood, args=(srv.accept()[0],), daemon=True).start()
"""


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_udp_check_needs_an_answer(sup: Supervisor, tmp_path: Path) -> None:
    port = free_udp_port()
    sup.start({"services": {"echo": py_service(PY_UDP_ECHO, str(port), str(tmp_path), health={
        "type": "udp", "address": f"127.0.0.1:{port}", "send": "ping", "expect": "echo:ping",
        "interval": 0.3, "timeout": 1, "failures": 2})}})
    pid = wait_running(sup, ["echo"])["echo"]
    wait_until(lambda: health_of(sup, "echo")["last-result"] == "passed", 15, "a passing UDP check")
    (tmp_path / "mute").write_text("")
    svc = wait_until(lambda: (s := sup.rstatus("echo"))["pid"] not in (None, pid) and s, 30,
                     "the restart of the silent UDP server")
    assert "health check failed 2 times in a row: no answer within 1 s" in svc["last-failure"]
    wait_until(lambda: health_of(sup, "echo")["last-result"] == "passed", 15, "a passing check again")


def test_an_endless_answer_without_the_expected_text_fails_the_check_in_time(sup: Supervisor) -> None:
    port = free_port()
    sup.start({"services": {"flood": py_service(PY_FLOOD, str(port), health={
        "type": "tcp", "address": f"127.0.0.1:{port}", "expect": "never sent",
        "interval": 0.3, "timeout": 30, "failures": 1000})}})
    wait_running(sup, ["flood"])
    start = time.time()
    health = wait_until(lambda: (h := health_of(sup, "flood"))["last-result"] and h, 30, "a first check")
    # read up to a bound (64 KiB), not until the timeout, and not forever
    assert time.time() - start < 25
    assert health["last-result"] == "failed" and "answer without the expected b'never sent'" in health["last-detail"]
    assert sup.rstatus("flood")["state"] == "running"


def test_a_health_restart_goes_through_the_backoff(sup: Supervisor) -> None:
    """A failed health check counts as a crash for the respawn policy: with
    respawn-backoff, the service then waits out a delay, stopped."""
    sup.start({"services": {"svc": py_service(PY_SLEEP, **{
        "respawn-backoff": {"initial": 30, "max": 60},
        "health": {"type": "unix", "path": "/nonexistent/svc.sock", "interval": 0.3, "timeout": 1,
                   "failures": 1}})}})
    pid = wait_running(sup, ["svc"])["svc"]
    svc = wait_until(lambda: (s := sup.rstatus("svc"))["next-respawn"] is not None and s, 20,
                     "a backoff delay after the failed check")
    assert svc["state"] == "stopped" and svc["respawn-delay"] == 30 and svc["enabled"] is True
    assert "health check failed 1 time in a row" in svc["last-failure"]
    assert not pid_alive(pid)
    human = sup.herd("status", "svc", check=0).stdout
    assert "respawning in " in human and "Last failure: health check failed 1 time in a row" in human


def test_a_recorded_check_pid_that_names_another_process_is_not_killed(sup: Supervisor) -> None:
    """The record names the running check by PID and start time: a PID
    reused by another process (or a record someone edited) kills nothing."""
    pid, check, _ = with_hung_check(sup, timeout=60, failures=1)
    wait_until(lambda: recorded_check(sup, "svc") in check, 10, "the check's PID in the record")
    crash(sup)
    bystander = subprocess.Popen(["sleep", "1000"])
    try:
        record = read_record(sup.state_dir, "svc")
        assert record is not None
        record["health"]["check-pid"] = bystander.pid  # the start time stays the check's
        append_record(sup.state_dir, record)
        restart(sup)
        wait_running(sup, ["svc"])
        wait_until(lambda: find_pids(sup.marker("hung-check")) - check, 10, "the checks to go on")
        assert bystander.poll() is None, "a process that is not the check was killed"
    finally:
        bystander.kill()
        bystander.wait()


def test_health_restarts_count_towards_the_respawn_limit(sup: Supervisor) -> None:
    sup.start({"services": {"svc": py_service(PY_SLEEP, **{
        "respawn-limit": {"count": 1, "seconds": 600},
        "health": {"type": "unix", "path": "/nonexistent/svc.sock", "interval": 0.3, "timeout": 1,
                   "failures": 1}})}})
    svc = wait_until(lambda: (s := sup.rstatus("svc"))["enabled"] is False and s, 30,
                     "the respawn limit to disable the service")
    assert svc["state"] == "stopped" and len(svc["respawns"]) == 1
    assert svc["disabled-reason"].startswith("Respawning too fast: more than 1 respawns within 600 s; "
                                             "last health check failed 1 time in a row")


def test_checks_never_overlap(sup: Supervisor, tmp_path: Path) -> None:
    """Each check takes longer than the interval: the next one still starts
    only after it ended."""
    trace = tmp_path / "trace"
    code = ("import sys, time; f = open(sys.argv[1], 'a'); f.write(f'start {time.time()}\\n'); f.flush(); "
            "time.sleep(0.4); f.write(f'end {time.time()}\\n')")
    sup.start({"services": {"svc": py_service(PY_SLEEP, health={
        "type": "exec", "command": [PY, "-c", code, str(trace)], "interval": 0.05, "timeout": 5})}})
    wait_running(sup, ["svc"])
    wait_until(lambda: trace.exists() and trace.read_text().count("end") >= 4, 30, "four checks")
    events = [line.split() for line in trace.read_text().splitlines()]
    kinds = [kind for kind, _ in events]
    assert kinds[:8] == ["start", "end"] * 4, kinds
    times = [float(t) for _, t in events[:8]]
    assert times == sorted(times)


def test_a_stop_kills_the_running_check_at_once(sup: Supervisor) -> None:
    _, check, _ = with_hung_check(sup, timeout=600, failures=1)
    cp = sup.herd("stop", "svc", check=None)
    assert cp.returncode == 0, cp.stderr
    # not at its 600 s timeout: with the service
    wait_until(lambda: not any(pid_alive(p) for p in check), 10, "the check to go with the service")
    assert sup.rstatus("svc")["state"] == "stopped"


#: A TLS server on 127.0.0.1:argv[1] (certificate argv[2], key argv[3]) that
#: answers "pong" to "ping"; with argv[4] == "client-cert", it wants a client
#: certificate (as Ganeti's noded does) and so refuses anonymous clients.
PY_TLS_PONG = r"""
import socket, ssl, sys, threading
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(sys.argv[2], sys.argv[3])
if sys.argv[4] == "client-cert":
    ctx.verify_mode = ssl.CERT_REQUIRED; ctx.load_verify_locations(sys.argv[2])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1]))); srv.listen(16)
def serve(c):
    try:
        with ctx.wrap_socket(c, server_side=True) as t:
            if t.recv(100).startswith(b"ping"):
                t.sendall(b"pong\n")
    except (OSError, ssl.SSLError):
        pass
while True:
    threading.Thread(target=serve, args=(srv.accept()[0],), daemon=True).start()
"""


def test_tls_checks_speak_through_tls_and_count_a_refusal_for_want_of_a_certificate_as_an_answer(
        sup: Supervisor, tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        need("openssl (Debian package openssl)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost"],
                   check=True, capture_output=True)
    plain, picky = free_port(), free_port()
    check = {"type": "tcp", "tls": True, "interval": 0.3, "timeout": 5, "failures": 1000}
    sup.start({"services": {
        # ready once listening: a check before the bind would be refused
        "plain": py_service(PY_TLS_PONG, str(plain), str(cert), str(key), "-",
                            ready={"type": "tcp", "address": f"127.0.0.1:{plain}"},
                            health={**check, "address": f"127.0.0.1:{plain}", "send": "ping", "expect": "pong"}),
        "picky": py_service(PY_TLS_PONG, str(picky), str(cert), str(key), "client-cert",
                            ready={"type": "tcp", "address": f"127.0.0.1:{picky}"},
                            health={**check, "address": f"127.0.0.1:{picky}"}),
    }})
    wait_running(sup, ["plain", "picky"])
    ok = wait_until(lambda: (h := health_of(sup, "plain"))["last-result"] and h, 20, "a check of plain")
    assert (ok["last-result"], ok["last-detail"]) == ("passed", "answered as expected"), ok
    ok = wait_until(lambda: (h := health_of(sup, "picky"))["last-result"] and h, 20, "a check of picky")
    assert ok["last-result"] == "passed", ok
