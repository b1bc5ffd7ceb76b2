"""The driver that runs inside a test's private namespaces (see ``namespaces.py``).

Run as ``python ns_driver.py SPEC.json``, usually as the PID 1 of a new PID
namespace.  It runs the test file's ``inside`` code (its setup of the private
world, and its own step kinds and helpers), starts the supervisor on the
test's configuration, waits for its ``READY=1``, runs the steps, stops the
supervisor and prints one JSON report on stdout::

    {"ready": bool, "steps": {ID: result}, "setup": [commands run by sh()],
     "daemon-exit": int, "error": "traceback" (only when something raised)}

Each step is ``{"id": ID, "do": KIND, ...}``; its result goes to
``out["steps"][ID]``.  ``python`` steps run test code with this module's
names in scope and record what they like in ``out["steps"]`` themselves.

The ``inside`` code may define ``setup()`` (before the supervisor starts),
``finish()`` (after it stopped) and add to ``KINDS``.  It is exec'd into this
module's namespace, so it sees and may change ``env``, ``work``, ``sock``…

This file is standard-library only: it runs under the test's interpreter,
but inside a world the test built (another ``/etc``, a tmpfs ``/run``…).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

spec: dict[str, Any] = {}  # SPEC.json
out: dict[str, Any] = {"ready": False, "steps": {}, "setup": []}  # the report
work = sock = ro = notify = ""  # the supervisor's directory (short: unix socket paths are limited), sockets
env: dict[str, str] = {}  # for the supervisor and run()
daemon: subprocess.Popen[bytes] | None = None


# -- helpers for the inside code and the steps ----------------------------------------------


def sh(*argv: Any, check: bool = True, timeout: float = 60, input: str | None = None) -> Any:
    """A setup command; recorded in ``out["setup"]``; raises RuntimeError when it fails."""
    p = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, input=input)
    out["setup"].append({"argv": [str(a) for a in argv], "rc": p.returncode, "err": p.stderr})
    if check and p.returncode:
        raise RuntimeError(f"{argv}: exit {p.returncode}: {p.stderr.strip()}")
    return p


def attempt(fn: Callable[[], Any]) -> Any:
    """``fn()``, or ``{"errno", "error"}`` of the OSError it raised."""
    try:
        return fn()
    except OSError as exc:
        return {"errno": exc.errno, "error": exc.strerror}


def run(*argv: Any, timeout: float = 60) -> dict[str, Any]:
    """Run a command to completion: ``{"rc", "out", "err", "took"}``."""
    t = time.monotonic()
    p = subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=env, timeout=timeout)
    return {"rc": p.returncode, "out": p.stdout, "err": p.stderr, "took": time.monotonic() - t}


def herd(*args: str, ro_socket: bool = False) -> dict[str, Any]:
    return run(spec["python"], "-m", "herd", "-s", ro if ro_socket else sock, *args)


def herd_ok(*args: str) -> str:
    r = herd(*args)
    assert r["rc"] == 0, f"herd {' '.join(args)}: {r}"
    return r["out"]


def herd_json(*args: str) -> Any:
    return json.loads(herd_ok("--json", *args))


def request(action: str, service: str | None = None, args: list[Any] | None = None) -> dict[str, Any]:
    """One request on a fresh connection (``status`` on the read-only socket); the reply."""
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(60)
    c.connect(ro if action == "status" else sock)
    r = c.makefile("rb")
    r.readline()
    req: dict[str, Any] = {"id": 1, "action": action, "args": args or []}
    if service:
        req["service"] = service
    c.sendall(json.dumps(req).encode() + b"\n")
    while True:
        reply = json.loads(r.readline())
        if reply.get("id") == 1:
            c.close()
            return reply


def status(name: str | None = None) -> Any:
    """One service's SVC, or ``{name: SVC}`` of all."""
    services = request("status", name)["result"]["services"]
    return services[0] if name else {s["name"]: s for s in services}


def wait_for(fn: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {value!r})")
        time.sleep(interval)


def tail(path: str, n: int = 80) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def _python(step: dict[str, Any]) -> None:
    exec(compile(step["code"], "<test steps>", "exec"), dict(globals()))


def _sleep(step: dict[str, Any]) -> dict[str, Any]:
    time.sleep(step["arg"])
    return {}


#: What a step's "do" does: KIND -> function(step) -> its result.
KINDS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "python": _python,
    "herd": lambda step: herd(*step["arg"], ro_socket=step.get("ro", False)),
    "run": lambda step: attempt(lambda: run(*step["arg"], timeout=step.get("timeout", 120))),
    "status": lambda step: status(step.get("service")),
    "sleep": _sleep,
    "read": lambda step: attempt(lambda: {"text": open(step["arg"]).read()}),
    "ls": lambda step: attempt(lambda: {"entries": sorted(os.listdir(step["arg"]))}),
    "exists": lambda step: {"exists": os.path.exists(step["arg"])},
    "readlink": lambda step: {"target": os.readlink(step["arg"])} if os.path.islink(step["arg"]) else {},
}


# -- the supervisor ---------------------------------------------------------------------------


def start_supervisor() -> None:
    """Start the supervisor; ``out["ready"]`` once it sent READY=1 (within 30 s)."""
    global daemon
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(notify)
    listener.settimeout(0.25)
    with open(spec["log"], "wb") as log:
        daemon = subprocess.Popen(
            [spec["python"], "-m", "supervisor", "-c", spec["config"], "-s", sock, "--status-socket", ro,
             "--state-dir", f"{work}/state", "--log-dir", spec["log_dir"], "--log-format", "json"],
            env=dict(env, NOTIFY_SOCKET=notify), stdout=log, stderr=log, cwd=spec["cwd"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and daemon.poll() is None:
        try:
            if b"READY=1" in listener.recv(4096).split(b"\n"):
                out["ready"] = True
                break
        except socket.timeout:
            pass
    listener.close()


def stop_supervisor() -> None:
    if daemon is None:
        return
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
    out["daemon-exit"] = daemon.returncode


def main() -> None:
    global work, sock, ro, notify, env
    spec.update(json.load(open(sys.argv[1])))
    work = tempfile.mkdtemp(prefix="ns-", dir="/tmp")
    sock, ro, notify = f"{work}/rw.sock", f"{work}/ro.sock", f"{work}/test-notify.sock"
    env = dict(os.environ, PYTHONPATH=spec["root"])
    exec(compile(spec["inside"], "<inside code>", "exec"), globals())
    try:
        if "setup" in globals():
            globals()["setup"]()
        start_supervisor()
        for step in spec["steps"] if out["ready"] else []:
            result = KINDS[step["do"]](step)
            if "id" in step:
                out["steps"][step["id"]] = result
    except BaseException:
        out["error"] = traceback.format_exc()
    finally:
        try:
            stop_supervisor()
            if "finish" in globals():
                globals()["finish"]()
        except BaseException:
            out.setdefault("error", traceback.format_exc())
        shutil.rmtree(work, ignore_errors=True)
        print(json.dumps(out))


if __name__ == "__main__":
    main()
