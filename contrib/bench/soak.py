"""A bounded chaos run against our supervisor, then a check of its invariants.

    contrib/bench/soak [--minutes 10] [--seed N] [--crash-every 20] [--keep]

For the given time (default 10 minutes) it:

* SIGKILLs random services (the pid the daemon reports, sometimes one found by psutil);
* runs start/stop/restart/enable/disable/status storms from many clients at once,
  pipelined, each reply checked;
* re-executes the daemon (SIGUSR1) now and then, if `reexec root` is supported;
* SIGKILLs the daemon every `--crash-every` seconds or so (0: never) and starts
  a new one on the same state directory, sockets and log directory: the
  keeper (docs/keeper.md) drains the services' pipes meanwhile, and the new
  daemon re-adopts the services.  In a settled moment: the actors that change
  services (killer, storms, re-execs) are held around the crash, so the check
  is strict: every service keeps its state, PID and enabled flag across it
  (a stopped one is started by the new daemon only if no operator's stop,
  disable or held-down requirement keeps it down, as the state records say),
  and its processes match its state before and after.  Amid the storms (a
  share `--crash-amid`, default 0.5): those actors are held only after the
  SIGKILL, and each service's processes must match its state once the new
  daemon has settled (no orphan or second process of a start under way).
  The clients go on meanwhile,
  meet a dead socket (those errors are counted apart) and reconnect; they are
  held just before the new daemon starts, which is then warmed up as at the
  start (every service started, every log file open) and gives the baseline
  for fds and RSS (a new process);
* sends misbehaving clients: silent ones, garbage, half lines, clients that
  hang up mid-line, clients that never read their replies or their events,
  non-reading followers (`log` with `[100, "follow"]`, `subscribe`, never read);
* sends requests with bad ids (at most 300): `NaN`, `Infinity`, `1e999`,
  5000-digit integers (as id or argument).  Each must get `bad-request` (or a
  clean close), never `internal`, and the connection must still answer `ping`.

As root (with a python3 that user nobody can run), hostile local actors run
as user nobody, each bounded in count and time:

* a port squatter: up to 5 processes in turn, each binding a loopback TCP port
  for up to 10 s, accepting connections and never reading them.  The daemon
  here has no hurd-vm service (that needs QEMU), so this only checks that the
  daemon does not mind; a squatter on a childhurd's secrets port is covered
  by tests/test_hurd_vm.py (test_squatter_*), not by the soak;
* symlink swaps: service `swap0` (user nobody) logs into a directory that
  nobody owns, and one process keeps replacing that log file with a symlink
  to a root-owned decoy file of the soak (mode 0644) for the whole chaos;
* a notify flood: up to 6 bursts of 3 processes, each sending datagrams (READY=1,
  MAINPID=1, garbage, …) to the daemon's notify socket (found in the environment
  of the notify service `notify0`) for up to 3 s, while `ping` must answer
  within PING_LIMIT seconds.

Then it quiesces (every service enabled and started again) and checks:

* every service's state matches reality (psutil): running => exactly one live
  process carrying the service's marker, and it is the status pid, a child of
  the daemon; stopped => none;
* no zombie children of the daemon, no duplicate service processes;
* the daemon's fd count and its RSS are back within 10 % of the baseline,
  after re-execs and supervisor crashes alike (the queues of the clients
  that did not read are freed when they go, and the daemon gives that memory
  back to the system: docs/configuration.md, "Memory").  The baseline is taken
  after a restart of every service, so that each log file is open, and with
  the daemon's bounded caches full, as they are at the end (the replay of
  the last state events, the log hub's last lines: a new image starts with
  them empty).  Both are printed before and after, in the verdict line too,
  with the resident memory by mapping (heap, anonymous, files) in the log
  and the highest RSS seen during the chaos (a figure, not a pass);
* the decoy file is unchanged (content, owner, mode, one link);
* no lost log line: each counter service prints `SEQ RUN N` with N = 0, 1, 2, …
  per process run, and records its last N in a side file; each run's lines in
  the log file must be gap-free from 0 and reach the side file's N.  A gap is
  allowed only where a supervisor SIGKILL explains it (what that supervisor
  had read and not yet written: docs/keeper.md, "What can still be lost"):
  the line before it was read before that SIGKILL and the line after it
  after, at most one gap per run and crash, each named in the output; never
  a line doubled or out of order;
* no `internal` error, no request without a reply, no traceback in the daemon's log;
* SIGTERM stops everything (adopted services too) and the daemon exits 0; no
  service, actor or other process naming the soak's directories (the keeper,
  of a crashed daemon too) is left; the clean-up kills what is.

It prints one line, `soak: PASS …` or `soak: FAIL …`, and exits 0 or 1.
Loopback and local sockets only; every loop is bounded by the deadline.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))
from herd.protocol import ERROR_CODES, MAX_REPLAY  # noqa: E402
from supervisor._journal import read_dir as read_records  # noqa: E402
from supervisor._memdebug import smaps  # noqa: E402
from supervisor._output import HUB_LINES  # noqa: E402

SLEEP = shutil.which("sleep") or "/bin/sleep"
MARKER_ENV = "SOAK_MARKER"
#: The daemon's fds and RSS after the run, against the baseline: at most 10 % more.
RETURN_TOLERANCE = 0.10
#: Seconds within which `ping` must answer during the hostile actors (generous: 2 shared cores).
PING_LIMIT = 10.0
#: Seconds within which a re-exec'd daemon must answer `ping` again (generous: the
#: new image is checked in a child first, and 2 shared cores may be busy).
REEXEC_LIMIT = 30.0
#: The hostile actors that run as user `nobody` need an interpreter that user can
#: run (a virtualenv under /root is not); their scripts use the standard library only.
NOBODY_PY = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3")
                  if os.access(p, os.X_OK) and os.stat(p).st_mode & 0o001), None)
#: Requests whose id is not a valid one: each must get `bad-request` (or a clean
#: close), never `internal`, never a traceback.
BAD_ID_LINES = [
    b'{"id": NaN, "action": "ping"}\n',
    b'{"id": 1e999, "action": "ping"}\n',
    b'{"id": -Infinity, "action": "status"}\n',
    b'{"id": Infinity, "action": "ping", "args": [NaN]}\n',
    b'{"id": ' + b"9" * 5000 + b', "action": "ping"}\n',
    b'{"id": -' + b"1" * 5000 + b', "action": "status"}\n',
    b'{"id": 1' + b"0" * 5000 + b'.5, "action": "ping"}\n',
    b'{"id": 7, "action": "ping", "args": [' + b"3" * 5000 + b']}\n',
]

#: A service that prints a gap-free counter, one line per write(2), and keeps
#: its last number in a side file (written after the line).
COUNTER = r"""
import os, sys, time, random
marker, seqdir = sys.argv[1], sys.argv[2]
run = "%d-%d" % (os.getpid(), time.monotonic_ns())
fd = os.open(os.path.join(seqdir, run + ".seq"), os.O_WRONLY | os.O_CREAT, 0o644)
rng = random.Random()
n = 0
while True:
    burst = 40 if rng.random() < 0.02 else 1
    for _ in range(burst):
        os.write(1, b"SEQ %s %d\n" % (run.encode(), n))
        os.pwrite(fd, b"%20d" % n, 0)
        n += 1
    time.sleep(rng.uniform(0.01, 0.05))
"""


#: A notify service: READY=1 on $NOTIFY_SOCKET, then idle (its environment
#: tells the notify flooder where the daemon's notify socket is).
NOTIFY_SERVICE = r"""
import os, socket, sys, time
path = os.environ["NOTIFY_SOCKET"]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.connect("\0" + path[1:] if path.startswith("@") else path)
s.send(b"READY=1")
while True:
    time.sleep(3600)
"""

#: A service running as `nobody` that prints steadily into a log file in a
#: directory `nobody` owns (so the symlink swapper can replace the file).
CHATTER = r"""
import os, sys, time
n = 0
while True:
    os.write(1, b"chatter %s %d\n" % (sys.argv[1].encode(), n))
    n += 1
    time.sleep(0.02)
"""

#: Hostile actors, run as `nobody` (argv: script marker deadline-in-seconds ...).
#: Each ends by itself when its time is up; the soak kills what is left.
SQUATTER = r"""
import socket, sys, time
end = time.monotonic() + float(sys.argv[2])
ls = socket.socket()
ls.bind(("127.0.0.1", 0))
ls.listen(16)
print(ls.getsockname()[1], flush=True)
ls.settimeout(0.2)
held = []
while time.monotonic() < end:
    try:
        c, _ = ls.accept()
        held = (held + [c])[-32:]  # accepts and keeps, never reads
    except socket.timeout:
        pass
"""

SWAPPER = r"""
import os, random, sys, time
end = time.monotonic() + float(sys.argv[2])
target, decoy = sys.argv[3], sys.argv[4]
tmp = target + ".swap"
rng = random.Random()
n = 0
while time.monotonic() < end and n < 20000:
    try:
        os.symlink(decoy, tmp)
    except FileExistsError:
        os.unlink(tmp)
        continue
    os.rename(tmp, target)  # the log file is now a symlink to a root-owned file
    n += 1
    time.sleep(rng.uniform(0.0, 0.05))
print(n, flush=True)
"""

NOTIFY_FLOOD = r"""
import os, socket, sys, time
end = time.monotonic() + float(sys.argv[2])
path = sys.argv[3]
msgs = [b"READY=1", b"MAINPID=1", b"STOPPING=1", b"STATUS=" + b"x" * 4000, b"WATCHDOG=1",
        b"\xff\xfe garbage", b"", b"READY=1\nMAINPID=%d" % os.getppid(), b"FDSTORE=1"]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.setblocking(False)
n = 0
while time.monotonic() < end and n < 200000:
    try:  # sendto, not connect: the daemon may be down (a crash) and come back
        s.sendto(msgs[n % len(msgs)], path)
        n += 1
    except BlockingIOError:
        time.sleep(0.001)  # the daemon reads at its own pace: the kernel makes us wait
    except OSError:  # ECONNREFUSED/ENOENT while the daemon is down
        time.sleep(0.01)
print(n, flush=True)
"""


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Conn:
    """One connection speaking the control protocol; replies matched by id."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buf = b""
        self.next_id = 0
        self.sent: dict[int, str] = {}  # id -> what was asked and when, to name a request never answered
        hello = self.read(timeout)
        if not hello or hello.get("hello") != "supervisor":
            raise ConnectionError(f"bad hello {hello!r}")

    def read(self, timeout: float) -> dict | None:
        end = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError("no reply in time")
            self.sock.settimeout(left)
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def send(self, action: str, service: str | None = None, args: list | None = None) -> int:
        self.next_id += 1
        req: dict[str, Any] = {"id": self.next_id, "action": action}
        if service is not None:
            req["service"] = service
        if args is not None:
            req["args"] = args
        self.sock.sendall(json.dumps(req).encode() + b"\n")
        self.sent[self.next_id] = f"{action} {service or ''} at {time.strftime('%H:%M:%S')}".strip()
        return self.next_id

    def replies(self, ids: list[int], timeout: float) -> dict[int, dict]:
        got: dict[int, dict] = {}
        end = time.monotonic() + timeout
        while len(got) < len(ids):
            try:
                obj = self.read(max(0.001, end - time.monotonic()))
            except TimeoutError:
                missing = [f"#{i} {self.sent.get(i, '?')}" for i in ids if i not in got]
                raise TimeoutError(f"no reply to {', '.join(missing)}") from None
            if obj is None:
                raise ConnectionError(f"closed with {len(ids) - len(got)} replies outstanding")
            if "event" in obj:
                continue
            got[obj.get("id")] = obj
            self.sent.pop(obj.get("id"), None)
        return got

    def call(self, action: str, service: str | None = None, timeout: float = 60.0) -> dict:
        i = self.send(action, service)
        return self.replies([i], timeout)[i]

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Gate:
    """Lets a group of chaos actors act, or holds them while a supervisor crash
    is checked: `enter` before an action (it waits while the gate is closed),
    `leave` after it; `close` waits until no actor of the group is acting."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.closed = False
        self.active = 0

    def enter(self, running: Any) -> bool:
        """False (without entering) once `running()` is false."""
        with self.cond:
            while self.closed:
                if not running():
                    return False
                self.cond.wait(0.1)
            self.active += 1
            return True

    def leave(self) -> None:
        with self.cond:
            self.active -= 1
            self.cond.notify_all()

    def close(self, timeout: float) -> bool:
        """Closed, and no actor inside, within `timeout` s?"""
        end = time.monotonic() + timeout
        with self.cond:
            self.closed = True
            while self.active:
                if time.monotonic() > end:
                    return False
                self.cond.wait(0.1)
            return True

    def open(self) -> None:
        with self.cond:
            self.closed = False
            self.cond.notify_all()


class Soak:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.rng = random.Random(a.seed)
        self.token = f"soak{os.getpid()}x{self.rng.randrange(10**6)}"
        self.tmp = Path(tempfile.mkdtemp(prefix="soak-"))
        self.sockdir = Path(tempfile.mkdtemp(prefix="soak-", dir="/tmp"))
        self.rw, self.ro = self.sockdir / "rw.sock", self.sockdir / "ro.sock"
        self.seqdir = self.tmp / "seq"
        self.seqdir.mkdir()
        self.log_dir = self.tmp / "log"
        self.proc: subprocess.Popen | None = None
        self.deadline = 0.0
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.failures: list[str] = []
        self.stats: Counter[str] = Counter()
        self.codes: Counter[str] = Counter()
        self.services: dict[str, dict] = {}
        self.counters: list[str] = []
        self.reexec_supported = False
        # Supervisor crashes: the actors that change services (killer, storms, re-execs)
        # and the clients are held around each crash (see `crash`).
        self.mutators, self.clients = Gate(), Gate()
        self.kills_at: list[tuple[float, float]] = []  # wall-clock bounds of each supervisor SIGKILL
        self.crash_window = (1e18, 1e18)  # monotonic: from the SIGKILL to the end of the checks
        self.adopted: set[int] = set()  # service pids that a crashed supervisor left behind
        self.stderr_paths: list[Path] = []
        self.lost_in_flight: list[tuple[str, str, int, int, int]] = []  # service, run, first, last, crash
        # The hostile actors that need user `nobody` (and root to become it).
        self.hostile = os.geteuid() == 0 and NOBODY_PY is not None
        self.actors: list[subprocess.Popen] = []
        self.ping_worst = 0.0
        if self.hostile:
            self.swapdir = Path(tempfile.mkdtemp(prefix="soak-swap-", dir="/tmp"))
            os.chown(self.swapdir, 65534, 65534)
            os.chmod(self.swapdir, 0o755)
            self.decoy = self.tmp / "decoy"
            self.decoy_text = f"root-owned decoy of {self.token}: a symlink swap must never write here\n"
            self.decoy.write_text(self.decoy_text)
            os.chmod(self.decoy, 0o644)

    # ---- set-up ---------------------------------------------------------------------------

    def marker(self, name: str) -> str:
        return f"{self.token}-{name}"

    def config(self) -> str:
        py = sys.executable
        out = []
        names = []
        for i in range(self.a.counters):
            name = f"count{i}"
            svc: dict[str, Any] = {"command": [py, "-c", COUNTER, self.marker(name), str(self.seqdir)],
                                   "respawn-delay": self.rng.choice([0, 0, 0.05, 0.2]), "stop-timeout": 5}
            if i % 4 == 3:
                svc["requires"] = [f"count{i - 1}"]
            if i % 5 == 4:
                svc["respawn-limit"] = {"count": 3, "seconds": 5}
            # Half of them rotate their log often (no backup dropped: every line stays checkable).
            svc["log-max-size"] = 32768 if i % 2 else 0
            svc["log-max-backups"] = 1000
            self.services[name] = svc
            self.counters.append(name)
            names.append(name)
        for i in range(self.a.sleepers):
            name = f"sleep{i}"
            svc = {"command": [SLEEP, "1000000"], "respawn-delay": 0, "stop-timeout": 5}
            if i % 3 == 2:
                svc["kill-mode"] = "tree"
            if i % 4 == 1:
                svc["requires"] = ["count0"]
            self.services[name] = svc
            names.append(name)
        if self.hostile:
            # A notify service (its environment names the daemon's notify socket, for the
            # flooder) and a chatty service of user nobody logging into a directory that
            # nobody owns (for the symlink swapper).
            self.services["notify0"] = {
                "command": [py, "-c", NOTIFY_SERVICE, self.marker("notify0")], "respawn-delay": 0,
                "stop-timeout": 5, "extra": ['ready = { type = "notify" }', "start-timeout = 60"]}
            self.services["swap0"] = {
                "command": [NOBODY_PY, "-c", CHATTER, self.marker("swap0")], "respawn-delay": 0.05,
                "stop-timeout": 5, "log-max-size": 4096, "log-max-backups": 2,
                "extra": ['user = "nobody"', 'group = "nogroup"',
                          "log-file = " + json.dumps(str(self.swapdir / "swap0.log"))]}
        for name, svc in self.services.items():
            env = {MARKER_ENV: self.marker(name)}
            out.append(f"[services.{name}]")
            out.append("command = " + json.dumps(svc["command"]))
            for key in ("respawn-delay", "stop-timeout"):
                out.append(f"{key} = {svc[key]}")
            if "requires" in svc:
                out.append("requires = " + json.dumps(svc["requires"]))
            for key in ("log-max-size", "log-max-backups"):
                if key in svc:
                    out.append(f"{key} = {svc[key]}")
            if "kill-mode" in svc:
                out.append(f'kill-mode = "{svc["kill-mode"]}"')
            if "respawn-limit" in svc:
                rl = svc["respawn-limit"]
                out.append(f"respawn-limit = {{ count = {rl['count']}, seconds = {rl['seconds']} }}")
            out.extend(svc.get("extra", []))
            out.append("environment = { " + ", ".join(f'{k} = "{v}"' for k, v in env.items()) + " }")
            out.append("")
        return "\n".join(out)

    def start_daemon(self) -> None:
        """Start a daemon (again, after a crash: same configuration, sockets, state
        and log directories); its stderr goes to daemon.err, daemon.1.err, …"""
        conf = self.tmp / "init.toml"
        if not conf.exists():
            conf.write_text(self.config())
        notify_path = self.sockdir / "notify"
        notify_path.unlink(missing_ok=True)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["NOTIFY_SOCKET"] = str(notify_path)
        env["SOAK_TOKEN"] = self.token
        n = len(self.stderr_paths)
        self.stderr_path = self.tmp / (f"daemon.{n}.err" if n else "daemon.err")
        self.stderr_paths.append(self.stderr_path)
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "supervisor", "-c", str(conf), "-s", str(self.rw),
                 "--status-socket", str(self.ro), "--state-dir", str(self.tmp / "state"),
                 "--log-dir", str(self.log_dir), "--log-format", "json"],
                env=env, cwd=self.tmp, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                start_new_session=True)
        try:
            notify.settimeout(0.2)
            end = time.monotonic() + 20
            while time.monotonic() < end:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"daemon exited {self.proc.returncode} before READY=1: {self.err_tail(3)}")
                try:
                    if "READY=1" in notify.recv(4096).decode(errors="replace").splitlines():
                        break
                except socket.timeout:
                    pass
            else:
                raise RuntimeError("no READY=1 within 20 s")
        finally:
            notify.close()

    def err_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # ---- helpers ---------------------------------------------------------------------------

    def fail(self, what: str) -> None:
        with self.lock:
            if len(self.failures) < 200:
                self.failures.append(what)

    def count(self, key: str, k: int = 1) -> None:
        with self.lock:
            self.stats[key] += k

    def check_reply(self, rep: dict, where: str) -> None:
        if not isinstance(rep.get("ok"), bool):
            self.fail(f"{where}: malformed reply {rep}")
            return
        if not rep["ok"]:
            code = (rep.get("error") or {}).get("code")
            with self.lock:
                self.codes[str(code)] += 1
            if code not in ERROR_CODES or code == "internal":
                self.fail(f"{where}: error {rep.get('error')}")

    def status(self, timeout: float = 30) -> dict[str, dict]:
        c = Conn(self.ro, timeout)
        try:
            rep = c.call("status", timeout=timeout)
        finally:
            c.close()
        if not rep.get("ok"):
            raise RuntimeError(f"status failed: {rep}")
        return {s["name"]: s for s in rep["result"]["services"]}

    def daemon(self) -> psutil.Process:
        assert self.proc is not None
        return psutil.Process(self.proc.pid)

    def marked(self) -> dict[str, list[psutil.Process]]:
        """Live processes carrying a service marker, by service name."""
        out: dict[str, list[psutil.Process]] = defaultdict(list)
        prefix = self.token + "-"
        for p in psutil.process_iter(["pid", "cmdline", "environ", "status"]):
            info = p.info
            if info.get("status") == psutil.STATUS_ZOMBIE:
                continue
            m = (info.get("environ") or {}).get(MARKER_ENV)
            if not m:
                m = next((x for x in (info.get("cmdline") or []) if x.startswith(prefix)), None)
            if m and m.startswith(prefix):
                out[m[len(prefix):]].append(p)
        return out

    # ---- chaos actors ------------------------------------------------------------------------

    def running(self) -> bool:
        return not self.stop_event.is_set() and time.monotonic() < self.deadline

    def killer(self) -> None:
        rng = random.Random(self.rng.random())
        while self.running():
            time.sleep(rng.uniform(0.1, 0.6))
            if not self.mutators.enter(self.running):
                return
            try:
                if rng.random() < 0.8:
                    st = self.status(10)
                    pids = [(n, s["pid"]) for n, s in st.items() if s.get("pid") and s["state"] == "running"]
                    if pids:
                        name, pid = rng.choice(pids)
                        os.kill(pid, signal.SIGKILL)
                        self.count("kills")
                else:
                    marked = self.marked()
                    procs = [p for name, ps in marked.items() if name in self.services for p in ps]
                    if procs:
                        rng.choice(procs).kill()
                        self.count("kills")
            except (ProcessLookupError, psutil.Error):
                pass
            except (OSError, TimeoutError, ConnectionError, RuntimeError, ValueError) as exc:
                self.count("killer-status-errors")
                if not self.excused():
                    self.fail(f"killer: status failed: {type(exc).__name__}: {exc}")
            finally:
                self.mutators.leave()

    def storm(self, k: int) -> None:
        rng = random.Random(self.rng.random() + k)
        names = list(self.services)
        conn: Conn | None = None
        while self.running():
            if not self.mutators.enter(self.running):
                break
            try:
                try:
                    if conn is None or rng.random() < 0.05:
                        if conn:
                            conn.close()
                        conn = Conn(self.rw)
                        self.count("connections")
                    ids = []
                    for _ in range(rng.choice([1, 1, 2, 3, 5, 8])):
                        action = rng.choices(["status", "start", "stop", "restart", "enable", "disable", "status1"],
                                             [25, 22, 15, 15, 12, 4, 7])[0]
                        name = rng.choice(names) if rng.random() > 0.02 else "no-such-service"
                        if action == "status":
                            ids.append(conn.send("status"))
                        elif action == "status1":
                            ids.append(conn.send("status", name, [rng.randrange(0, 20)]))
                        else:
                            ids.append(conn.send(action, name))
                        self.count("requests")
                    got = conn.replies(ids, 120)
                    for rep in got.values():
                        self.check_reply(rep, "storm")
                except TimeoutError as exc:
                    self.fail(f"storm: within 120 s, {exc}")
                    conn.close() if conn else None
                    conn = None
                except (ConnectionError, OSError) as exc:
                    self.count("storm-connections-dropped")
                    if not self.excused():
                        self.fail(f"storm: connection lost: {type(exc).__name__}: {exc}")
                    if conn:
                        conn.close()
                    conn = None
                    time.sleep(0.05)
            finally:
                self.mutators.leave()
            time.sleep(rng.uniform(0, 0.05))
        if conn:
            conn.close()

    def dashboard(self) -> None:
        """A polling dashboard on the status socket."""
        conn: Conn | None = None
        while self.running():
            if not self.clients.enter(self.running):
                break
            try:
                if conn is None:
                    conn = Conn(self.ro)
                rep = conn.call("status", timeout=30)
                self.check_reply(rep, "dashboard")
                self.count("polls")
            except (ConnectionError, OSError, TimeoutError) as exc:
                self.count("dashboard-connections-dropped")
                if not self.excused():
                    self.fail(f"dashboard: {type(exc).__name__}: {exc}")
                if conn:
                    conn.close()
                conn = None
            finally:
                self.clients.leave()
            time.sleep(0.02)
        if conn:
            conn.close()

    def subscriber(self) -> None:
        """Follows events and logs while it reads them (a well-behaved one)."""
        while self.running():
            if not self.clients.enter(self.running):
                break
            try:
                c = Conn(self.ro)
                ids = [c.send("subscribe"), c.send("log", None, [5, "follow"])]
                c.replies(ids, 30)
                end = time.monotonic() + 5
                while self.running() and time.monotonic() < end:
                    try:
                        obj = c.read(1)
                    except TimeoutError:
                        continue
                    if obj is None:
                        break
                    self.count("events")
                c.close()
            except (ConnectionError, OSError, TimeoutError) as exc:
                if not self.excused():
                    self.fail(f"subscriber: {type(exc).__name__}: {exc}")
                time.sleep(0.1)
            finally:
                self.clients.leave()

    def misbehaver(self) -> None:
        rng = random.Random(self.rng.random() + 99)
        silent: list[socket.socket] = []
        try:
            while self.running():
                time.sleep(rng.uniform(0.05, 0.4))
                if not self.clients.enter(self.running):
                    break
                kind = rng.choice(["silent", "hangup", "garbage", "half-close", "half-keep", "no-read",
                                   "no-read-events", "no-read-follow", "no-read-subscribe", "binary",
                                   "close-silent"])
                try:
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.settimeout(5)
                    s.connect(str(self.rw if rng.random() < 0.5 else self.ro))
                    if kind == "silent" or kind == "half-keep":
                        if kind == "half-keep":
                            s.sendall(b'{"id": 1, "action": "sta')
                        silent.append(s)
                    elif kind == "hangup":
                        s.close()
                    elif kind == "garbage":
                        s.sendall(b"}{ not json at all\n" * rng.randrange(1, 50) + b"\xff\xfe\n")
                        s.close()
                    elif kind == "binary":
                        s.sendall(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4096))))
                        s.close()
                    elif kind == "half-close":
                        s.sendall(b'{"id": 1, "action": "start", "service": "co')
                        s.close()
                    elif kind == "no-read":
                        s.setblocking(False)
                        try:
                            for _ in range(400):
                                s.send(b'{"action": "status"}\n')
                        except (BlockingIOError, OSError):
                            pass
                        silent.append(s)
                    elif kind == "no-read-events":
                        s.sendall(b'{"id": 1, "action": "subscribe"}\n{"id": 2, "action": "log", "args": [0, "follow"]}\n')
                        silent.append(s)
                    elif kind in ("no-read-follow", "no-read-subscribe"):  # followers that never read
                        s.sendall(b'{"action": "log", "args": [100, "follow"]}\n' if kind == "no-read-follow"
                                  else b'{"action": "subscribe"}\n')
                        silent.append(s)
                    elif kind == "close-silent" and silent:
                        silent.pop(rng.randrange(len(silent))).close()
                        s.close()
                    else:
                        s.close()
                    while len(silent) > 30:  # at most 30 idle or non-reading connections at once
                        silent.pop(0).close()
                    self.count("bad-clients")
                except OSError as exc:
                    self.count("bad-client-connect-errors")
                    if not self.excused() and not isinstance(exc, (BrokenPipeError, ConnectionResetError)):
                        self.fail(f"misbehaver ({kind}): {type(exc).__name__}: {exc}")
                finally:
                    self.clients.leave()
        finally:
            for s in silent:
                s.close()

    # ---- hostile actors: loopback / local only, each bounded in count and time ----------------------

    def spawn_nobody(self, kind: str, script: str, seconds: float, *args: str) -> subprocess.Popen:
        """An actor script run as user nobody (no groups), for at most `seconds`."""
        n = self.stats[f"actor-{kind}"]
        self.count(f"actor-{kind}")
        with open(self.tmp / f"actor-{kind}-{n}.err", "wb") as err:
            p = subprocess.Popen([NOBODY_PY, "-I", "-c", script, self.marker(f"actor-{kind}"), f"{seconds:.2f}", *args],
                                 user=65534, group=65534, extra_groups=[], cwd="/", stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=err, start_new_session=True)
        with self.lock:
            self.actors.append(p)
        return p

    def finish_actor(self, p: subprocess.Popen, kind: str, seconds: float) -> str:
        """Its output once it ended (by itself: its time is bounded); a crash is a failure."""
        try:
            out, _ = p.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
            self.fail(f"{kind} actor did not end within {seconds + 30:.0f} s")
        if p.returncode != 0:
            self.fail(f"{kind} actor exited {p.returncode}: {_tail(self.tmp / f'actor-{kind}-*.err')}")
        return out.decode(errors="replace").strip()

    def ping(self, where: str) -> None:
        """One `ping` on a new connection; the daemon must answer within PING_LIMIT s."""
        if not self.clients.enter(self.running):
            return
        t0 = time.monotonic()
        try:
            c = Conn(self.rw, PING_LIMIT)
            try:
                rep = c.call("ping", timeout=PING_LIMIT)
            finally:
                c.close()
        except (OSError, ConnectionError, TimeoutError, ValueError) as exc:
            if not self.excused():
                self.fail(f"{where}: ping failed: {type(exc).__name__}: {exc}")
            return
        finally:
            self.clients.leave()
        dt = time.monotonic() - t0
        with self.lock:
            self.ping_worst = max(self.ping_worst, dt)
        if not rep.get("ok"):
            self.fail(f"{where}: ping: {rep}")

    def sleep_while_running(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while self.running() and time.monotonic() < end:
            time.sleep(0.1)

    def left(self) -> float:
        return max(0.5, self.deadline - time.monotonic())

    def squatter(self) -> None:
        """Processes of nobody that bind a loopback TCP port, accept and hold
        connections and never read (at most 5 in turn, up to 10 s each).  The
        daemon has no hurd-vm service here (that needs QEMU): a squatter on a
        childhurd's secrets port is covered by tests/test_hurd_vm.py
        (test_squatter_*).  Here: the daemon must not mind."""
        rng = random.Random(self.rng.random() + 11)
        for _ in range(5):
            self.sleep_while_running(rng.uniform(0.2, 2))
            if not self.running():
                return
            secs = min(rng.uniform(3, 10), self.left())
            p = self.spawn_nobody("squatter", SQUATTER, secs)
            port = p.stdout.readline().strip()
            held = []
            if port.isdigit():
                for _ in range(rng.randrange(1, 8)):
                    try:
                        held.append(socket.create_connection(("127.0.0.1", int(port)), timeout=2))
                    except OSError:
                        break
            self.ping("while a squatter holds a loopback port")
            self.finish_actor(p, "squatter", secs)
            for h in held:
                h.close()
            self.count("squats")

    def swapper(self) -> None:
        """One process of nobody that, for the whole chaos, keeps replacing the
        log file of swap0 (in a directory nobody owns) with a symlink to a root
        file of the soak (the decoy).  The decoy must never change."""
        secs = self.left()
        p = self.spawn_nobody("swapper", SWAPPER, secs, str(self.swapdir / "swap0.log"), str(self.decoy))
        out = self.finish_actor(p, "swapper", secs)
        self.count("symlink-swaps", int(out) if out.isdigit() else 0)

    def notify_socket(self) -> str | None:
        """The daemon's notify socket, from the environment of the notify service."""
        if not self.clients.enter(self.running):
            return None
        try:
            pid = self.status(10).get("notify0", {}).get("pid")
            return psutil.Process(pid).environ().get("NOTIFY_SOCKET") if pid else None
        except (psutil.Error, OSError, ConnectionError, TimeoutError, RuntimeError):
            return None
        finally:
            self.clients.leave()

    def notify_flooder(self) -> None:
        """Bursts of datagrams to the daemon's notify socket from processes of
        nobody (at most 6 bursts of 3 processes, up to 3 s each, up to 200000
        datagrams a process), while `ping` must keep answering."""
        rng = random.Random(self.rng.random() + 13)
        for _ in range(6):
            self.sleep_while_running(rng.uniform(0.5, 4))
            if not self.running():
                return
            path = self.notify_socket()
            if not path:
                continue
            if path.startswith("@"):
                path = "\0" + path[1:]
            secs = min(rng.uniform(1, 3), self.left())
            procs = [self.spawn_nobody("notify-flood", NOTIFY_FLOOD, secs, path) for _ in range(3)]
            while any(p.poll() is None for p in procs):
                self.ping("during a notify flood")
                time.sleep(0.1)
            for p in procs:
                out = self.finish_actor(p, "notify-flood", secs)
                self.count("notify-datagrams", int(out) if out.isdigit() else 0)
            self.count("notify-floods")

    def bad_ids(self) -> None:
        """Requests with NaN, infinite, 5000-digit ids (at most 300): each gets
        `bad-request` or a clean close; if the connection stays, it still works."""
        rng = random.Random(self.rng.random() + 17)
        for _ in range(300):
            self.sleep_while_running(rng.uniform(0.02, 0.2))
            if not self.running():
                return
            line = rng.choice(BAD_ID_LINES)
            what = f"bad id {line[:24]!r}…"
            if not self.clients.enter(self.running):
                return
            try:
                c = Conn(self.rw if rng.random() < 0.5 else self.ro, 10)
                try:
                    c.sock.sendall(line)
                    self.count("bad-ids")
                    try:
                        rep = c.read(30)
                    except ValueError as exc:
                        self.fail(f"{what}: the reply is not JSON: {exc}")
                        continue
                    if rep is None:
                        self.count("bad-id-closes")
                        continue
                    self.check_reply(rep, what)
                    if rep.get("ok") is not False or rep["error"].get("code") != "bad-request":
                        self.fail(f"{what}: expected bad-request, got {str(rep)[:200]}")
                    elif not c.call("ping", timeout=30).get("ok"):
                        self.fail(f"{what}: the next ping on the connection failed")
                finally:
                    c.close()
            except (OSError, ConnectionError, TimeoutError, ValueError) as exc:
                if not self.excused():
                    self.fail(f"{what}: {type(exc).__name__}: {exc}")
            finally:
                self.clients.leave()

    def check_decoy(self) -> None:
        """The root file that symlink swaps pointed the log at is untouched."""
        try:
            st = os.lstat(self.decoy)
            text = self.decoy.read_text()
        except OSError as exc:
            self.fail(f"decoy {self.decoy}: {exc}")
            return
        if text != self.decoy_text:
            self.fail(f"the decoy {self.decoy} was written through a symlink swap: {text[-200:]!r}")
        if (st.st_uid, st.st_mode & 0o7777, st.st_nlink) != (0, 0o644, 1):
            self.fail(f"the decoy {self.decoy} changed: uid {st.st_uid} mode {st.st_mode:o} links {st.st_nlink}")

    def reexecer(self) -> None:
        rng = random.Random(self.rng.random() + 7)
        while self.running():
            end = time.monotonic() + rng.uniform(0.6, 1.4) * self.a.reexec_every
            while self.running() and time.monotonic() < end:
                time.sleep(0.1)
            if not self.running() or not self.mutators.enter(self.running):
                return
            try:
                self.reexec()
            finally:
                self.mutators.leave()

    def reexec(self) -> None:
        """SIGUSR1 to the daemon; it must serve again within REEXEC_LIMIT s (the
        new image is checked in a child first: seconds on a loaded machine).
        Until then, and 5 s more, the clients' connection errors are expected."""
        t0 = self.last_reexec = time.monotonic()
        self.reexec_until = 1e18
        try:
            os.kill(self.proc.pid, signal.SIGUSR1)
            self.count("reexecs")
        except OSError as exc:
            self.fail(f"re-exec: {exc}")
        end = time.monotonic() + REEXEC_LIMIT
        while time.monotonic() < end:
            try:
                c = Conn(self.rw, 2)
                ok = c.call("ping", timeout=5).get("ok")
                c.close()
                if ok:
                    break
            except (OSError, TimeoutError, ConnectionError, ValueError):
                time.sleep(0.02)
        else:
            self.fail(f"not serving again within {REEXEC_LIMIT:g} s of a re-exec")
        self.reexec_until = time.monotonic()
        with self.lock:
            self.reexec_worst = max(self.reexec_worst, self.reexec_until - t0)

    def crasher(self) -> None:
        """SIGKILLs the supervisor every `--crash-every` s (about) and starts a new one."""
        rng = random.Random(self.rng.random() + 19)
        while self.running():
            end = time.monotonic() + rng.uniform(0.6, 1.4) * self.a.crash_every
            while self.running() and time.monotonic() < end:
                time.sleep(0.1)
            if not self.running():
                return
            try:
                self.crash(rng.uniform(0.3, self.a.crash_down), amid=rng.random() < self.a.crash_amid)
            except Exception as exc:  # no daemon to go on with: end the chaos
                self.fail(f"crash {self.stats['crashes']}: {type(exc).__name__}: {exc}")
                log(self.err_tail())
                self.stop_event.set()
                return

    def crash(self, down: float, amid: bool) -> None:
        """One supervisor SIGKILL, checked strictly.

        Unless `amid`, the actors that change services (killer, storms,
        re-execs) are held first, until every service is settled; the snapshot
        taken then must hold after the crash: each running service runs on with
        the same pid, each stopped one stays stopped (see `held_down`), and
        enabled stays as it was.  `amid`: the SIGKILL lands amid the storms
        (starts, stops, respawns under way), and those actors are held right
        after it; then each service's state must match its processes once the
        new daemon has settled (no duplicate, no orphan of a start the dead
        daemon had under way).  Meanwhile the clients go on and meet a dead
        socket (their errors are counted apart); they are held too just before
        the new daemon starts, so that the baseline for fds and RSS, taken on
        the new process, holds no client's connection (as at the start)."""
        k = self.stats["crashes"] + 1
        st0: dict[str, dict] = {}
        held: set[str] = set()
        if not amid and not self.mutators.close(180):
            self.fail(f"crash {k}: the chaos actors did not pause within 180 s")
        try:
            if not amid:
                st0 = self.settled(60)
                self.check_state(st0, f"before crash {k}", enabled=False)
                held = self.held_down(st0)
            self.crash_window = (time.monotonic(), 1e18)
            before = time.time()
            self.proc.kill()
            after = time.time()
            self.kills_at.append((before, after))
            self.count("crashes")
            self.proc.wait(30)
            if amid:
                self.count("crashes-amid")
                self.adopted |= {p.pid for n, ps in self.marked().items() if n in self.services for p in ps}
                if not self.mutators.close(180):
                    self.fail(f"crash {k}: the chaos actors did not pause within 180 s")
            self.adopted |= {s["pid"] for s in st0.values() if s["state"] == "running"}
            time.sleep(down)  # the clients meet a dead socket meanwhile
            if not self.clients.close(180):
                self.fail(f"crash {k}: the clients did not pause within 180 s")
            try:
                self.start_daemon()
                st1 = self.settled(60)
                for name, s0 in st0.items():
                    s1 = st1.get(name, {})
                    was = (s0["state"], s0.get("pid"), s0.get("enabled"))
                    now = (s1.get("state"), s1.get("pid"), s1.get("enabled"))
                    if s0["state"] == "stopped" and s0.get("enabled") and name not in held:
                        # Stopped, but not by an operator's stop (a restart whose start was
                        # refused, a requirement stopped and started again) nor held down by
                        # a requirement: only `stop` and `disable` are remembered, so the new
                        # daemon's autostart starts it, as after a clean restart.
                        if now[0] != "running" or now[2] is not True:
                            self.fail(f"crash {k}: {name} was stopped (not held down by an operator's stop), "
                                      f"enabled: autostart should have started it; after the recovery {now}")
                        self.count("stopped-started-at-crashes")
                    elif now != was:
                        self.fail(f"crash {k} ({down:.1f} s down): {name} was (state, pid, enabled) {was}, "
                                  f"after the recovery {now}")
                self.check_state(st1, f"after crash {k}", enabled=False)
                cold = self.warm_up()
                log(f"crash {k}: supervisor SIGKILLed{' amid the storms' if amid else ''}, {down:.1f} s down, "
                    f"new daemon pid {self.proc.pid}: "
                    f"{sum(s1['state'] == 'running' and s1['pid'] in self.adopted for s1 in st1.values())} "
                    f"services adopted; "
                    f"for the baseline, all started and {len(cold)} restarted: {' '.join(cold)}")
                self.take_baseline(f"after crash {k}")
            finally:
                self.clients.open()
        finally:
            self.crash_window = (self.crash_window[0], time.monotonic())
            self.mutators.open()
        # The clients reconnect: the dashboard's next poll is answered by the new daemon.
        polls, end = self.stats["polls"], time.monotonic() + 30
        while self.running() and self.stats["polls"] <= polls:
            if time.monotonic() > end:
                self.fail(f"crash {k}: the dashboard got no reply from the new daemon within 30 s")
                break
            time.sleep(0.1)

    def warm_up(self) -> list[str]:
        """Before a baseline on a new daemon: as at the start, every service enabled
        and running, and every log file open (an adopted service opens it at its
        next line: those that have printed nothing yet are restarted).  The
        services that print run on as adopted ones, to the end if the chaos
        spares them.  Returns the restarted services."""
        c = Conn(self.rw, 30)
        try:
            for rep in c.replies([c.send("enable", name) for name in self.services], 60).values():
                self.check_reply(rep, "warm-up enable")
            for rep in c.replies([c.send("start", name) for name in self.services], 120).values():
                self.check_reply(rep, "warm-up start")
        finally:
            c.close()
        time.sleep(1)
        self.wait_quiet(60)
        held = set()
        for fd in os.listdir(f"/proc/{self.proc.pid}/fd"):
            try:
                held.add(os.readlink(f"/proc/{self.proc.pid}/fd/{fd}"))
            except OSError:
                pass
        # swap0's log may be a symlink of the swapper's at any time: refused, not held
        cold = [n for n in self.services if n != "swap0" and str(self.log_dir / f"{n}.log") not in held]
        if cold:
            c = Conn(self.rw, 30)
            try:
                for rep in c.replies([c.send("restart", name) for name in cold], 120).values():
                    self.check_reply(rep, "warm-up restart")
            finally:
                c.close()
            self.wait_quiet(60)
        return cold

    def held_down(self, st: dict[str, dict]) -> set[str]:
        """The services that a new daemon must leave stopped, from the records in the
        state directory (what it reads) and the status: those an operator stopped
        (`intent = "down"`; docs/configuration.md, `state-dir`), the disabled ones
        that are stopped, and whatever requires them (it cannot start)."""
        down = {n for n, s in st.items() if s["state"] == "stopped" and not s.get("enabled", True)}
        records = read_records(self.tmp / "state" / "services")
        down |= {name for name in self.services if records.get(name, {}).get("intent") == "down"}
        changed = True
        while changed:
            changed = False
            for name, svc in self.services.items():
                if name not in down and any(r in down for r in svc.get("requires", [])):
                    down.add(name)
                    changed = True
        return down

    def settled(self, timeout: float) -> dict[str, dict]:
        """The status once nothing is in transition and two looks 0.6 s apart
        (longer than any respawn delay here) agree."""
        prev = None
        end = time.monotonic() + timeout
        st: dict[str, dict] = {}
        while time.monotonic() < end:
            st = self.wait_quiet(max(1.0, end - time.monotonic()))
            key = {n: (s["state"], s.get("pid"), s.get("enabled")) for n, s in st.items()}
            if key == prev:
                return st
            prev = key
            time.sleep(0.6)
        self.fail(f"services did not settle within {timeout:g} s")
        return st

    def take_baseline(self, when: str) -> None:
        """The daemon's fds and RSS, once settled with no client connected and
        its bounded caches full: what the end is measured against (taken
        again on each new daemon process)."""
        self.fill_caches()
        time.sleep(1)
        self.wait_quiet(30)
        d = self.daemon()
        fds = []
        for _ in range(3):  # a ping of a hostile actor may be under way: the least of three looks
            fds.append(d.num_fds())
            time.sleep(0.1)
        self.fd0 = min(fds)
        self.rss0 = d.memory_info().rss
        self.fd_kinds0 = _fd_summary(d.pid, True)
        self.maps0 = _maps(d.pid)
        self.samples = []
        log(f"baseline {when}: daemon pid {d.pid}, fds {self.fd0}, rss {self.rss0 / 2**20:.1f} MiB")

    def fill_caches(self) -> None:
        """Fill the daemon's bounded caches, as they are after the chaos: a new
        image starts with them empty, and their size is no leak (about 2.5 MiB,
        7 % of the RSS here).  The replay of the last MAX_REPLAY state events
        (`disable` and `enable` of sleep0: events, no process), and the log hub's
        last HUB_LINES lines (the counters print them: a few seconds)."""
        c = Conn(self.rw, 30)
        try:
            left = MAX_REPLAY // 2 + 1
            while left > 0:
                ids = []
                for _ in range(min(30, left)):
                    ids += [c.send("disable", "sleep0"), c.send("enable", "sleep0")]
                left -= len(ids) // 2
                for rep in c.replies(ids, 60).values():
                    self.check_reply(rep, "baseline: events")
            end = time.monotonic() + 120
            while time.monotonic() < end:
                i = c.send("log", None, [HUB_LINES])
                rep = c.replies([i], 60)[i]
                if len(rep.get("result", {}).get("lines", [])) >= HUB_LINES:
                    return
                time.sleep(0.5)
            self.fail(f"the daemon's log hub did not reach {HUB_LINES} lines within 120 s")
        finally:
            c.close()

    def sampler(self) -> None:
        """The daemon's RSS and fd count at least 8 times during the chaos (every
        15 s at most): the high-water mark, and the series shown on failure."""
        self.samples: list[tuple[float, float, int]] = []
        t0 = time.monotonic()
        interval = min(15.0, max(1.0, self.a.minutes * 60 / 8))
        while self.running():
            try:
                d = self.daemon()
                self.samples.append((time.monotonic() - t0, d.memory_info().rss / 2**20, d.num_fds()))
            except psutil.Error:
                pass
            end = time.monotonic() + interval
            while self.running() and time.monotonic() < end:
                time.sleep(0.2)

    last_reexec = reexec_until = -1e9
    reexec_worst = 0.0

    def excused(self) -> bool:
        """Whether a client's connection error is expected: within 5 s of a
        re-exec, or from a supervisor SIGKILL to 5 s after its checks (those are
        counted apart)."""
        now = time.monotonic()
        if self.crash_window[0] <= now <= self.crash_window[1] + 5:
            self.count("client-errors-at-crashes")
            return True
        return self.last_reexec <= now <= self.reexec_until + 5

    # ---- the run ---------------------------------------------------------------------------------

    def run(self) -> int:
        a = self.a
        t_start = time.monotonic()
        self.start_daemon()
        self.wait_quiet(60)
        time.sleep(1)
        d = self.daemon()
        try:
            c = Conn(self.rw)
            rep = c.call("reexec", "root", timeout=30)
            c.close()
            self.reexec_supported = not (not rep.get("ok") and rep["error"]["code"] == "unsupported")
            if a.no_reexec and self.reexec_supported:
                log("re-exec supported, but --no-reexec: only the probe re-exec happens")
        except (OSError, ConnectionError, TimeoutError) as exc:
            self.fail(f"reexec probe: {exc}")
        if self.reexec_supported:
            self.last_reexec = self.reexec_until = time.monotonic()
            time.sleep(1)
            self.wait_quiet(30)  # the baseline is a re-exec'd daemon
        # Warm: a restart of every service has the daemon open each log file, as it holds
        # them after the chaos (a re-exec'd daemon opens them again at the next line).
        self.restart_all()
        self.take_baseline("at the start")
        log(f"daemon pid {d.pid}: {len(self.services)} services, "
            f"re-exec {'supported' if self.reexec_supported else 'unsupported'}, "
            f"{f'supervisor SIGKILLs every {a.crash_every:g} s' if a.crash_every else 'no supervisor SIGKILLs'}; "
            f"chaos for {a.minutes:g} min")

        self.deadline = time.monotonic() + a.minutes * 60
        threads = [threading.Thread(target=self.killer, daemon=True),
                   threading.Thread(target=self.sampler, daemon=True),
                   threading.Thread(target=self.dashboard, daemon=True),
                   threading.Thread(target=self.subscriber, daemon=True),
                   threading.Thread(target=self.misbehaver, daemon=True)]
        threads += [threading.Thread(target=self.storm, args=(k,), daemon=True) for k in range(a.clients)]
        threads.append(threading.Thread(target=self.bad_ids, daemon=True))
        if self.hostile:
            threads += [threading.Thread(target=f, daemon=True)
                        for f in (self.squatter, self.swapper, self.notify_flooder)]
        else:
            log("not root or no python3 that user nobody can run: no squatter, symlink swaps or notify flood")
        if self.reexec_supported and not a.no_reexec:
            threads.append(threading.Thread(target=self.reexecer, daemon=True))
        if a.crash_every:
            threads.append(threading.Thread(target=self.crasher, daemon=True))
        for t in threads:
            t.start()
        while time.monotonic() < self.deadline and not self.stop_event.is_set():
            time.sleep(0.5)
            if self.proc.poll() is not None and not self.crash_window[0] <= time.monotonic() <= self.crash_window[1]:
                self.fail(f"daemon exited with {self.proc.returncode} during the chaos")
                break
        self.stop_event.set()
        for t in threads:
            t.join(180)
            if t.is_alive():
                self.fail(f"a chaos thread ({t.name}) did not finish within 180 s of the end")
        if self.proc.poll() is None:
            self.final_checks(self.fd0, self.rss0)
        self.elapsed = time.monotonic() - t_start
        return self.verdict()

    def restart_all(self) -> None:
        c = Conn(self.rw, 30)
        try:
            ids = [c.send("restart", name) for name in self.services]
            for rep in c.replies(ids, 120).values():
                self.check_reply(rep, "warm-up restart")
        finally:
            c.close()
        self.wait_quiet(60)

    def wait_quiet(self, timeout: float) -> dict[str, dict]:
        end = time.monotonic() + timeout
        st: dict[str, dict] = {}
        while time.monotonic() < end:
            try:
                st = self.status(10)
            except (OSError, ConnectionError, TimeoutError, RuntimeError):
                time.sleep(0.1)
                continue
            if all(s["state"] in ("running", "stopped") for s in st.values()):
                return st
            time.sleep(0.1)
        busy = {n: s["state"] for n, s in st.items() if s["state"] not in ("running", "stopped")}
        self.fail(f"services still busy after {timeout:g} s: {busy}")
        return st

    def final_checks(self, fd0: int, rss0: int) -> None:
        # Quiesce: every service enabled and started, as at the beginning.
        c = Conn(self.rw, 30)
        try:
            for name in self.services:
                self.check_reply(c.call("enable", name, 30), "final enable")
            ids = [c.send("start", name) for name in self.services]
            for rep in c.replies(ids, 120).values():
                self.check_reply(rep, "final start")
                if not rep["ok"]:
                    self.fail(f"final start: {rep['error']}")
        finally:
            c.close()
        time.sleep(2)
        st = self.wait_quiet(60)
        self.check_state(st, "after restart of all")
        # Part of the services stopped, to check that side too.
        stopped = [n for n in self.services if n.startswith("sleep")][::2]
        c = Conn(self.rw, 30)
        try:
            for name in stopped:
                self.check_reply(c.call("stop", name, 60), "final stop")
        finally:
            c.close()
        st = self.wait_quiet(60)
        self.check_state(st, "after stopping some")
        c = Conn(self.rw, 30)
        try:
            for name in stopped:
                self.check_reply(c.call("start", name, 60), "final start")
        finally:
            c.close()
        time.sleep(2)
        self.wait_quiet(60)
        # Resources: all my connections are closed; give the daemon a moment to notice.
        d = self.daemon()
        end = time.monotonic() + 15
        while True:
            fd1, rss1 = d.num_fds(), d.memory_info().rss
            zombies = [p.pid for p in d.children() if _status(p) == psutil.STATUS_ZOMBIE]
            ok = (fd1 <= fd0 * (1 + RETURN_TOLERANCE) and rss1 <= rss0 * (1 + RETURN_TOLERANCE)
                  and not zombies)
            if ok or time.monotonic() > end:
                break
            time.sleep(0.5)
        self.fds, self.rss = (fd0, fd1), (rss0, rss1)
        log(f"daemon fds {fd0} -> {fd1}, rss {rss0 / 2**20:.1f} -> {rss1 / 2**20:.1f} MiB "
            f"(resident MiB by mapping: {self.maps0} -> {_maps(d.pid)}) "
            f"(fds now: {_fd_summary(d.pid, True)}; at the baseline: {self.fd_kinds0})")
        if fd1 > fd0 * (1 + RETURN_TOLERANCE):
            self.fail(f"daemon fds {fd0} -> {fd1} (more than {RETURN_TOLERANCE:.0%} up): now {_fd_summary(d.pid, True)}; "
                      f"at the baseline {self.fd_kinds0}")
        if rss1 > rss0 * (1 + RETURN_TOLERANCE):
            series = " ".join(f"{t:.0f}s:{r:.0f}" for t, r, _ in getattr(self, "samples", []))
            self.fail(f"daemon RSS {rss0 / 2**20:.1f} -> {rss1 / 2**20:.1f} MiB (more than "
                      f"{RETURN_TOLERANCE:.0%} up; MiB during the chaos: {series})")
        if zombies:
            self.fail(f"zombie children of the daemon: {zombies}")
        if self.hostile:
            self.check_decoy()
        # Orderly shutdown.
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(60)
            if rc != 0:
                self.fail(f"daemon exited {rc} on SIGTERM")
        except subprocess.TimeoutExpired:
            self.fail("daemon did not exit within 60 s of SIGTERM")
        time.sleep(0.5)
        left = {n: [p.pid for p in ps] for n, ps in self.marked().items() if ps}
        if left:
            self.fail(f"service or actor processes left after SIGTERM: {left}")
        strays = self.strays()
        if strays:
            self.fail(f"processes left after SIGTERM (the keeper?): {strays}")
        # Every counter has stopped and the daemon has drained their pipes: now the logs are complete.
        self.check_logs()
        self.check_daemon_log()

    def strays(self) -> list[str]:
        """Processes other than this one that name our work or socket directory (the
        daemon, its keeper) in their command line."""
        mine = (str(self.tmp), str(self.sockdir))
        out = []
        for p in psutil.process_iter(["pid", "cmdline", "status"]):
            cmd = " ".join(p.info.get("cmdline") or [])
            if p.pid != os.getpid() and p.info.get("status") != psutil.STATUS_ZOMBIE and any(m in cmd for m in mine):
                out.append(f"{p.pid} {cmd[:120]}")
        return out

    def check_state(self, st: dict[str, dict], when: str, enabled: bool = True) -> None:
        """Each service's state matches its processes; running ones are children of
        the daemon, or were left behind by a crashed one (adopted); with `enabled`,
        every service is enabled."""
        marked = self.marked()
        dpid = self.proc.pid
        for name in self.services:
            s = st.get(name)
            procs = marked.get(name, [])
            if s is None:
                self.fail(f"{when}: {name} missing from status")
                continue
            if s["state"] == "running":
                if len(procs) != 1:
                    self.fail(f"{when}: {name} running (pid {s['pid']}) but {len(procs)} live processes: "
                              f"{[p.pid for p in procs]}")
                elif procs[0].pid != s["pid"]:
                    self.fail(f"{when}: {name} status pid {s['pid']} but the live process is {procs[0].pid}")
                else:
                    try:
                        if procs[0].ppid() != dpid and s["pid"] not in self.adopted:
                            self.fail(f"{when}: {name} pid {s['pid']} is not a child of the daemon "
                                      f"nor adopted after a crash")
                    except psutil.Error:
                        pass
            elif s["state"] == "stopped":
                if procs:
                    self.fail(f"{when}: {name} stopped but processes live: {[p.pid for p in procs]}")
            else:
                self.fail(f"{when}: {name} is {s['state']}")
            if enabled and not s.get("enabled", True):
                self.fail(f"{when}: {name} still disabled after enable")

    def check_logs(self) -> None:
        lines_total = runs_total = 0
        for name in self.counters:
            seqs: dict[str, list[int]] = defaultdict(list)
            stamps: dict[str, list[float]] = defaultdict(list)
            try:
                text = self.log_text(name)
            except OSError as exc:
                self.fail(f"log of {name}: {exc}")
                continue
            self.rotations = getattr(self, "rotations", 0) + len(list(self.log_dir.glob(f"{name}.log.*")))
            for line in text.splitlines():
                parts = line.split(" ")
                if len(parts) == 5 and parts[2] == "SEQ":
                    try:
                        seqs[parts[3]].append(int(parts[4]))
                        stamps[parts[3]].append(datetime.fromisoformat(parts[0]).timestamp())
                    except ValueError:
                        self.fail(f"log of {name}: garbled line {line!r}")
                elif "SEQ" in line:
                    self.fail(f"log of {name}: garbled line {line!r}")
            for run, ns in seqs.items():
                runs_total += 1
                lines_total += len(ns)
                if ns != list(range(len(ns))) and not self.lost_at_crash(name, run, ns, stamps[run]):
                    missing = sorted(set(range(max(ns) + 1)) - set(ns))
                    dup = [k for k, v in Counter(ns).items() if v > 1]
                    self.fail(f"log of {name}, run {run}: {len(ns)} lines, missing {missing[:10]}"
                              f"{'…' if len(missing) > 10 else ''}, duplicated {dup[:10]}, "
                              f"out of order {ns != sorted(ns)}")
                try:
                    last = int((self.seqdir / f"{run}.seq").read_text().strip() or -1)
                except (OSError, ValueError):
                    last = -1
                if ns and max(ns) < last:
                    self.fail(f"log of {name}, run {run}: ends at {max(ns)} but the process wrote up to {last}")
        seq_runs = {f.stem for f in self.seqdir.glob("*.seq")}
        logged_runs: set[str] = set()
        for name in self.counters:
            try:
                for line in self.log_text(name).splitlines():
                    parts = line.split(" ")
                    if len(parts) == 5 and parts[2] == "SEQ":
                        logged_runs.add(parts[3])
            except OSError:
                pass
        for run in seq_runs - logged_runs:
            try:
                last = int((self.seqdir / f"{run}.seq").read_text().strip() or -1)
            except (OSError, ValueError):
                last = -1
            if last >= 0:
                self.fail(f"run {run} wrote lines 0..{last} but none reached a log file")
        self.log_lines, self.log_runs = lines_total, runs_total

    def lost_at_crash(self, name: str, run: str, ns: list[int], stamps: list[float]) -> bool:
        """Whether every gap in a run's numbers is what a supervisor had in hand
        when it was SIGKILLed (docs/keeper.md, "What can still be lost"): read
        from the pipe, not yet written.  Such a gap lies between a line read
        before that SIGKILL and one read after it (by the keeper or the next
        supervisor), at most one per SIGKILL; nothing is doubled or out of order."""
        if not self.kills_at or ns != sorted(set(ns)) or (ns and ns[0] != 0):
            return False
        slack = 0.05  # the log stamps and our clock are the same wall clock; rounding only
        used: set[int] = set()
        explained = []
        for i in range(1, len(ns)):
            if ns[i] == ns[i - 1] + 1:
                continue
            k = next((k for k, (before, after) in enumerate(self.kills_at) if k not in used
                      and stamps[i - 1] <= after + slack and stamps[i] >= before - slack), None)
            if k is None:
                return False
            used.add(k)
            explained.append((name, run, ns[i - 1] + 1, ns[i] - 1, k + 1))
        self.lost_in_flight += explained
        return True

    def log_text(self, name: str) -> str:
        """The service's log, rotated files first (oldest first)."""
        rotated = sorted(self.log_dir.glob(f"{name}.log.*"), key=lambda p: -int(p.suffix[1:]))
        return "".join(p.read_text(errors="replace") for p in [*rotated, self.log_dir / f"{name}.log"])

    def check_daemon_log(self) -> None:
        bad = []
        try:
            text = "".join(p.read_text(errors="replace") for p in self.stderr_paths)
            for line in text.splitlines():
                try:
                    obj = json.loads(line)
                except ValueError:
                    if "Traceback" in line:
                        bad.append(line[:300])
                    continue
                if isinstance(obj, dict) and str(obj.get("event", "")).startswith("log file not writable"):
                    self.count("log-refusals")
                if isinstance(obj, dict) and ("exception" in obj or obj.get("level") in ("critical",)):
                    bad.append(f"{obj.get('event')}: {str(obj.get('exception', ''))[-300:]}")
        except OSError:
            pass
        if bad:
            self.fail(f"{len(bad)} exception(s) in the daemon's log, first: {bad[0]}")

    def verdict(self) -> int:
        s = self.stats
        fds = getattr(self, "fds", None)
        rss = getattr(self, "rss", None)
        summary = (f"{self.a.minutes:g} min chaos ({getattr(self, 'elapsed', 0):.0f} s in all), "
                   f"{len(self.services)} services, {s['kills']} kills, {s['requests']} requests "
                   f"({s['polls']} polls), {s['reexecs'] if self.reexec_supported else 'no (unsupported)'} re-execs"
                   f"{f' (serving again within {self.reexec_worst:.1f} s)' if s['reexecs'] else ''}, "
                   f"{s['bad-clients']} bad clients, {s['bad-ids']} bad ids ({s['bad-id-closes']} closed)")
        if self.hostile:
            summary += (f", {s['squats']} port squatters, {s['symlink-swaps']} symlink swaps "
                        f"({s['log-refusals']} log opens refused), "
                        f"{s['notify-floods']} notify floods ({s['notify-datagrams']} datagrams), "
                        f"worst ping {self.ping_worst:.2f} s")
        else:
            summary += ", no actors as nobody (not root)"
        if fds and rss:
            high = max((r for _, r, _ in getattr(self, "samples", [])), default=None)
            summary += (f"; fds {fds[0]}->{fds[1]} ({fds[1] / fds[0] - 1:+.0%}), "
                        f"rss {rss[0] / 2**20:.1f}->{rss[1] / 2**20:.1f} MiB ({rss[1] / rss[0] - 1:+.0%},"
                        f" high-water {'n/a' if high is None else f'{high:.1f}'})")
        if hasattr(self, "log_lines"):
            summary += (f"; {self.log_lines} log lines in {self.log_runs} runs gap-free "
                        f"({getattr(self, 'rotations', 0)} rotations)") if not any(
                "log of" in f for f in self.failures) else ""
        if self.a.crash_every:
            lost = sum(last - first + 1 for _, _, first, last, _ in self.lost_in_flight)
            summary += (f"; {s['crashes']} supervisor crashes ({s['crashes-amid']} amid the storms, "
                        f"{s['client-errors-at-crashes']} client errors "
                        f"meanwhile, {lost} lines lost in flight, {s['stopped-started-at-crashes']} stopped "
                        f"services not held down started by the new daemon)")
        dropped = s["storm-connections-dropped"] + s["dashboard-connections-dropped"]
        if dropped:
            summary += f"; {dropped} connections dropped around re-execs and crashes"
        if getattr(self, "samples", None):
            log("daemon rss MiB / fds during the chaos: "
                + " ".join(f"{t:.0f}s:{r:.1f}/{f}" for t, r, f in self.samples))
        for name, run, first, last, k in self.lost_in_flight:
            log(f"lost in flight at supervisor SIGKILL {k}: {name} run {run}, lines {first}..{last}")
        codes = ", ".join(f"{k} {v}" for k, v in self.codes.most_common())
        if codes:
            log(f"error replies: {codes}")
        if self.failures:
            for f in self.failures:
                log(f"FAIL: {f}")
            print(f"soak: FAIL {len(self.failures)} problem(s), first: {self.failures[0]} [{summary}]", flush=True)
            return 1
        print(f"soak: PASS {summary}", flush=True)
        return 0

    def cleanup(self) -> None:
        for a in self.actors:
            if a.poll() is None:
                a.kill()
            try:
                a.communicate(timeout=10)
            except (subprocess.TimeoutExpired, OSError, ValueError):
                pass
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for ps in self.marked().values():
            for p in ps:
                try:
                    p.kill()
                except psutil.Error:
                    pass
        for stray in self.strays():  # the keeper (of a crashed daemon too)
            try:
                os.kill(int(stray.split()[0]), signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(self.sockdir, ignore_errors=True)
        if self.hostile:
            shutil.rmtree(self.swapdir, ignore_errors=True)
        if not self.a.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            log(f"kept {self.tmp}")


def _tail(pattern: Path, n: int = 400) -> str:
    texts = [f.read_text(errors="replace") for f in sorted(pattern.parent.glob(pattern.name))]
    return " | ".join(t[-n:] for t in texts if t.strip())[-n:]


def _status(p: psutil.Process) -> str:
    try:
        return p.status()
    except psutil.Error:
        return "gone"


def _maps(pid: int) -> str:
    """The daemon's resident memory by mapping (heap, anonymous, files), in MiB."""
    return ", ".join(f"{k} {v / 1024:.1f}" for k, v in smaps(pid).items() if v >= 512)


def _fd_summary(pid: int, files: bool = False) -> str:
    kinds: Counter[str] = Counter()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            kinds[target.split(":")[0] if ":" in target else target if files else "file"] += 1
    except OSError:
        pass
    return ", ".join(f"{k} {v}" for k, v in kinds.most_common())


def main() -> int:
    p = argparse.ArgumentParser(description="Bounded chaos run against the supervisor, then invariant checks.")
    p.add_argument("--minutes", type=float, default=10.0, help="length of the chaos phase (default 10)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--clients", type=int, default=8, help="storm clients (default 8)")
    p.add_argument("--counters", type=int, default=8, help="counter services (default 8)")
    p.add_argument("--sleepers", type=int, default=6, help="sleep services (default 6)")
    p.add_argument("--reexec-every", type=float, default=15.0, help="seconds between re-execs (about)")
    p.add_argument("--no-reexec", action="store_true", help="no re-execs (to tell their faults from others)")
    p.add_argument("--crash-every", type=float, default=20.0,
                   help="seconds between supervisor SIGKILLs (about; 0: none; default 20)")
    p.add_argument("--crash-amid", type=float, default=0.5,
                   help="the share of SIGKILLs that land amid the storms, not in a settled moment (default 0.5)")
    p.add_argument("--crash-down", type=float, default=3.0,
                   help="longest time without a supervisor after a SIGKILL (default 3 s)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs) for a look")
    a = p.parse_args()
    if a.seed is None:
        a.seed = random.randrange(10**6)
    log(f"seed {a.seed}")
    s = Soak(a)

    def on_term(signum, frame):  # noqa: ANN001
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    try:
        return s.run()
    except KeyboardInterrupt:
        print("soak: FAIL interrupted", flush=True)
        return 1
    except Exception as exc:  # a harness error is a failure, with what happened
        s.fail(f"harness: {type(exc).__name__}: {exc}")
        log(s.err_tail())
        return s.verdict()
    finally:
        s.cleanup()


if __name__ == "__main__":
    sys.exit(main())
