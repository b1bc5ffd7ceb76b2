"""Issue 15, item 11: a notify flood from an unprivileged user.

Anyone may write to the notify socket.  A flood from `nobody` (several
processes, as fast as the socket takes it) must cost the daemon little CPU,
must not make its log grow with every message, and must not keep a real
service's ``READY=1`` out.  Seen from outside: psutil's CPU times of the
daemon, the size of its log, the flooder's own count, `herd start`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil

from helpers import WAIT_GATE, Supervisor, base_env, make_gate, nobody_python, open_gate, py_service

#: argv: MARKER FLAG.  Prints its NOTIFY_SOCKET, waits for FLAG, sends READY=1.
READY_AFTER_FLAG = WAIT_GATE + r'''
import os, socket, sys, time
path = os.environ["NOTIFY_SOCKET"]
print("NOTIFY_SOCKET=" + path, flush=True)
wait_gate(sys.argv[2])
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(b"READY=1\nSTATUS=ready despite the flood", path)
time.sleep(1e6)
'''

#: argv: PATH SECONDS PROCESSES.  Floods PATH from PROCESSES processes, then
#: prints the number of datagrams the socket took.
FLOODER = r'''
import os, socket, sys, time
path, seconds, procs = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
r, w = os.pipe()
started_r, started_w = os.pipe()
kids = []
for _ in range(procs):
    pid = os.fork()
    if pid == 0:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.settimeout(0.2)
        end, sent = time.monotonic() + seconds, 0
        while time.monotonic() < end:
            try:
                s.sendto(b"READY=1\nSTATUS=flood\nMAINPID=1", path)
                if not sent:
                    os.write(started_w, b"x")
                sent += 1
            except (socket.timeout, BlockingIOError):
                pass
        os.write(w, f"{sent}\n".encode())
        os._exit(0)
    kids.append(pid)
os.close(w)
os.close(started_w)
got = b""
while len(got) < procs:  # every flooder has sent its first datagram
    chunk = os.read(started_r, procs)
    if not chunk:
        break
    got += chunk
print("flooding", flush=True)
for pid in kids:
    os.waitpid(pid, 0)
with os.fdopen(r) as f:
    print(sum(int(x) for x in f.read().split()))
'''

FLOOD_SECONDS = 3.0


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def test_a_notify_flood_costs_little_and_ready_still_gets_through(sup: Supervisor, tmp_path: Path) -> None:
    python = nobody_python()
    flag = make_gate(tmp_path / "go")
    sup.start({"services": {
        "late": py_service(READY_AFTER_FLAG, sup.marker("late"), str(flag), ready={"type": "notify"},
                           **{"auto-start": False, "start-timeout": 60}),
    }})
    assert sup.proc is not None
    start = subprocess.Popen([sys.executable, "-m", "herd", "-s", str(sup.socket), "start", "late"],
                             env=base_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        _, _, line = sup.wait_log("late", lambda t: t.startswith("NOTIFY_SOCKET="))
        path = line.split("=", 1)[1]
        cpu_before = cpu_seconds(sup.proc.pid)
        log_before = sup.stderr_path.stat().st_size

        flood = subprocess.Popen([python, "-c", FLOODER, path, str(FLOOD_SECONDS), "4"], user="nobody",
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, cwd="/")
        assert flood.stdout is not None
        assert flood.stdout.readline() == "flooding\n"  # READY=1 goes while the flood is on
        open_gate(flag)
        out, err = start.communicate(timeout=60)
        ready_at = time.monotonic()
        flood_out, flood_err = flood.communicate(timeout=60)
        flood_end = time.monotonic()
    finally:
        if start.poll() is None:
            start.kill()
            start.wait()
    assert flood.returncode == 0, flood_err
    sent = int(flood_out)
    assert sent > 3000, f"the flood got only {sent} datagrams in: {flood_err}"
    assert start.returncode == 0, (out, err)
    assert ready_at < flood_end, "READY=1 was only taken in after the flood"
    status = sup.status("late")
    assert status["state"] == "running" and status["status-text"] == "ready despite the flood", status

    cpu = cpu_seconds(sup.proc.pid) - cpu_before
    assert cpu < 0.4 * FLOOD_SECONDS, f"{sent} datagrams in {FLOOD_SECONDS:g} s cost the daemon {cpu:.2f} s of CPU"
    grown = sup.stderr_path.read_bytes()[log_before:].decode(errors="replace").splitlines()
    assert len(grown) < 60, f"the daemon's log grew by {len(grown)} lines for {sent} datagrams"
    reports = [json.loads(x) for x in grown if '"notify messages dropped"' in x]
    assert reports and reports[0]["dropped"] > 0, grown[-10:]
