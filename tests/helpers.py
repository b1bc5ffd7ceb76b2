"""Helpers for the black-box tests: deadlines, process scans, service builders.

Nothing here knows the engine's internals: these helpers look at what a user
(or a dashboard) can see -- processes, files, the control socket.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest
import tomli_w

T = TypeVar("T")

#: Environment variable carrying a service's marker (for services that are
#: plain `sleep`, which cannot take an extra marker argument).
MARKER_ENV = "SVTEST_MARKER"
#: Environment variable the harness puts into the daemon's environment; every
#: service that keeps the supervisor's environment inherits it.
TOKEN_ENV = "SVTEST_TOKEN"

SLEEP = shutil.which("sleep") or "/bin/sleep"
PY = sys.executable


# --------------------------------------------------------------------------
# Deadlines


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    what: str,
    interval: float = 0.02,
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    Fails the test with a message naming ``what`` (and the last value seen)
    when ``timeout`` seconds pass first.  Exceptions from the predicate
    propagate: a failing status call is a failure, not "not yet".
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout:g} s waiting for {what} (last value: {last!r})"
            )
        time.sleep(interval)


class Deadline:
    """A point in time; ``remaining()`` is what is left of it (never negative)."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.end


# --------------------------------------------------------------------------
# Processes


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def find_procs(marker: str) -> list[psutil.Process]:
    """Live (non-zombie) processes carrying ``marker``.

    A process carries a marker when one of its command-line arguments equals
    it exactly, or when its ``SVTEST_MARKER`` environment variable equals it.
    The spawn helper (`launcher`) is not one: it carries the service's
    command line and environment only until the service runs.
    """
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "environ", "status"]):
        info = p.info
        if info.get("status") == psutil.STATUS_ZOMBIE or launcher(info):
            continue
        cmdline = info.get("cmdline") or []
        environ = info.get("environ") or {}
        if marker in cmdline or environ.get(MARKER_ENV) == marker:
            found.append(p)
    return found


def launcher(info: dict[str, Any]) -> bool:
    """Whether a process (psutil's `info`, with its cmdline) is the supervisor's
    spawn helper, ``supervisor/_cgspawn``: it starts the service's process
    (clone3) and exits once that has executed the service's command."""
    cmdline = info.get("cmdline") or []
    return bool(cmdline) and os.path.basename(cmdline[0]) == "_cgspawn"


def find_pids(marker: str) -> set[int]:
    return {p.pid for p in find_procs(marker)}


def procs_with_token(token: str) -> list[psutil.Process]:
    """Every live process the test run started (token in argv or environment)."""
    me = os.getpid()
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "environ", "status"]):
        if p.pid == me:
            continue
        info = p.info
        if info.get("status") == psutil.STATUS_ZOMBIE:
            continue
        cmdline = " ".join(info.get("cmdline") or [])
        environ = info.get("environ") or {}
        if token in cmdline or any(token in v for v in environ.values()):
            found.append(p)
    return found


def kill_all(procs: Iterable[psutil.Process], timeout: float = 5.0) -> None:
    """SIGKILL ``procs`` and wait (bounded) for them to go."""
    procs = [p for p in procs if p.pid != os.getpid()]
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    # A zombie counts as gone: its parent (or init) reaps it.
    deadline = Deadline(timeout)
    while any(_alive(p) for p in procs) and not deadline.expired():
        time.sleep(0.01)


def pid_alive(pid: int) -> bool:
    try:
        return _alive(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return False


def _sig_mask(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1], 16)
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def signal_ignored(pid: int, signum: int) -> bool:
    """True once process ``pid`` ignores ``signum`` (from /proc/PID/status)."""
    return bool(_sig_mask(pid, "SigIgn") & (1 << (signum - 1)))


def signal_caught(pid: int, signum: int) -> bool:
    """True once process ``pid`` has a handler installed for ``signum``."""
    return bool(_sig_mask(pid, "SigCgt") & (1 << (signum - 1)))


# --------------------------------------------------------------------------
# Service definitions (dicts for the [services.NAME] table)


def sleeper(marker: str, **keys: Any) -> dict[str, Any]:
    """A `sleep` service, found by psutil through its environment marker."""
    env = dict(keys.pop("environment", {}))
    env[MARKER_ENV] = marker
    return {"command": [SLEEP, "1000000"], "environment": env, **keys}


def py_service(code: str, *argv: str, **keys: Any) -> dict[str, Any]:
    """A ``python3 -c CODE ARGV...`` service; markers go into ``argv``."""
    return {"command": [PY, "-c", code, *argv], **keys}


#: Sleeps forever; argv[1] is its marker.
PY_SLEEP = "import time; time.sleep(1e6)"

#: Forks a child that exec's a sleeper marked argv[1] + "-child" (after
#: setsid() when argv[2] == "setsid"), then sleeps forever itself; argv[1]
#: marks the parent.  (The child's marker is not in the parent's argv, so
#: psutil tells them apart.)
PY_FORK_CHILD = r"""
import os, sys, time
pid = os.fork()
if pid == 0:
    if sys.argv[2] == "setsid":
        os.setsid()
    os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(1e6)", sys.argv[1] + "-child"])
time.sleep(1e6)
"""

#: Prints one line ``PROBE {json}`` describing its execution environment,
#: then sleeps forever (argv[1] is its marker).
PY_PROBE = r"""
import json, os, resource, sys, time
names = os.listdir("/proc/self/fd")
fds = {}
for n in names:
    fd = int(n)
    try:
        os.fstat(fd)          # the listing's own descriptor is closed by now
    except OSError:
        continue
    try:
        fds[fd] = os.readlink(f"/proc/self/fd/{n}")
    except OSError:
        fds[fd] = "?"
with open("/proc/self/environ", "rb") as f:
    raw = f.read()
env = dict(item.decode("utf-8", "replace").split("=", 1)
           for item in raw.split(b"\0") if b"=" in item)
u = os.umask(0); os.umask(u)
info = {
    "fds": sorted(fds), "fd-targets": {str(k): v for k, v in fds.items()},
    "umask": u, "cwd": os.getcwd(), "env": env,
    "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "egid": os.getegid(),
    "groups": sorted(os.getgroups()),
    "nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
    "core": list(resource.getrlimit(resource.RLIMIT_CORE)),
    "pid": os.getpid(), "sid": os.getsid(0), "pgid": os.getpgid(0),
}
print("PROBE " + json.dumps(info), flush=True)
time.sleep(1e6)
"""


def world_executable(path: str) -> bool:
    """True when every directory up to ``path`` and the file itself are
    usable by "others" (so an unprivileged user can exec it)."""
    real = Path(os.path.realpath(path))
    for d in [*reversed(real.parents)]:
        if not os.stat(d).st_mode & stat.S_IXOTH:
            return False
    mode = os.stat(real).st_mode
    return bool(mode & stat.S_IXOTH and mode & stat.S_IROTH)


def make_gate(path: Path) -> Path:
    """A FIFO that a service blocks on (``open(path).read()``) until the test
    calls `open_gate`: a signal, not a file to poll."""
    os.mkfifo(path, 0o666)
    os.chmod(path, 0o666)  # services may run as another user
    return path


def open_gate(path: Path, timeout: float = 20.0) -> None:
    """Let the service waiting on the FIFO `path` go on (it reads EOF)."""
    def writer() -> int | None:
        try:
            return os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: the service is not reading it yet
            return None

    os.close(wait_until(writer, timeout, f"a service waiting on {path}"))


#: For a service's Python code: block until the test opens the gate argv[i].
WAIT_GATE = "def wait_gate(path):\n    open(path).read()\n"


def need(what: str) -> None:
    """A test cannot run here without `what`: as root (CI, where `contrib/dev
    test` installs everything) that is a failure, otherwise a skip naming it."""
    message = f"missing: {what}"
    if os.getuid() == 0:
        pytest.fail(message + " -- run `contrib/dev test` (as root it installs them)")
    pytest.skip(message)


def nobody_python() -> str:
    """A Python interpreter that user `nobody` can run (`need`s one)."""
    python = python_for_other_users()
    if python is None:
        need("a Python interpreter that user nobody may run (Debian package python3)")
    assert python is not None
    return python


def python_for_other_users() -> str | None:
    """A Python interpreter that a user like `nobody` can run, if any."""
    for candidate in (sys.executable, "/usr/bin/python3"):
        if candidate and os.path.exists(candidate) and world_executable(candidate):
            return candidate
    return None


# --------------------------------------------------------------------------
# The daemon and its clients

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 10.0
HERD_TIMEOUT = 30.0


def base_env() -> dict[str, str]:
    """Environment for the daemon and herd: the uninstalled tree importable."""
    env = dict(os.environ)
    env.pop("SUPERVISOR_SOCKET", None)
    env.pop("NOTIFY_SOCKET", None)
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + old if old else "")
    env["NO_COLOR"] = "1"
    return env


def run_supervisor(*args: str, timeout: float = 30.0, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m supervisor ARGS`` to completion (for ``--check``)."""
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args],
        env=base_env(),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def check_config(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    """``supervisor --check`` on the configuration `text` (written to ``tmp_path/check.toml``)."""
    conf = tmp_path / "check.toml"
    conf.write_text(text)
    return run_supervisor("--check", "-c", str(conf), timeout=60, cwd=REPO)


def run_herd(
    socket_path: str | Path,
    *args: str,
    json_output: bool = False,
    check: int | bool | None = None,
    timeout: float = HERD_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m herd -s SOCKET [--json] ARGS``.

    ``check``: None = any exit status; True = must be 0; an int = must be it.
    With ``json_output`` the parsed stdout is attached as ``.data`` (None when
    stdout is empty or not one JSON document).
    """
    argv = [sys.executable, "-m", "herd", "-s", str(socket_path)]
    if json_output:
        argv.append("--json")
    argv.extend(args)
    cp = subprocess.run(
        argv,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    data = None
    if json_output and cp.stdout.strip():
        try:
            data = json.loads(cp.stdout)
        except json.JSONDecodeError:
            data = None
    cp.data = data  # type: ignore[attr-defined]
    if check is not None:
        want = 0 if check is True else int(check)
        assert cp.returncode == want, (
            f"`herd {' '.join(args)}` exited {cp.returncode}, expected {want}\n"
            f"stdout: {cp.stdout!r}\nstderr: {cp.stderr!r}"
        )
    return cp


# --------------------------------------------------------------------------
# Raw protocol client


class ConnectionClosed(Exception):
    pass


class Client:
    """One connection to a control socket, speaking newline-delimited JSON."""

    def __init__(self, path: str | Path, timeout: float = 5.0, read_hello: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buf = b""
        self.pending: list[dict[str, Any]] = []  # objects read while waiting for another
        self._ids = 0
        self.hello = self.recv(timeout) if read_hello else None

    # low level -----------------------------------------------------------
    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, obj: dict[str, Any]) -> Any:
        """Send a request; gives it a fresh integer id when it has none."""
        if "id" not in obj:
            self._ids += 1
            obj = {"id": self._ids, **obj}
        self.send_raw(json.dumps(obj).encode() + b"\n")
        return obj["id"]

    def _read(self, timeout: float | None) -> dict[str, Any] | None:
        """The next object from the socket itself; None at end of stream."""
        deadline = Deadline(timeout if timeout is not None else 1e9)
        while b"\n" not in self.buf:
            left = deadline.remaining()
            if left <= 0:
                raise TimeoutError("no complete line from the server in time")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise TimeoutError("no complete line from the server in time") from None
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                if self.buf:
                    raise ConnectionClosed(f"connection closed mid-line: {self.buf[:200]!r}")
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def recv(self, timeout: float | None = 5.0) -> dict[str, Any] | None:
        """The next object (kept ones first); None at end of stream.

        Raises ``TimeoutError`` when nothing complete arrives in time.
        """
        if self.pending:
            return self.pending.pop(0)
        return self._read(timeout)

    # requests ------------------------------------------------------------
    def reply(self, req_id: Any, timeout: float = 10.0) -> dict[str, Any]:
        """Read until the reply to ``req_id``; other objects are kept for later."""
        for i, obj in enumerate(self.pending):
            if "event" not in obj and obj.get("id") == req_id:
                return self.pending.pop(i)
        deadline = Deadline(timeout)
        while True:
            left = deadline.remaining()
            if left <= 0:
                raise TimeoutError(f"no reply to request {req_id!r} within {timeout} s")
            obj = self._read(left)
            if obj is None:
                raise ConnectionClosed(f"connection closed before the reply to {req_id!r}")
            if "event" not in obj and obj.get("id") == req_id:
                return obj
            self.pending.append(obj)

    def call(
        self,
        action: str,
        service: str | None = None,
        args: list[Any] | None = None,
        timeout: float = 10.0,
    ) -> dict[str, Any]:
        req: dict[str, Any] = {"action": action}
        if service is not None:
            req["service"] = service
        if args is not None:
            req["args"] = args
        return self.reply(self.send(req), timeout)

    def events(
        self,
        until: Callable[[list[dict[str, Any]]], bool] | None,
        timeout: float,
        heartbeats: bool = False,
    ) -> list[dict[str, Any]]:
        """Collect event objects until ``until(events)`` holds.

        With ``until=None``, collect for ``timeout`` seconds (an observation
        window) and return what came.  Otherwise fail after ``timeout``.
        ``heartbeat`` events (a quiet subscription gets one every 5 s) are
        skipped, as a dashboard skips them, unless `heartbeats`.
        """
        deadline = Deadline(timeout)
        got: list[dict[str, Any]] = []
        while True:
            if until is not None and until(got):
                return got
            left = deadline.remaining()
            if left <= 0:
                if until is None:
                    return got
                raise AssertionError(f"events did not arrive within {timeout} s; got {got!r}")
            try:
                obj = self.recv(left)
            except TimeoutError:
                continue
            if obj is None:
                if until is None:
                    return got
                raise AssertionError(f"event stream closed; got {got!r}")
            if "event" in obj and (heartbeats or obj["event"] != "heartbeat"):
                got.append(obj)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Collector:
    """Reads a connection in a thread of its own, as a dashboard does, and
    keeps every object it gets (`got`); `closed` once the daemon closed it,
    `error` when reading failed."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.got: list[dict[str, Any]] = []
        self.closed = False
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    obj = self.client.recv(0.2)
                except TimeoutError:
                    continue
                if obj is None:
                    self.closed = True
                    return
                self.got.append(obj)
        except Exception as exc:  # noqa: BLE001 - the test reports it
            self.error = exc

    def events(self, kind: str) -> list[dict[str, Any]]:
        """The events of type `kind` so far."""
        return [obj for obj in list(self.got) if obj.get("event") == kind]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


# --------------------------------------------------------------------------
# The daemon under test


def _cgroup2_mounts() -> list[Path]:
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split(" ", 1)[0] == "cgroup2":
                found.append(Path(left.split()[4]))
    return found


def cgroup_subtree(state_dir: Path) -> Path | None:
    """The cgroup subtree a supervisor on `state_dir` uses (found, not assumed)."""
    import hashlib

    name = "supervisor-" + hashlib.sha256(os.fsencode(os.path.realpath(state_dir))).hexdigest()[:12]
    for mount in _cgroup2_mounts():
        for candidate in (mount / name, *_glob(mount, f"*/{name}"), *_glob(mount, f"*/*/{name}")):
            if candidate.is_dir():
                return candidate
    return None


def _glob(top: Path, pattern: str) -> list[Path]:
    """`top.glob(pattern)`, again when a directory vanished while it looked
    (another test's cgroup, removed at the same time)."""
    for _ in range(20):
        try:
            return list(top.glob(pattern))
        except FileNotFoundError:
            continue
    return []


def cgroup_of(pid: int) -> str | None:
    """``/a/b`` for the v2 cgroup of `pid`, or None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return line[3:]
    except OSError:
        return None
    return None


def remove_cgroup_tree(top: Path) -> None:
    """Kill everything in a cgroup subtree and remove it (test teardown)."""
    try:
        (top / "cgroup.kill").write_text("1")
    except OSError:
        pass
    # cgroup.events signals each change with POLLPRI: wait on that, not a timer
    try:
        fd = os.open(top / "cgroup.events", os.O_RDONLY)
    except OSError:
        return
    try:
        watch = select.poll()
        watch.register(fd, select.POLLPRI)
        deadline = Deadline(10)
        while b"populated 0" not in os.pread(fd, 4096, 0) and not deadline.expired():
            watch.poll(max(1, int(deadline.remaining() * 1000)))
    finally:
        os.close(fd)
    for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        try:
            d.rmdir()
        except OSError:
            pass
    try:
        top.rmdir()
    except OSError:
        pass


class Supervisor:
    """One `supervisor` daemon with private sockets and directories.

    `containment` is "cgroup" (the default) or "fallback" (the daemon runs
    with --no-cgroups and tracks services by process group and tree).
    """

    def __init__(self, tmp_path: Path, token: str, containment: str = "cgroup") -> None:
        self.containment = containment
        self.token = token
        self.tmp = tmp_path
        # Unix socket paths are limited to 107 bytes: keep them under /tmp.
        self.sockdir = Path(tempfile.mkdtemp(prefix="svt-", dir="/tmp"))
        self.socket = self.sockdir / "rw.sock"
        self.status_socket = self.sockdir / "ro.sock"
        self.notify_path = self.sockdir / "notify"
        self.state_dir = tmp_path / "state"
        self.log_dir = tmp_path / "log"
        self.config_path = tmp_path / "init.toml"
        self.stdout_path = tmp_path / "daemon.out"
        self.stderr_path = tmp_path / "daemon.err"
        self.proc: subprocess.Popen[bytes] | None = None
        self.clients: list[Client] = []
        self.descendants: dict[int, psutil.Process] = {}

    # configuration -------------------------------------------------------
    def marker(self, name: str) -> str:
        """A string unique to this test and ``name``, for psutil to find."""
        return f"svt-{self.token}-{name}"

    def write_config(self, config: dict[str, Any] | str, path: Path | None = None) -> Path:
        path = path or self.config_path
        text = config if isinstance(config, str) else tomli_w.dumps(config)
        path.write_text(text)
        return path

    def daemon_args(self) -> list[str]:
        return [
            "-c", str(self.config_path),
            "-s", str(self.socket),
            "--status-socket", str(self.status_socket),
            "--state-dir", str(self.state_dir),
            "--log-dir", str(self.log_dir),
            "--log-format", "json",
            *(["--no-cgroups"] if self.containment == "fallback" else []),
        ]

    # lifecycle -----------------------------------------------------------
    def spawn(
        self,
        config: dict[str, Any] | str | None,
        args: list[str] | None = None,
        umask: int = -1,
        preexec: Callable[[], None] | None = None,
    ) -> socket.socket:
        """Launch the daemon; returns the bound NOTIFY_SOCKET datagram socket.

        ``preexec`` runs in the daemon's process before it starts (to set its
        limits, say).
        """
        assert self.proc is None, "one daemon per Supervisor"
        if config is not None:
            self.write_config(config)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(self.notify_path))
        env = base_env()
        env["NOTIFY_SOCKET"] = str(self.notify_path)
        env[TOKEN_ENV] = self.token
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "supervisor", *(self.daemon_args() if args is None else args)],
                env=env,
                cwd=self.tmp,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                umask=umask,
                preexec_fn=preexec,
            )
        return notify

    def start(
        self,
        config: dict[str, Any] | str | None,
        args: list[str] | None = None,
        umask: int = -1,
        preexec: Callable[[], None] | None = None,
    ) -> Supervisor:
        """Launch the daemon and return once it has sent READY=1."""
        notify = self.spawn(config, args, umask, preexec)
        try:
            self._wait_ready(notify)
        finally:
            notify.close()
        return self

    def _wait_ready(self, notify: socket.socket) -> None:
        assert self.proc is not None
        deadline = Deadline(READY_TIMEOUT)
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"supervisor exited with {self.proc.returncode} before READY=1\n"
                    f"stderr:\n{self.stderr_tail()}"
                )
            if deadline.expired():
                raise AssertionError(
                    f"supervisor sent no READY=1 within {READY_TIMEOUT} s\nstderr:\n{self.stderr_tail()}"
                )
            notify.settimeout(min(0.1, deadline.remaining()) or 0.01)
            try:
                msg = notify.recv(4096)
            except socket.timeout:
                continue
            if "READY=1" in msg.decode(errors="replace").splitlines():
                return

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"supervisor did not exit within {timeout} s\nstderr:\n{self.stderr_tail()}"
            ) from None

    def send_signal(self, signum: int) -> None:
        assert self.proc is not None
        self._remember_descendants()
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 30.0, signum: int = signal.SIGTERM) -> int:
        """Send SIGTERM (or ``signum``) and wait for the exit code."""
        self.send_signal(signum)
        return self.wait_exit(timeout)

    def stderr_tail(self, lines: int = 60) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # clients -------------------------------------------------------------
    def herd(
        self,
        *args: str,
        json: bool = False,
        check: int | bool | None = None,
        socket_path: Path | None = None,
        timeout: float = HERD_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        return run_herd(socket_path or self.socket, *args, json_output=json, check=check, timeout=timeout)

    def status(self, name: str | None = None) -> Any:
        """``herd --json status [NAME]``: one SVC dict, or {name: SVC} for all."""
        if name is None:
            cp = self.herd("status", json=True, check=True)
            return {s["name"]: s for s in cp.data["services"]}
        cp = self.herd("status", name, json=True, check=True)
        services = cp.data["services"]
        assert len(services) == 1, services
        return services[0]

    def connect(self, ro: bool = False, timeout: float = 5.0, read_hello: bool = True) -> Client:
        c = Client(self.status_socket if ro else self.socket, timeout, read_hello)
        self.clients.append(c)
        return c

    def request(self, obj: dict[str, Any], ro: bool = False, timeout: float = 10.0) -> dict[str, Any]:
        """One request on a fresh connection; returns the reply object."""
        c = Client(self.status_socket if ro else self.socket, timeout)
        try:
            return c.reply(c.send(dict(obj)), timeout)
        finally:
            c.close()

    def rstatus(self, name: str | None = None, ro: bool = True) -> Any:
        """Status over the raw socket (cheap enough for tight polling)."""
        req: dict[str, Any] = {"action": "status"}
        if name is not None:
            req["service"] = name
        rep = self.request(req, ro=ro)
        assert rep.get("ok") is True, rep
        services = rep["result"]["services"]
        if name is None:
            return {s["name"]: s for s in services}
        assert len(services) == 1, services
        return services[0]

    def subscribe(self, ro: bool = True) -> Client:
        c = self.connect(ro=ro)
        rep = c.call("subscribe")
        assert rep.get("ok") is True and rep["result"]["subscribed"] is True, rep
        c.subscribed_at = (rep["result"]["epoch"], rep["result"]["seq"])  # type: ignore[attr-defined]
        return c

    # logs ----------------------------------------------------------------
    def log_file(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def log_lines(self, name: str, path: Path | None = None) -> list[tuple[str, str, str]]:
        """``(timestamp, stream, text)`` for each line of a service's log file."""
        try:
            raw = (path or self.log_file(name)).read_bytes()
        except FileNotFoundError:
            return []
        out = []
        for line in raw.decode("utf-8", "replace").splitlines():
            parts = line.split(" ", 2)
            while len(parts) < 3:
                parts.append("")
            out.append((parts[0], parts[1], parts[2]))
        return out

    def wait_log(self, name: str, predicate: Callable[[str], bool], timeout: float = 10.0,
                 path: Path | None = None) -> tuple[str, str, str]:
        """Wait for a log line whose text satisfies ``predicate``; return it."""
        def found() -> tuple[str, str, str] | None:
            for entry in self.log_lines(name, path):
                if predicate(entry[2]):
                    return entry
            return None

        return wait_until(found, timeout, f"a matching line in the log of {name}")

    def probe(self, name: str, timeout: float = 10.0) -> dict[str, Any]:
        """The JSON a PY_PROBE service printed (read from its log file)."""
        _, _, text = self.wait_log(name, lambda t: t.startswith("PROBE "), timeout)
        return json.loads(text[len("PROBE "):])

    # teardown ------------------------------------------------------------
    def _remember_descendants(self) -> None:
        if self.proc is None:
            return
        try:
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                self.descendants[p.pid] = p
        except psutil.NoSuchProcess:
            pass

    def cleanup(self) -> None:
        for c in self.clients:
            c.close()
        if self.proc is not None:
            self._remember_descendants()
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    pass
        leftovers = list(self.descendants.values()) + procs_with_token(self.token)
        kill_all(leftovers)
        subtree = cgroup_subtree(self.state_dir)
        if subtree is not None:
            remove_cgroup_tree(subtree)
        tail = self.stderr_tail()
        if tail:
            print(f"--- supervisor stderr (tail) ---\n{tail}")
        shutil.rmtree(self.sockdir, ignore_errors=True)


# --------------------------------------------------------------------------
# The daemon's own log, its re-execs, crashes and restarts


def daemon_events(sup: Supervisor) -> list[dict[str, Any]]:
    """The current daemon's own log so far (JSON lines on its stderr), in order."""
    try:
        text = sup.stderr_path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:  # a line being written right now
            continue
        if isinstance(obj, dict) and isinstance(obj.get("event"), str):
            out.append(obj)
    return out


def count_events(sup: Supervisor, name: str) -> int:
    """How many times the daemon logged the event `name` so far."""
    return sum(1 for ev in daemon_events(sup) if ev["event"] == name)


def count_resumed(sup: Supervisor) -> int:
    """How many re-execs the daemon came back from so far."""
    return count_events(sup, "resumed after re-exec")


def reexec(sup: Supervisor, timeout: float = 20.0) -> None:
    """`herd reexec root`, and wait until the new image has resumed."""
    n = count_resumed(sup)
    sup.herd("reexec", "root", check=0)
    wait_until(lambda: count_resumed(sup) == n + 1, timeout, "the new image to resume")


def crash(sup: Supervisor) -> None:
    """SIGKILL the daemon (its services live on, re-parented to init)."""
    assert sup.proc is not None
    sup.send_signal(signal.SIGKILL)  # also remembers its children for the teardown
    sup.wait_exit(10)


def restart(sup: Supervisor) -> None:
    """Start a new daemon on the same sockets, state and log directories and
    configuration, once the previous one is gone.  Its stderr is kept aside
    as ``daemon.N.err``."""
    assert sup.proc is not None and sup.proc.poll() is not None, "the previous daemon still runs"
    n = 1
    while (sup.tmp / f"daemon.{n}.err").exists():
        n += 1
    sup.stderr_path.rename(sup.tmp / f"daemon.{n}.err")
    sup.proc = None
    sup.notify_path.unlink(missing_ok=True)
    sup.start(None)


def read_records(state_dir: Path) -> dict[str, dict[str, Any]]:
    """Every service's record in ``STATE_DIR/services/``, read as
    docs/configuration.md (`state-dir`) says: ``NAME.toml`` files, then the
    ``snapshot``, then the ``journal`` (JSON lines; the last record of a name
    wins; a line without its newline is torn, and ignored).  Read again
    when the snapshot was replaced meanwhile (a live supervisor compacted)."""
    import tomllib

    where = state_dir / "services"
    legacy: dict[str, dict[str, Any]] = {}
    for path in sorted(where.glob("*.toml")):
        rec = tomllib.loads(path.read_text())
        legacy[rec["name"]] = rec

    def inode() -> int | None:
        try:
            return (where / "snapshot").stat().st_ino
        except FileNotFoundError:
            return None

    while True:
        records, before = dict(legacy), inode()
        for name in ("snapshot", "journal"):
            try:
                data = (where / name).read_bytes()
            except FileNotFoundError:
                continue
            for line in data.split(b"\n")[:-1]:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("forgotten") is True:
                    records.pop(rec["name"], None)
                else:
                    records[rec["name"]] = rec
        if inode() == before:
            return records


def read_record(state_dir: Path, name: str) -> dict[str, Any] | None:
    """Service `name`'s record (see `read_records`), or None."""
    return read_records(state_dir).get(name)


def append_record(state_dir: Path, record: dict[str, Any]) -> None:
    """Append `record` (with its "name") to the journal, as the supervisor
    does: it is the service's record from now on (a forged or edited one)."""
    with open(state_dir / "services" / "journal", "ab") as f:
        f.write(json.dumps(record).encode() + b"\n")


# --------------------------------------------------------------------------
# Waiting for services


def pids_of(sup: Supervisor) -> dict[str, int | None]:
    return {name: svc["pid"] for name, svc in sup.rstatus().items()}


def wait_running(sup: Supervisor, names: list[str], timeout: float = 15.0) -> dict[str, int]:
    """Wait until every service in `names` runs; their PIDs."""
    def up() -> dict[str, int] | None:
        st = sup.rstatus()
        # a service not there yet (a reload still to come) is not running yet
        if all(n in st and st[n]["state"] == "running" and st[n]["pid"] for n in names):
            return {n: st[n]["pid"] for n in names}
        return None

    return wait_until(up, timeout, f"services {names} to be running")


def wait_respawned(sup: Supervisor, name: str, old_pid: int, timeout: float = 10.0) -> dict[str, Any]:
    """Wait until `name` runs again with a PID other than `old_pid`; its SVC."""
    def respawned() -> dict[str, Any] | None:
        svc = sup.rstatus(name)
        if svc["state"] == "running" and svc["pid"] not in (None, old_pid):
            return svc
        return None

    return wait_until(respawned, timeout, f"{name} to be respawned")


def wait_state(sup: Supervisor, name: str, state: str, timeout: float = 30.0) -> dict[str, Any]:
    """Wait until service `name` is in `state`; its SVC then.

    Subscribes (on the status socket) before it asks for the status, so a
    state reached before the subscription is seen in the status, and one
    reached after it in a ``state`` event.  A connection kept across a
    re-exec goes on; one that closes (a crash, a restart of the daemon) is
    opened again and the status asked again.  Raises AssertionError (with
    the last SVC seen) when `timeout` passes first.
    """
    deadline = Deadline(timeout)
    last: Any = None
    while not deadline.expired():
        conn: Client | None = None
        try:
            try:
                conn = Client(sup.status_socket, timeout=max(0.1, deadline.remaining()))
            except (FileNotFoundError, ConnectionRefusedError):  # not listening (yet) again
                time.sleep(0.05)
                continue
            rep = conn.call("subscribe", timeout=max(0.1, deadline.remaining()))
            assert rep.get("ok") is True, rep
            while True:
                rep = conn.call("status", name, timeout=max(0.1, deadline.remaining()))
                assert rep.get("ok") is True, rep
                [last] = rep["result"]["services"]
                if last["state"] == state:
                    return last
                # the next state event of this service, then the status again
                while True:
                    ev = conn.recv(max(0.01, deadline.remaining()))
                    if ev is None:
                        raise ConnectionClosed("the daemon closed the connection")
                    if ev.get("event") == "state" and ev.get("service") == name:
                        break
        except (ConnectionClosed, ConnectionError, TimeoutError):
            continue  # closed: open it again; timed out: the loop's condition ends it
        finally:
            if conn is not None:
                conn.close()
    raise AssertionError(f"timed out after {timeout:g} s waiting for {name} to be {state} (last SVC: {last!r})")


def assert_one_process_each(sup: Supervisor, pids: dict[str, int]) -> None:
    """Exactly the expected process carries each service's marker."""
    for name, pid in pids.items():
        assert find_pids(sup.marker(name)) == {pid}, (
            f"{name}: processes {find_pids(sup.marker(name))}, expected only {pid}")


def assert_no_process(sup: Supervisor, *names: str) -> None:
    for name in names:
        assert find_pids(sup.marker(name)) == set(), f"{name} runs: {find_pids(sup.marker(name))}"


def terminate(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM ``proc`` if it still runs, wait (bounded), then SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
