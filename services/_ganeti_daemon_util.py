#!/usr/bin/python3
"""A replacement for Ganeti's ``daemon-util`` that asks the supervisor.

Ganeti starts and stops its daemons itself through
``/usr/lib/ganeti/daemon-util`` (``gnt-cluster init``, the watcher, noded,
master failover).  Installed in its place (see ``docs/service-ganeti.md``:
``dpkg-divert``), this script routes those requests to the supervisor over
its control socket, as Guix's patch to Ganeti routes them through ``herd``,
so that the supervisor stays the single owner of the daemons:

* ``check NAME``: exit 0 when the service is running, 1 otherwise.
* ``start NAME [ARGS]``: enable the service if it is disabled, then start it;
  like Guix, a failed start is reported but not an error (a daemon that is
  not needed on this node exits and stays down).  ``start ganeti-wconfd
  --force-node ...`` (master failover) runs ``force-start ganeti-wconfd``.
* ``stop NAME``: stop it if the supervisor knows it.
* ``check-and-start NAME``: never restarts a supervised daemon: when it is
  not running, says so and exits 1 (the supervisor respawns crashes itself;
  a daemon that is down stays down for a reason).
* ``start-all``, ``stop-all``, ``start-master``, ``stop-master``,
  ``rotate-logs NAME`` (SIGHUP), ``rotate-all-logs``, and the informational
  verbs (``list-start-daemons``, ``daemon-pidfile``, ``check-config``, …) as
  Ganeti's own script has them.

When no supervisor answers on its socket (``$SUPERVISOR_SOCKET``, else
``/run/supervisor/control.sock``) or it has no ``ganeti-*`` service, the
original script (``$GANETI_DAEMON_UTIL_ORIGINAL``, else the dpkg-diverted
``daemon-util.distrib`` next to this file) is run instead, so Ganeti keeps
working without the supervisor.

Standard library only: it runs under the system's ``python3``, outside the
project's environment.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import socket
import subprocess
import sys

DAEMONS = ["ganeti-noded", "ganeti-confd", "ganeti-wconfd", "ganeti-rapi", "ganeti-luxid", "ganeti-kvmd",
           "ganeti-mond"]
ON_DEMAND = ["ganeti-metad"]
ALL = DAEMONS + ON_DEMAND
MASTER = ["ganeti-wconfd", "ganeti-rapi", "ganeti-luxid"]
RUN_DIR = "/var/run/ganeti"
DATA_DIR = "/var/lib/ganeti"
DEFAULT_SOCKET = "/run/supervisor/control.sock"
TIMEOUT = 120.0  # a start waits for readiness (start-timeout is 60 s by default)


class Unreachable(Exception):
    """No supervisor answers."""


class Failed(Exception):
    """The supervisor answered with an error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def socket_path() -> str:
    return os.environ.get("SUPERVISOR_SOCKET") or DEFAULT_SOCKET


def request(action: str, service: str | None = None, args: list | None = None) -> dict:
    """One request on a fresh connection; the reply's result (messages printed)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    try:
        sock.connect(socket_path())
    except OSError as exc:
        sock.close()
        raise Unreachable(f"{socket_path()}: {exc.strerror or exc}") from None
    with sock:
        reader = sock.makefile("rb")
        hello = json.loads(reader.readline() or b"null")
        if not isinstance(hello, dict) or hello.get("hello") != "supervisor":
            raise Unreachable(f"{socket_path()}: not a supervisor ({hello!r})")
        req: dict = {"id": 1, "action": action, "args": args or []}
        if service is not None:
            req["service"] = service
        sock.sendall(json.dumps(req).encode() + b"\n")
        while True:
            line = reader.readline()
            if not line:
                raise Unreachable("the supervisor closed the connection")
            reply = json.loads(line)
            if reply.get("id") == 1 and "event" not in reply:
                break
    for message in reply.get("messages") or []:
        print(message)
    if not reply.get("ok"):
        error = reply.get("error") or {}
        raise Failed(str(error.get("code")), str(error.get("message")))
    return reply.get("result") or {}


def status(name: str) -> dict | None:
    """The service's SVC, or None when the supervisor does not know it."""
    try:
        [svc] = request("status", name, [0])["services"]
    except Failed as exc:
        if exc.code == "unknown-service":
            return None
        raise
    return svc


def supervised() -> bool:
    """Whether a supervisor answers and runs Ganeti (Guix: ``herd status`` mentions ganeti)."""
    try:
        services = request("status")["services"]
    except (Unreachable, Failed, ValueError):
        return False
    return any(str(s.get("name", "")).startswith("ganeti-") for s in services)


# -- the verbs -----------------------------------------------------------------------------------


def check(name: str) -> int:
    svc = status(name)
    return 0 if svc is not None and svc.get("state") == "running" else 1


def start(name: str, *args: str) -> int:
    if name == "ganeti-wconfd" and "--force-node" in args:
        try:
            request("force-start", name)
        except Failed as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            return 1
        return 0
    if args:
        print(f"daemon-util: {name}: extra arguments ignored under the supervisor: {' '.join(args)}",
              file=sys.stderr)
    svc = status(name)
    if svc is None:
        print(f"Unknown daemon name '{name}' (the supervisor has no such service)", file=sys.stderr)
        return 1
    if not svc.get("enabled", True):
        request("enable", name)
    try:
        request("start", name)
    except Failed as exc:  # like Guix: not an error (a daemon not needed here stays down)
        print(f"{name}: {exc}", file=sys.stderr)
    return 0


def stop(name: str, *args: str) -> int:
    if status(name) is not None:
        request("stop", name)
    return 0


def check_and_start(name: str) -> int:
    if check(name) == 0:
        return 0
    print(f"{name} supervised by the supervisor but not running, will not restart.")
    return 1


def start_all() -> int:
    for name in DAEMONS:
        start(name)
    return 0


def stop_all() -> int:
    for name in reversed(ALL):
        stop(name)
    return 0


def start_master() -> int:
    for name in MASTER:
        start(name)
    return 0


def stop_master() -> int:
    for name in reversed(MASTER):
        stop(name)
    return 0


def rotate_logs(name: str) -> int:
    svc = status(name)
    if svc is not None and svc.get("pid"):
        try:
            os.kill(int(svc["pid"]), signal.SIGHUP)
        except ProcessLookupError:
            pass
    return 0


def rotate_all_logs() -> int:
    for name in reversed(ALL):
        rotate_logs(name)
    return 0


def reload_ssh_keys() -> int:
    return subprocess.call(["/usr/sbin/service", "ssh", "restart"])


def daemon_pidfile(name: str) -> int:
    print(f"{RUN_DIR}/{name}.pid")
    return 0


def daemon_executable(name: str) -> int:
    print(f"/usr/sbin/{name}")
    return 0


def list_start_daemons() -> int:
    print("\n".join(DAEMONS))
    return 0


def list_stop_daemons() -> int:
    print("\n".join(reversed(ALL)))
    return 0


def is_daemon_name(name: str) -> int:
    if name in ALL:
        return 0
    print(f"Unknown daemon name '{name}'", file=sys.stderr)
    return 1


def check_config() -> int:
    pem = f"{DATA_DIR}/server.pem"
    if not os.path.isfile(pem):
        print(f"Missing configuration file {pem}", file=sys.stderr)
        return 1
    return 0


def check_exitcode(rc: str) -> int:
    if rc == "0":
        return 0
    if rc == "11":
        print("not master")
        return 0
    print(f"exit code {rc}")
    return 1


VERBS = {
    "check": check, "start": start, "stop": stop, "check-and-start": check_and_start,
    "start-all": start_all, "stop-all": stop_all, "start-master": start_master, "stop-master": stop_master,
    "rotate-logs": rotate_logs, "rotate-all-logs": rotate_all_logs, "reload-ssh-keys": reload_ssh_keys,
    "daemon-pidfile": daemon_pidfile, "daemon-executable": daemon_executable,
    "list-start-daemons": list_start_daemons, "list-stop-daemons": list_stop_daemons,
    "is-daemon-name": is_daemon_name, "check-config": check_config, "check-exitcode": check_exitcode,
}
#: Verbs that do not need the supervisor.
LOCAL = {"reload-ssh-keys", "daemon-pidfile", "daemon-executable", "list-start-daemons", "list-stop-daemons",
         "is-daemon-name", "check-config", "check-exitcode"}


def original() -> str:
    return os.environ.get("GANETI_DAEMON_UTIL_ORIGINAL") or os.path.realpath(__file__) + ".distrib"


def main(argv: list[str]) -> int:
    if not argv:
        print(f"Usage: {sys.argv[0]} <action>", file=sys.stderr)
        return 1
    verb, args = argv[0], argv[1:]
    if "_" in verb:
        print("Command must not contain underscores", file=sys.stderr)
        return 1
    fn = VERBS.get(verb)
    if fn is None:
        print(f"Unknown command: {verb}", file=sys.stderr)
        return 1
    if verb not in LOCAL and not supervised():
        fallback = original()
        if os.access(fallback, os.X_OK):
            os.execv(fallback, [fallback, *argv])
        print(f"daemon-util: no supervisor with Ganeti services answers on {socket_path()}, and the "
              f"original daemon-util ({fallback}) is not there", file=sys.stderr)
        return 1
    try:
        inspect.signature(fn).bind(*args)
    except TypeError:
        print(f"daemon-util {verb}: wrong arguments: {' '.join(args) or '(none)'}", file=sys.stderr)
        return 1
    try:
        return fn(*args)
    except (Unreachable, Failed) as exc:
        print(f"daemon-util {verb}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
