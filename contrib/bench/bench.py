"""Benchmarks: our supervisor against supervisord, circus, s6 and runit.

Run through `contrib/bench/run`, which installs the peers first.  Every
system supervises N `sleep` services (N = 10, 100, 1000); the systems take
turns, cell by cell, for several rounds, and the report gives medians and
our/peer ratios (RESULTS.md) and a plot (results.png).

Each `sleep` gets a unique number as its argument, so the bench recognises a
system's services (and each service) by their command line, with no help from
the system under test.  Everything the bench starts, it stops; services left
behind by a system are killed and reported.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from collections import defaultdict
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CACHE = Path(os.environ.get("BENCH_CACHE", ROOT / ".cache" / "bench"))
# Ours as installed by `run` (a regular install, not the editable one of .venv).
OURS_VENV = Path(os.environ.get("BENCH_OURS", CACHE / "venv-ours"))
OURS_PY = OURS_VENV / "bin" / "python"
OURS_HERD = OURS_VENV / "bin" / "herd"
SV_VENV = CACHE / "venv-supervisord"
CIRCUS_VENV = CACHE / "venv-circus"
SLEEP = shutil.which("sleep") or "/bin/sleep"
INFRA = {"s6-svscan", "s6-supervise", "runsvdir", "runsv", "supervisord", "circusd"}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# /proc helpers (cheap: the bench must not steal much CPU from what it measures)


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    out.extend(int(x) for x in f.read().split())
            except OSError:
                pass
    except OSError:
        pass
    return out


def cmdline(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return raw.decode(errors="replace").split("\0")[:-1] if raw else []


def proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (after the command name)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()


def alive(pid: int) -> bool:
    st = proc_stat(pid)
    return st is not None and st[0] != "Z"


def start_stack(pid: int) -> int:
    st = proc_stat(pid)
    return int(st[25]) if st else 0  # field 28: changes at each exec (ASLR)


class Services:
    """Finds a system's `sleep` services below its root process."""

    def __init__(self, base: int, n: int) -> None:
        self.base, self.n = base, n
        self.infra: dict[int, list[str]] = {}

    def index(self, cmd: list[str] | None) -> int | None:
        if cmd and len(cmd) >= 2 and os.path.basename(cmd[0]) == "sleep" and cmd[1].isdigit():
            i = int(cmd[1]) - self.base
            if 0 <= i < self.n:
                return i
        return None

    def arg(self, i: int) -> str:
        return str(self.base + i)

    def walk(self, root: int, known: dict[int, int] | None = None) -> tuple[dict[int, int], list[int]]:
        """({service index: pid}, [the system's own processes]) below ``root``.

        ``known`` (pid -> index from an earlier walk) saves re-reading command
        lines of services already found (a pid stays a `sleep` until it dies).
        """
        found: dict[int, int] = {}
        own: list[int] = []
        stack: list[tuple[int, list[str] | None]] = [(root, None)]
        while stack:
            pid, parent_cmd = stack.pop()
            if known and pid in known and pid != root:
                found[known[pid]] = pid
                continue
            if pid in self.infra:
                # Known to be the system's own; its command line is read again (it may have
                # been cached before its exec, and runsvdir rewrites its own as a log), since
                # its children are told apart from forks of it by comparing with it.
                own.append(pid)
                fresh = cmdline(pid)
                if fresh is None:
                    continue
                stack.extend((c, fresh) for c in children(pid))
                continue
            cmd = cmdline(pid)
            if cmd is None:
                continue
            i = self.index(cmd)
            if i is not None:
                found[i] = pid
                continue
            # A supervisor's own process is remembered (no more reads), unless it may be a
            # fork that has not exec'd its service yet (same command line as its parent).
            if cmd and os.path.basename(cmd[0]) in INFRA and cmd != parent_cmd:
                self.infra[pid] = cmd
            own.append(pid)
            stack.extend((c, cmd) for c in children(pid))
        return found, own

    def scan_all(self) -> dict[int, int]:
        """Every live service process of this system anywhere (for cleanup)."""
        out: dict[int, int] = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                i = self.index(cmdline(int(name)))
                if i is not None and alive(int(name)):
                    out[int(name)] = i
        return out


# --------------------------------------------------------------------------
# The systems


class System:
    name = "?"
    graph_capable = False

    def __init__(self, workdir: Path, n: int, base: int, graph: bool = False) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.n = n
        self.graph = graph
        self.svc = Services(base, n)
        self.proc: subprocess.Popen | None = None
        self.out = None
        self.write_config()

    def sname(self, i: int) -> str:
        return f"s{i:05d}"

    # to override
    def write_config(self) -> None: ...
    def argv(self) -> list[str]: ...
    def env(self) -> dict[str, str]:
        return dict(os.environ)
    def ready(self) -> bool:
        """The system's own view: every service running."""
        return True
    def status_cli(self) -> list[str]: ...
    def poll_target(self) -> tuple[str, str]:
        """(python to run the poll worker with, target argument)."""
        ...
    def request_stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    # common
    def start(self) -> None:
        self.out = open(self.dir / "daemon.log", "wb")
        self.proc = subprocess.Popen(self.argv(), env=self.env(), cwd=self.dir, stdin=subprocess.DEVNULL,
                                     stdout=self.out, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cleanup(self) -> list[str]:
        """Kill whatever is left; returns complaints."""
        problems = []
        if self.proc is not None:
            _, own = self.svc.walk(self.pid)
            if self.proc.poll() is None:
                problems.append(f"{self.name}: supervisor still running at cleanup")
                for pid in own:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    problems.append(f"{self.name}: supervisor does not die")
        deadline = time.monotonic() + 5  # runsv / s6-supervise exit after their service: give them time
        while self.strays() and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in self.strays():
            problems.append(f"{self.name}: supervision process {pid} left behind; killed")
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        left = self.svc.scan_all()
        if left:
            problems.append(f"{self.name}: {len(left)} service processes left behind; killed")
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        if self.out:
            self.out.close()
        return problems


    def strays(self) -> list[int]:
        """Processes of the supervision tree still running from this system's directory."""
        out = []
        mine = str(self.dir)
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            pid = int(name)
            cmd = cmdline(pid)
            if not cmd or os.path.basename(cmd[0]) not in INFRA | {"python", "python3"} or not alive(pid):
                continue
            try:
                cwd = os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                cwd = ""
            if cwd.startswith(mine) or any(mine in c for c in cmd):
                out.append(pid)
        return out


class Ours(System):
    name = "ours"
    graph_capable = True

    def write_config(self) -> None:
        self.sock = Path(tempfile.mkdtemp(prefix="bench-", dir="/tmp"))
        self.rw, self.ro = self.sock / "rw.sock", self.sock / "ro.sock"
        lines = []
        level = max(1, self.n // 10)
        for i in range(self.n):
            lines.append(f"[services.{self.sname(i)}]")
            lines.append(f'command = ["{SLEEP}", "{self.svc.arg(i)}"]')
            lines.append("respawn-delay = 0")
            if self.graph and i >= level:
                lines.append(f'requires = ["{self.sname(i - level)}"]')
            lines.append("")
        (self.dir / "init.toml").write_text("\n".join(lines))

    def argv(self) -> list[str]:
        return [str(OURS_PY), "-m", "supervisor", "-c", str(self.dir / "init.toml"), "-s", str(self.rw),
                "--status-socket", str(self.ro), "--state-dir", str(self.dir / "state"),
                "--log-dir", str(self.dir / "log"), "--log-format", "json", "--log-level", "warning"]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)  # the installed package, not the source tree
        env.pop("NOTIFY_SOCKET", None)
        return env

    def call(self, action: str, service: str | None = None, ro: bool = True, timeout: float = 10) -> dict:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(str(self.ro if ro else self.rw))
            f = s.makefile("rb")
            json.loads(f.readline())  # hello
            req: dict[str, Any] = {"id": 1, "action": action}
            if service:
                req["service"] = service
            s.sendall(json.dumps(req).encode() + b"\n")
            while True:
                obj = json.loads(f.readline())
                if "event" not in obj:
                    return obj
        finally:
            s.close()

    def ready(self) -> bool:
        try:
            rep = self.call("status")
        except (OSError, ValueError):
            return False
        svcs = rep.get("result", {}).get("services", [])
        return len(svcs) == self.n and all(s["state"] == "running" for s in svcs)

    def status_cli(self) -> list[str]:
        return [str(OURS_HERD), "-s", str(self.rw), "status"]

    def poll_target(self) -> tuple[str, str]:
        return sys.executable, str(self.ro)

    def cleanup(self) -> list[str]:
        problems = super().cleanup()
        shutil.rmtree(self.sock, ignore_errors=True)
        return problems


class OursGraph(Ours):
    name = "ours-graph"


class OursNoCgroups(Ours):
    """Ours tracking processes without cgroups: what a cgroup per service costs."""
    name = "ours-nocg"

    def argv(self) -> list[str]:
        return [*super().argv(), "--no-cgroups"]


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=30)
        self.upath = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(self.upath)


class Supervisord(System):
    name = "supervisord"

    def write_config(self) -> None:
        d = self.dir
        (d / "logs").mkdir(exist_ok=True)
        self.sockpath = d / "supervisor.sock"
        lines = [
            "[unix_http_server]", f"file={self.sockpath}", "",
            "[supervisord]", "nodaemon=true", f"logfile={d}/supervisord.log", f"pidfile={d}/supervisord.pid",
            f"childlogdir={d}/logs", "",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface", "",
            "[supervisorctl]", f"serverurl=unix://{self.sockpath}", "",
        ]
        for i in range(self.n):
            lines += [f"[program:{self.sname(i)}]", f"command={SLEEP} {self.svc.arg(i)}",
                      "autorestart=true", "startsecs=0", ""]
        self.conf = d / "supervisord.conf"
        self.conf.write_text("\n".join(lines))

    def argv(self) -> list[str]:
        return [str(SV_VENV / "bin" / "supervisord"), "-c", str(self.conf)]

    def ready(self) -> bool:
        try:
            c = _UnixHTTP(str(self.sockpath))
            c.request("POST", "/RPC2", body=xmlrpc.client.dumps((), "supervisor.getAllProcessInfo").encode(),
                      headers={"Content-Type": "text/xml"})
            (info,), _ = xmlrpc.client.loads(c.getresponse().read())
            c.close()
        except (OSError, xmlrpc.client.Error, http.client.HTTPException, ValueError):
            return False
        return len(info) == self.n and all(p["statename"] == "RUNNING" for p in info)

    def status_cli(self) -> list[str]:
        return [str(SV_VENV / "bin" / "supervisorctl"), "-c", str(self.conf), "status"]

    def poll_target(self) -> tuple[str, str]:
        return sys.executable, str(self.sockpath)


class Circus(System):
    name = "circus"

    def write_config(self) -> None:
        d = self.dir
        self.endpoint = f"ipc://{d}/ctrl.sock"
        lines = ["[circus]", f"endpoint = {self.endpoint}", f"pubsub_endpoint = ipc://{d}/pub.sock",
                 "statsd = false", "warmup_delay = 0", ""]
        for i in range(self.n):
            lines += [f"[watcher:{self.sname(i)}]", f"cmd = {SLEEP}", f"args = {self.svc.arg(i)}",
                      "numprocesses = 1", "warmup_delay = 0", ""]
        self.conf = d / "circus.ini"
        self.conf.write_text("\n".join(lines))

    def argv(self) -> list[str]:
        return [str(CIRCUS_VENV / "bin" / "circusd"), str(self.conf)]

    def ready(self) -> bool:
        try:
            from circus.client import CircusClient
            c = CircusClient(endpoint=self.endpoint, timeout=5)
            res = c.call({"command": "status", "properties": {}})
            c.stop()
        except Exception:
            return False
        st = res.get("statuses", {})
        return len(st) == self.n and all(v == "active" for v in st.values())

    def status_cli(self) -> list[str]:
        return [str(CIRCUS_VENV / "bin" / "circusctl"), "--endpoint", self.endpoint, "status"]

    def poll_target(self) -> tuple[str, str]:
        return str(CIRCUS_VENV / "bin" / "python"), self.endpoint


class _Dirs(System):
    sub = "scan"

    def write_config(self) -> None:
        self.top = self.dir / self.sub
        self.top.mkdir(exist_ok=True)
        self.dirs = []
        for i in range(self.n):
            d = self.top / self.sname(i)
            d.mkdir(exist_ok=True)
            run = d / "run"
            run.write_text(f"#!/bin/sh\nexec {SLEEP} {self.svc.arg(i)}\n")
            run.chmod(0o755)
            self.dirs.append(str(d))
        self.argv_file = self.dir / "status-argv.json"
        self.argv_file.write_text(json.dumps(self.status_cli()))

    def poll_target(self) -> tuple[str, str]:
        return sys.executable, str(self.argv_file)


class S6(_Dirs):
    name = "s6"
    sub = "scan"

    def argv(self) -> list[str]:
        # -c: s6-svscan handles 500 service directories unless told otherwise.
        return ["s6-svscan", "-c", str(max(500, 2 * self.n)), str(self.top)]

    def status_cli(self) -> list[str]:
        # s6-svstat takes one service directory: a full status is one call per service.
        return ["/bin/sh", "-c", 'for d in "$@"; do s6-svstat "$d"; done', "sh", *self.dirs]

    def request_stop(self) -> None:
        subprocess.run(["s6-svscanctl", "-t", str(self.top)], check=False)


class Runit(_Dirs):
    name = "runit"
    sub = "sv"

    def argv(self) -> list[str]:
        return ["runsvdir", "-P", str(self.top)]

    def status_cli(self) -> list[str]:
        return ["sv", "status", *self.dirs]

    def request_stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)  # runsvdir: TERM every runsv, which stops its service


SYSTEMS: dict[str, type[System]] = {c.name: c for c in (Ours, OursGraph, OursNoCgroups, Supervisord, Circus, S6, Runit)}
PEERS = ["supervisord", "circus", "s6", "runit"]


# --------------------------------------------------------------------------
# Scenarios


class Bench:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.work = Path(tempfile.mkdtemp(prefix="bench-", dir=a.workdir))
        self.results: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(list)))
        self.notes: dict[str, dict[str, dict[int, str]]] = defaultdict(lambda: defaultdict(dict))
        self.problems: list[str] = []
        self.counter = 0
        self.rng = random.Random(a.seed)
        self.tag = self.rng.randrange(100, 999)

    def new(self, name: str, n: int, round_: int) -> System:
        self.counter += 1
        base = (self.tag * 1000 + self.counter) * 100000  # unique sleep arguments per system instance
        return SYSTEMS[name](self.work / f"r{round_}-{name}-{n}", n, base, graph=(name == "ours-graph"))

    def record(self, metric: str, system: str, n: int, value: float | None, note: str | None = None) -> None:
        if value is not None:
            self.results[metric][system][n].append(value)
        if note:
            self.notes[metric][system][n] = note

    # ---- building blocks -----------------------------------------------------------------

    def boot(self, s: System, timeout: float = 120) -> float | None:
        t0 = time.perf_counter()
        s.start()
        known: dict[int, int] = {}
        deadline = t0 + timeout
        procs_done = False
        while time.perf_counter() < deadline:
            if s.proc.poll() is not None:
                self.problems.append(f"{s.name} N={s.n}: exited with {s.proc.returncode} during boot")
                return None
            if not procs_done:
                found, _ = s.svc.walk(s.pid, known)
                known = {pid: i for i, pid in found.items()}
                procs_done = len(found) == s.n
            if procs_done and s.ready():
                return time.perf_counter() - t0
            time.sleep(0.005)
        self.problems.append(f"{s.name} N={s.n}: not all running after {timeout} s")
        return None

    def own_procs(self, s: System) -> list[psutil.Process]:
        _, own = s.svc.walk(s.pid)
        out = []
        for pid in own:
            try:
                out.append(psutil.Process(pid))
            except psutil.Error:
                pass
        return out

    def pss(self, s: System) -> float:
        total = 0
        for p in self.own_procs(s):
            try:
                total += p.memory_full_info().pss
            except psutil.Error:
                pass
        return total / 2**20

    def status_cli(self, s: System, runs: int) -> float:
        argv = s.status_cli()
        times = []
        for k in range(runs + 1):
            t0 = time.perf_counter()
            subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                           timeout=300, check=False)
            if k:  # the first call warms the caches
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def status_cli_vs_python(self, s: System, runs: int) -> tuple[float, float, float]:
        """`herd status` and `python -c pass` of herd's interpreter, in turn:
        (median herd, median python, median of the pairwise ratios)."""
        herd, bare = s.status_cli(), [str(OURS_PY), "-c", "pass"]
        times: dict[int, list[float]] = {0: [], 1: []}
        for k in range(runs + 1):
            for which, argv in enumerate((herd, bare)):
                t0 = time.perf_counter()
                subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                               timeout=300, check=False)
                if k:  # the first pair warms the caches
                    times[which].append(time.perf_counter() - t0)
        ratios = [h / b for h, b in zip(times[0], times[1]) if b > 0]
        return statistics.median(times[0]), statistics.median(times[1]), statistics.median(ratios)

    def poll(self, s: System, clients: int, duration: float) -> dict[str, Any] | None:
        py, target = s.poll_target()
        workers = max(1, min(5, clients // 10 or 1))
        per = [clients // workers + (1 if k < clients % workers else 0) for k in range(workers)]
        start_at = time.time() + 1.5 + 0.02 * clients  # time for every client to connect first
        procs = [subprocess.Popen([py, str(HERE / "_poll_worker.py"), s.name if not s.name.startswith("ours")
                                   else "ours", target, "--clients", str(k), "--start-at", str(start_at),
                                   "--duration", str(duration)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for k in per]
        lat: list[float] = []
        in_window = errors = reconnects = censored = reply_bytes = 0
        for p in procs:
            try:
                out, err = p.communicate(timeout=duration + 300)
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
                self.problems.append(f"{s.name} N={s.n}: a poll worker hung; killed")
            try:
                data = json.loads(out)
            except ValueError:
                self.problems.append(f"{s.name} N={s.n}: poll worker said {err.strip()[-300:]!r}")
                return None
            lat += data["lat"]
            in_window += data["in_window"]
            errors += data["errors"]
            reconnects += data["reconnects"]
            censored += data.get("censored", 0)
            reply_bytes = max(reply_bytes, data.get("reply_bytes", 0))
            if err.strip():
                log(f"{s.name} N={s.n} poll worker: {err.strip()[-300:]}")
        if errors:
            self.problems.append(f"{s.name} N={s.n}: {errors} polling errors ({clients} clients)")
        if not lat:
            return None
        lat.sort()
        return {"rps": in_window / duration, "p50": lat[len(lat) // 2],
                "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))], "reconnects": reconnects,
                "censored": censored, "reply_bytes": reply_bytes}

    def respawn(self, s: System, samples: int) -> list[float]:
        out = []
        found, _ = s.svc.walk(s.pid)
        picks = self.rng.sample(sorted(found), min(samples, len(found)))
        for i in picks:
            found, _ = s.svc.walk(s.pid)
            old = found.get(i)
            st = proc_stat(old) if old else None
            if st is None:
                continue
            parent = int(st[1])
            arg = s.svc.arg(i)
            # Only processes new under the parent are read: reading the command
            # line of every child on each pass would cost the bench O(N) per
            # pass under a parent of N services (ours, supervisord, circus) and
            # O(1) under one of one (s6-supervise, runsv).
            known = set(children(parent))
            t0 = time.perf_counter()
            os.kill(old, signal.SIGKILL)
            deadline = t0 + 15
            got = None
            while time.perf_counter() < deadline and got is None:
                for c in children(parent):
                    if c not in known:  # read again until it has executed `sleep`
                        cmd = cmdline(c)
                        if cmd and len(cmd) >= 2 and cmd[1] == arg and os.path.basename(cmd[0]) == "sleep":
                            got = time.perf_counter() - t0
                            break
                else:
                    time.sleep(0.0005)
            if got is None:
                self.problems.append(f"{s.name} N={s.n}: service {i} not respawned within 15 s")
            else:
                out.append(got)
            time.sleep(0.3)
        return out

    def reexec(self, s: Ours, samples: int) -> tuple[list[float], str | None]:
        try:
            rep = s.call("reexec", "root", ro=False, timeout=30)
        except (OSError, ValueError) as exc:
            return [], f"reexec request failed: {exc}"
        if not rep.get("ok") and rep.get("error", {}).get("code") == "unsupported":
            return [], "n/a (unsupported)"
        self._wait_serving(s, 30)  # the request itself re-executed it
        before, _ = s.svc.walk(s.pid)
        out = []
        for _ in range(samples):
            stack = start_stack(s.pid)
            t0 = time.perf_counter()
            os.kill(s.pid, signal.SIGUSR1)
            while time.perf_counter() - t0 < 30 and start_stack(s.pid) == stack:
                time.sleep(0.0005)
            if start_stack(s.pid) == stack:
                return out, "no exec seen within 30 s of SIGUSR1"
            if not self._wait_serving(s, 30):
                return out, "not serving within 30 s of the re-exec"
            out.append(time.perf_counter() - t0)
            time.sleep(0.3)
        after, _ = s.svc.walk(s.pid)
        if before != after:
            self.problems.append(f"ours N={s.n}: service pids changed across re-exec "
                                 f"({sum(1 for k in before if before[k] != after.get(k))} of {len(before)})")
        return out, None

    def _wait_serving(self, s: Ours, timeout: float) -> bool:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if s.proc.poll() is not None:
                return False
            try:
                if s.call("ping", timeout=1).get("ok"):
                    return True
            except (OSError, ValueError):
                pass
            time.sleep(0.0005)
        return False

    def stop_all(self, s: System, timeout: float = 120) -> float | None:
        found, _ = s.svc.walk(s.pid)
        pids = list(found.values())
        t0 = time.perf_counter()
        s.request_stop()
        deadline = t0 + timeout
        while time.perf_counter() < deadline:
            pids = [p for p in pids if alive(p)]
            if not pids:
                took = time.perf_counter() - t0
                try:
                    s.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.problems.append(f"{s.name} N={s.n}: supervisor still running 30 s after stop-all")
                return took
            time.sleep(0.002)
        self.problems.append(f"{s.name} N={s.n}: {len(pids)} services alive {timeout} s after stop-all")
        return None

    # ---- one cell: one system, one N ------------------------------------------------------

    def cell(self, name: str, n: int, round_: int) -> None:
        a = self.a
        s = self.new(name, n, round_)
        log(f"round {round_} N={n} {name}")
        try:
            t = self.boot(s)
            self.record("boot", name, n, t)
            if t is None:
                return
            time.sleep(a.settle)
            if not a.polling_only:
                self.record("pss", name, n, self.pss(s))
                if isinstance(s, Ours) and not isinstance(s, OursGraph):
                    herd, bare, ratio = self.status_cli_vs_python(s, max(a.cli_runs, 10))
                    self.record("status_cli", name, n, herd)
                    self.record("py_start", name, n, bare)
                    self.record("herd_vs_python", name, n, ratio)
                else:
                    self.record("status_cli", name, n, self.status_cli(s, a.cli_runs))
            one = self.poll(s, 1, a.rpc_seconds)
            if one:
                self.record("rpc1_p50", name, n, one["p50"])
            many = self.poll(s, a.clients, a.poll_seconds)
            if many:
                self.record("poll_rps", name, n, many["rps"])
                self.record("poll_p50", name, n, many["p50"])
                self.record("poll_p99", name, n, many["p99"])
                if many["reconnects"]:
                    self.record("poll_rps", name, n, None, f"{many['reconnects']} reconnects")
                if many["censored"]:
                    self.record("poll_p50", name, n, None, f"{many['censored']} polls cut at 20 s")
                if many["reply_bytes"]:
                    self.record("poll_bytes", name, n, many["reply_bytes"])
            if a.polling_only:
                self.stop_all(s)
                return
            for v in self.respawn(s, a.respawn_samples):
                self.record("respawn", name, n, v)
            if isinstance(s, Ours) and not isinstance(s, OursGraph):
                vals, note = self.reexec(s, a.reexec_samples)
                for v in vals:
                    self.record("reexec", name, n, v)
                if note:
                    self.record("reexec", name, n, None, note)
            self.record("stop_all", name, n, self.stop_all(s))
        finally:
            self.problems += [f"round {round_} N={n}: {p}" for p in s.cleanup()]

    def idle(self, n: int, round_: int, systems: list[str]) -> None:
        """Every system at once with N services, then CPU used over the idle window."""
        log(f"round {round_} N={n} idle, all systems at once, {self.a.idle_seconds:g} s")
        running: list[System] = []
        try:
            for name in systems:
                s = self.new(name, n, round_)
                running.append(s)
                if self.boot(s) is None:
                    running.pop()
                    self.problems += s.cleanup()
            time.sleep(max(self.a.settle, 3))
            before = {}
            for s in running:
                before[s.name] = {p.pid: p for p in self.own_procs(s)}
            cpu0 = {name: _cpu(ps.values()) for name, ps in before.items()}
            time.sleep(self.a.idle_seconds)
            for s in running:
                used = _cpu(before[s.name].values()) - cpu0[s.name]
                self.record("idle_cpu", s.name, n, used * 60.0 / self.a.idle_seconds)
            for s in running:
                self.stop_all(s)
        finally:
            for s in running:
                self.problems += [f"round {round_} N={n} idle: {p}" for p in s.cleanup()]

    def run(self) -> None:
        a = self.a
        t0 = time.time()
        names = [x for x in a.systems]
        for r in range(1, a.rounds + 1):
            for n in a.n:
                order = names[(r - 1) % len(names):] + names[:(r - 1) % len(names)]  # alternate who goes first
                for name in order:
                    self.cell(name, n, r)
                if r <= a.idle_rounds and not a.polling_only:
                    self.idle(n, r, [x for x in order if x != "ours-graph"])
            self.save()
        self.elapsed = time.time() - t0
        self.save()
        shutil.rmtree(self.work, ignore_errors=True)

    # ---- output -----------------------------------------------------------------------------

    def save(self) -> None:
        data = {"results": self.results, "notes": self.notes, "problems": self.problems,
                "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self.a).items()},
                "machine": machine(), "elapsed": getattr(self, "elapsed", None),
                "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        (self.a.out / "results.json").write_text(json.dumps(data, indent=1, default=dict))


def _cpu(procs) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


# --------------------------------------------------------------------------
# Report


def _version(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def machine() -> dict[str, str]:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "kernel": platform.release(),
        "os": _version(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "python (ours)": _version([str(OURS_PY), "-c", "import sys; print(sys.version.split()[0])"]),
        "ours": _version([str(OURS_PY), "-c", "import supervisor, trio; print(f'supervisor {supervisor.__version__}, trio {trio.__version__}')"])
        + " @ " + _version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
        "supervisord": _version([str(SV_VENV / "bin" / "python"), "-c",
                                 "import importlib.metadata as m, sys; print('supervisor', m.version('supervisor'), 'on Python', sys.version.split()[0])"]),
        "circus": _version([str(CIRCUS_VENV / "bin" / "python"), "-c",
                            "import importlib.metadata as m, sys; print('circus', m.version('circus'), 'pyzmq', m.version('pyzmq'), 'tornado', m.version('tornado'), 'on Python', sys.version.split()[0])"]),
        "s6": _version(["dpkg-query", "-W", "-f", "${Package} ${Version} (Debian)", "s6"]),
        "runit": _version(["dpkg-query", "-W", "-f", "${Package} ${Version} (Debian)", "runit"]),
    }


METRICS = [
    # key, title, unit, scale, lower is better, format
    ("boot", "boot: start to all N running", "s", 1, True, "{:.3f}"),
    ("status_cli", "status: one CLI call", "ms", 1e3, True, "{:.1f}"),
    ("py_start", "ours' interpreter: `python -c pass`", "ms", 1e3, True, "{:.1f}"),
    ("herd_vs_python", "`herd status` / `python -c pass`, paired", "×", 1, True, "{:.2f}"),
    ("rpc1_p50", "status RPC, 1 client, p50", "ms", 1e3, True, "{:.2f}"),
    ("poll_rps", "polling, 50 clients: requests/s", "req/s", 1, False, "{:.0f}"),
    ("poll_p50", "polling, 50 clients: p50", "ms", 1e3, True, "{:.1f}"),
    ("poll_p99", "polling, 50 clients: p99", "ms", 1e3, True, "{:.1f}"),
    ("poll_bytes", "polling: size of one status reply", "bytes", 1, True, "{:.0f}"),
    ("respawn", "respawn: SIGKILL to replacement running", "ms", 1e3, True, "{:.1f}"),
    ("idle_cpu", "idle CPU", "s/min", 1, True, "{:.3f}"),
    ("pss", "memory: PSS of the supervisor's processes", "MiB", 1, True, "{:.1f}"),
    ("stop_all", "stop-all: stop to every child gone", "s", 1, True, "{:.3f}"),
    ("reexec", "re-exec: SIGUSR1 to serving again", "s", 1, True, "{:.3f}"),
]


def med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def report(data: dict[str, Any], out: Path, quick: bool) -> str:
    res, notes, mach, args = data["results"], data["notes"], data["machine"], data["args"]
    systems = [s for s in args["systems"]]
    ns = args["n"]
    lines = []
    title = "Benchmarks — QUICK MODE (not the full run)" if quick else "Benchmarks"
    lines += [f"# {title}", ""]
    if quick:
        lines += ["> **Quick mode** (`contrib/bench/run --quick`): N = " + ", ".join(map(str, ns))
                  + f", {args['rounds']} round, idle window {args['idle_seconds']:g} s, polling "
                  f"{args['poll_seconds']:g} s. Indicative only; rerun `contrib/bench/run` for the full table.", ""]
    lines += [f"Generated by `contrib/bench/run{' --quick' if quick else ''}` on {data.get('generated') or time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
              + (f" in {data['elapsed'] / 60:.1f} min" if data.get("elapsed") else "") + ".", "",
              "## Machine", "", "| | |", "|---|---|"]
    for k, v in mach.items():
        lines.append(f"| {k} | {v} |")
    lines += ["", "## Method", "",
              f"- Every system supervises N `sleep` services (unique argument each; found by command line, "
              f"never through the system under test). Systems take turns cell by cell, the first one "
              f"rotating each round; {args['rounds']} round(s); values are **medians** over rounds and samples.",
              "- `ours-graph`: ours with a 10-level dependency graph (`requires`: level k needs a service of "
              "level k-1). Only ours has dependencies among these systems (s6-rc would, plain s6 does not).",
              "- boot: from spawning the supervisor to every `sleep` existing **and** the system's own status "
              "saying running (ours: status socket; supervisord: XML-RPC `getAllProcessInfo` RUNNING; circus: "
              "`status` all active; s6/runit: the process is up, which is what they report).",
              "- status CLI: wall time of `herd status`, `supervisorctl status`, `circusctl status`, "
              "`sv status DIR...`; s6-svstat takes one directory, so s6 is one `s6-svstat` per service in a "
              f"`sh` loop. Median of {args['cli_runs']} after a warm-up call.",
              f"- status RPC, 1 client: one persistent connection asking for the full status back to back "
              f"for {args['rpc_seconds']:g} s (ours: status socket; supervisord: XML-RPC keep-alive; circus: "
              "its client library over ZeroMQ; s6/runit: the status command). Approximates server-side time.",
              f"- polling: {args['clients']} clients (in 5 worker processes) for {args['poll_seconds']:g} s, same "
              "APIs; req/s counts replies completed in the window; the load generator shares the 2 cores.",
              f"- respawn: SIGKILL of one service to a new `sleep` with the same argument under the same "
              f"parent ({args['respawn_samples']} services per cell). Respawn delay 0 where configurable "
              "(ours `respawn-delay = 0`); supervisord `startsecs=0 autorestart=true`; circus, s6, runit have "
              "no delay setting (s6 and runit pause 1 s after a service that ran < 1 s; circus respawns on its "
              "next management pass).",
              f"- idle CPU: all systems booted **at once** with N services each, then user+system CPU of each "
              f"system's own processes over {args['idle_seconds']:g} s, scaled to seconds per minute.",
              "- memory: PSS (`psutil memory_full_info().pss`) summed over the supervisor's own processes "
              "(s6: s6-svscan + every s6-supervise; runit: runsvdir + every runsv), after boot.",
              "- stop-all: ours, supervisord, circus: SIGTERM; s6: `s6-svscanctl -t`; runit: SIGHUP to "
              "runsvdir; until every service process is gone.",
              "- re-exec (ours only): SIGUSR1 to the daemon having exec'd (its stack address changes) and "
              "answering `ping` on a new connection; `n/a` while `herd reexec root` answers `unsupported`.",
              "- Logging: ours writes each service's output to a log file; supervisord `AUTO` child logs; "
              "circus, s6, runit discard it (no logger configured).", ""]
    # The table.
    lines += ["## Results (medians)", "",
              "Ratio columns are ours / peer: below 1 is better for us on every row except req/s, "
              "where above 1 is better.", ""]
    head = ["scenario", "N", *systems] + [f"ours/{p}" for p in PEERS if p in systems]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for key, title, unit, scale, _lower, fmt in METRICS:
        if key not in res and key not in notes:
            continue
        for n in ns:
            row = [f"{title} ({unit})", str(n)]
            vals: dict[str, float | None] = {}
            for sname in systems:
                xs = res.get(key, {}).get(sname, {}).get(str(n)) or res.get(key, {}).get(sname, {}).get(n) or []
                v = med(xs)
                vals[sname] = v
                note = notes.get(key, {}).get(sname, {}).get(str(n)) or notes.get(key, {}).get(sname, {}).get(n)
                if v is None:
                    cell = note or "–"
                    if key == "reexec" and sname != "ours":
                        cell = "–"
                else:
                    cell = fmt.format(v * scale) + (f" ({note})" if note else "")
                row.append(cell)
            for p in PEERS:
                if p not in systems:
                    continue
                o, q = vals.get("ours"), vals.get(p)
                row.append(f"{o / q:.2f}" if o is not None and q else
                           ("both 0" if o == 0 and q == 0 else "–"))
            lines.append("| " + " | ".join(row) + " |")
    lines += [""]
    lines += targets(res, ns)
    lines += targets19(res, ns)
    lines += polling(res, ns, args["clients"])
    analysis = out / "analysis.md"
    if analysis.exists():
        lines += [analysis.read_text().rstrip(), ""]
    if data["problems"]:
        lines += ["## Problems seen during the run", ""] + [f"- {p}" for p in data["problems"]] + [""]
    lines += ["![results](results.png)", ""]
    mass = HERE / "mass_start.md"  # written by mass_start.py, kept across regenerations
    if mass.exists():
        lines += [mass.read_text().rstrip(), ""]
    return "\n".join(lines)


def _m(res: dict, key: str, system: str, n: int) -> float | None:
    d = res.get(key, {}).get(system, {})
    return med(d.get(str(n)) or d.get(n) or [])


def targets(res: dict, ns: list[int]) -> list[str]:
    """Issue 9's targets against the medians measured here."""
    rows = []

    def row(what: str, target: str, value: float | None, fmt: str, ok: bool | None) -> None:
        shown = "not measured" if value is None else fmt.format(value)
        verdict = "–" if ok is None else ("met" if ok else "**missed**")
        rows.append(f"| {what} | {target} | {shown} | {verdict} |")

    v = _m(res, "boot", "ours", 1000)
    row("boot, 1000 services", "< 2 s", v, "{:.2f} s", None if v is None else v < 2)
    v = _m(res, "rpc1_p50", "ours", 1000)
    row("status reply, 1000 services (1 client, p50, incl. client read)", "< 20 ms", None if v is None else v * 1e3,
        "{:.1f} ms", None if v is None else v < 0.020)
    for n in ns:
        o, q = _m(res, "poll_rps", "ours", n), _m(res, "poll_rps", "supervisord", n)
        ratio = None if o is None or not q else o / q
        row(f"polling req/s vs supervisord, N={n}", "≥ 10×", ratio, "{:.1f}×",
            None if o is None or q is None else (q == 0 and o > 0) or (ratio is not None and ratio >= 10))
    for n in ns:
        v = _m(res, "respawn", "ours", n)
        row(f"respawn median, N={n}", "< 10 ms", None if v is None else v * 1e3, "{:.1f} ms",
            None if v is None else v < 0.010)
    for n in ns:
        v = _m(res, "idle_cpu", "ours", n)
        row(f"idle CPU, N={n}", "0.0 s/min", v, "{:.3f} s/min", None if v is None else v < 0.005)
    for n in ns:
        o, q = _m(res, "pss", "ours", n), _m(res, "pss", "supervisord", n)
        row(f"memory vs supervisord, N={n}", "≤ supervisord", None if o is None or not q else o / q, "{:.2f}×",
            None if o is None or q is None else o <= q)
    v = _m(res, "reexec", "ours", 100)
    row("re-exec, 100 services", "< 0.5 s", v, "{:.2f} s", None if v is None else v < 0.5)
    return ["## Issue 9 targets", "", "| target | wanted | measured (median) | |", "|---|---|---|---|",
            *rows, ""]


def polling(res: dict, ns: list[int], clients: int) -> list[str]:
    """Issue 17's polling targets, with the reply sizes that make the ratios fair."""
    rows = []
    peers = ("supervisord", "circus", "s6", "runit")
    for n in ns:
        o = _m(res, "poll_rps", "ours", n)
        cells = []
        for peer in peers:
            q = _m(res, "poll_rps", peer, n)
            cells.append("–" if o is None or q is None else "∞" if not q else f"{o / q:.1f}×")
        sizes = [_m(res, "poll_bytes", x, n) for x in ("ours", *peers)]
        met = [None if o is None or q is None else (q == 0 and o > 0) or (bool(q) and o / q >= want)
               for q, want in ((_m(res, "poll_rps", "supervisord", n), 10), (_m(res, "poll_rps", "circus", n), 2))]
        p, c = _m(res, "poll_p50", "ours", n), _m(res, "poll_p50", "circus", n)
        p50 = "–" if p is None else f"{p * 1e3:.1f} ms" + ("" if c is None else f" (circus {c * 1e3:.1f} ms)")
        rows.append(f"| {n} | {'–' if o is None else f'{o:.0f}'} | {' | '.join(cells)} | {p50} | "
                    + " / ".join("–" if b is None else f"{b:,.0f}" for b in sizes) + " | "
                    + ", ".join("–" if m is None else "met" if m else "**missed**" for m in met)
                    + ("" if n != 1000 or p is None or c is None else
                       (", p50 met" if p <= c else ", p50 **missed**")) + " |")
    return ["## Polling (issue 17)", "",
            f"{clients} clients ask for the full status back to back (see Method); ours on the read-only "
            "socket. Reply sizes differ a lot: ours is the full SVC object of every service (about 450 bytes "
            "each), supervisord's `getAllProcessInfo` about as rich in XML, circus's `status` one word per "
            "watcher, s6/runit one line of text per service; compare requests per second with that in mind.",
            "", "| N | ours req/s | ÷ supervisord | ÷ circus | ÷ s6 | ÷ runit | ours p50 | reply bytes: "
            "ours / supervisord / circus / s6 / runit | targets: ≥ 10× supervisord, ≥ 2× circus, "
            "N=1000 p50 ≤ circus |", "|---|---|---|---|---|---|---|---|---|", *rows, ""]


def targets19(res: dict, ns: list[int]) -> list[str]:
    """Issue 19's targets: ours against the best peer, row by row, from this run."""
    rows = []

    def row(what: str, target: str, shown: str, ok: bool | None) -> None:
        rows.append(f"| {what} | {target} | {shown} | {'–' if ok is None else ('met' if ok else '**missed**')} |")

    def versus(key: str, n: int, peers: tuple[str, ...], fmt: str, scale: float = 1) -> None:
        o = _m(res, key, "ours", n)
        qs = {p: _m(res, key, p, n) for p in peers}
        if o is None or any(q is None for q in qs.values()):
            row(f"{key} N={n}", " and ".join(f"≤ {p}" for p in peers), "not measured", None)
            return
        shown = f"ours {fmt.format(o * scale)}; " + ", ".join(f"{p} {fmt.format(q * scale)} ({o / q:.2f}×)"
                                                                for p, q in qs.items() if q)
        row(f"{key} N={n}", " and ".join(f"≤ {p}" for p in peers), shown, all(o <= q for q in qs.values()))

    for n, limit in ((10, 1.5), (1000, 2.0)):
        if n in ns:
            v = _m(res, "herd_vs_python", "ours", n)
            row(f"`herd status` / `python -c pass`, N={n}", f"≤ {limit}×",
                "not measured" if v is None else f"{v:.2f}×", None if v is None else v <= limit)
    for n in (100, 1000):
        if n in ns:
            versus("respawn", n, ("runit",), "{:.1f} ms", 1e3)
    if 1000 in ns:
        versus("boot", 1000, ("s6", "circus"), "{:.2f} s")
        versus("stop_all", 1000, ("s6", "circus"), "{:.2f} s")
        versus("pss", 1000, ("supervisord",), "{:.1f} MiB")
    lo, hi = (100, 1000) if 100 in ns and 1000 in ns else (None, None)
    if lo is not None:
        slope = {}
        for sname in ("ours", "supervisord"):
            a, b = _m(res, "pss", sname, lo), _m(res, "pss", sname, hi)
            slope[sname] = None if a is None or b is None else (b - a) * 1024 / (hi - lo)
        o, q = slope["ours"], slope["supervisord"]
        row(f"memory per service (PSS, N={lo}→{hi})", "< supervisord",
            "not measured" if o is None or q is None else f"ours {o:.1f} KiB, supervisord {q:.1f} KiB",
            None if o is None or q is None else o < q)
    for n, limit in ((100, 0.5), (1000, 1.0)):
        if n in ns:
            v = _m(res, "reexec", "ours", n)
            row(f"re-exec, N={n}", f"≤ {limit:g} s", "not measured" if v is None else f"{v:.2f} s",
                None if v is None else v <= limit)
    return ["## Issue 19 targets", "", "| target | wanted | measured (medians of this run) | |",
            "|---|---|---|---|", *rows, ""]


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    res = data["results"]
    systems = data["args"]["systems"]
    keys = [m for m in METRICS if m[0] in res]
    cols = 3
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, (key, title, unit, scale, lower, _fmt) in zip(axes.flat, keys):
        for sname in systems:
            pts = sorted((int(n), med(v) * scale) for n, v in res[key].get(sname, {}).items() if v)
            if key != "idle_cpu":
                pts = [p for p in pts if p[1] > 0]  # log scale
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=sname,
                        color=f"C{systems.index(sname) % 10}")  # one colour per system in every panel
        ax.set_xscale("log")
        ax.set_yscale("linear" if key == "idle_cpu" else "log")
        ax.set_title(f"{title}\n({unit}, {'lower' if lower else 'higher'} is better)", fontsize=9)
        ax.set_xlabel("N services", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], color=f"C{i % 10}", marker="o") for i in range(len(systems))]
    labels = list(systems)
    fig.legend(handles, labels, loc="lower right", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


# --------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description="Benchmark our supervisor against supervisord, circus, s6, runit.")
    p.add_argument("--quick", action="store_true", help="N = 10, 100; 1 round; short idle and polling")
    p.add_argument("--polling-only", action="store_true",
                   help="boot, then the status RPC and polling rows only (report in .cache/bench/polling/)")
    p.add_argument("--n", type=int, nargs="+", help="service counts (default 10 100 1000)")
    p.add_argument("--rounds", type=int, help="rounds (default 3)")
    p.add_argument("--idle-seconds", type=float, help="idle window (default 60)")
    p.add_argument("--idle-rounds", type=int, help="rounds that also run the idle phase (default 1)")
    p.add_argument("--poll-seconds", type=float, help="polling duration (default 10)")
    p.add_argument("--rpc-seconds", type=float, default=2.0)
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--cli-runs", type=int, default=3)
    p.add_argument("--respawn-samples", type=int, default=3)
    p.add_argument("--reexec-samples", type=int, default=2)
    p.add_argument("--settle", type=float, default=1.0)
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workdir", default="/tmp")
    p.add_argument("--out", type=Path, default=None,
                   help="where RESULTS.md, results.png, results.json go (default: contrib/bench/ for a full "
                        "run, .cache/bench/quick/ with --quick, so a try-out never overwrites the committed results)")
    p.add_argument("--report-only", action="store_true", help="rebuild RESULTS.md and the plot from results.json")
    a = p.parse_args()
    quick = a.quick
    a.n = a.n or ([10, 100] if quick else [10, 100, 1000])
    a.rounds = a.rounds or (1 if quick else 3)
    a.idle_seconds = a.idle_seconds or (10.0 if quick else 60.0)
    a.idle_rounds = a.idle_rounds if a.idle_rounds is not None else 1
    a.poll_seconds = a.poll_seconds or (5.0 if quick else 10.0)
    a.out = a.out or (CACHE / "quick" if quick else CACHE / "polling" if a.polling_only else HERE)
    a.out.mkdir(parents=True, exist_ok=True)
    if quick and a.out != HERE and (HERE / "analysis.md").exists():
        shutil.copy(HERE / "analysis.md", a.out / "analysis.md")
    if not a.report_only:
        if not OURS_PY.exists():
            print(f"bench: {OURS_PY} missing; run contrib/dev setup", file=sys.stderr)
            return 1
        b = Bench(a)
        def on_term(signum, frame):  # noqa: ANN001 - clean up on Ctrl-C / SIGTERM
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, on_term)
        try:
            b.run()
        except KeyboardInterrupt:
            b.save()
            print("bench: interrupted; partial results in results.json", file=sys.stderr)
            return 130
    data = json.loads((a.out / "results.json").read_text())
    quick = quick or data["args"].get("quick", False)
    (a.out / "RESULTS.md").write_text(report(data, a.out, quick))
    try:
        plot(data, a.out / "results.png")
    except ImportError as exc:
        print(f"bench: no plot ({exc})", file=sys.stderr)
    print((a.out / "RESULTS.md").read_text())
    print(f"bench: report in {a.out / 'RESULTS.md'}, plot in {a.out / 'results.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
