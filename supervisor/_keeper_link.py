"""The supervisor's side of the keeper (docs/keeper.md, `_keeper`).

At start-up `KeeperLink.open` connects to the keeper a crashed predecessor
left (or, after a re-exec, keeps the connection the previous image handed
over) and takes back what it holds; with no keeper there, it starts one.
Every service pipe and listening socket is then put (a duplicate, over
SCM_RIGHTS) in the keeper as it is made, and dropped when it is closed.
`run` watches the connection: a keeper that dies is started again and told
everything anew.  `close` (the orderly shutdown) tells it to exit.

Sending never blocks for long: a keeper that does not make room for a
message within `LAG_TIMEOUT` (a second) is killed and replaced, so the
keeper can never hold the supervisor up.

A descriptor that does not reach the other side (a full descriptor table:
the message comes with MSG_CTRUNC) is never lost silently: a `put` the
keeper could not take is answered ``refused`` and logged here, one error
line (then again at the 10th, the 100th … with the count); so is one not
taken back at start.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

import psutil
import structlog
import trio

from . import _fs, _proc
from ._keeper import DescriptorsLost, loud, receive, send, table

__all__ = ["KeeperLink", "Held"]

log = structlog.get_logger("supervisor.keeper")

#: The keeper program: run by path, so that it imports neither trio nor the package.
SCRIPT: Final = str(Path(__file__).with_name("_keeper.py"))
#: A keeper that died is started again after this long (seconds), at the most often.
RESTART_DELAY: Final = 1.0
#: How long the keeper may take to answer `take` or to exit after `bye`.
ANSWER_TIMEOUT: Final = 5.0
#: How long a message may wait for room in a keeper's full queue before the keeper is replaced (seconds).
LAG_TIMEOUT: Final = 1.0

#: key → (meta, descriptors)
Held = dict[str, tuple[dict[str, Any], list[int]]]


def pipe_key(service: str, stream: str) -> str:
    return f"{service}/{stream}"


def socket_key(service: str, what: str) -> str:
    return f"{service}/socket/{what}"


class KeeperLink:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "keeper"
        self.sock: socket.socket | None = None
        self.pid: int | None = None
        self.child: _proc.Child | None = None  # when the keeper is our child
        self.items: dict[str, tuple[dict[str, Any], tuple[int, ...]]] = {}
        self._stale: set[str] = set()  # taken back at start, not put again yet
        # each service's socket keys, put or stale: `keep_sockets` runs at every
        # actor's exit, and a scan of every item there made a shutdown O(N²)
        self._socket_keys: dict[str, set[str]] = {}
        self._lost_keys: set[str] = set()  # held by the keeper, not taken back (no room for the fds)
        self.closing = False
        self._gone = trio.Event()  # set by `run` when the keeper has left after `close`
        self.refused = 0  # `put`s the current keeper could not take

    # -- start-up -------------------------------------------------------------------

    def open(self, fd: int | None = None) -> Held:
        """Connect (`fd`: the connection a previous image handed over) or start
        a keeper; return what a previous supervisor's keeper held.

        The keeper goes on holding it until `forget_stale`: call that once
        every pipe and socket in use was put again.
        """
        taken: Held = {}
        if fd is not None:
            os.set_inheritable(fd, False)
            self._attach(socket.socket(fileno=fd), None)
        else:
            try:
                with self._dir() as dfd:
                    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
                    try:
                        conn.connect(f"/proc/self/fd/{dfd}/keeper.sock")
                    except OSError:
                        conn.close()
                        raise
                self._attach(conn, None)
            except (FileNotFoundError, ConnectionRefusedError):
                pass
            except OSError as exc:
                log.warning("cannot reach the keeper", path=str(self.dir), error=str(exc))
        if self.sock is not None:
            try:
                taken = self._take()
                if fd is None:
                    log.info("a keeper was running; took back what it held", keeper=self.pid, items=len(taken))
            except (OSError, ValueError) as exc:
                log.error("the keeper did not hand back what it holds; starting a new one", error=str(exc))
                self._kill()
                taken = {}
        if self.sock is None:
            try:
                self._start()
            except OSError as exc:
                log.error("cannot start the keeper", error=str(exc))
        self._stale = set(taken) | self._lost_keys
        for key in self._stale:
            service, sep, _ = key.partition(socket_key("", ""))  # names hold no "/"
            if sep:
                self._socket_keys.setdefault(service, set()).add(key)
        return taken

    def _dir(self) -> Any:
        """The keeper's directory (0700), opened safely; its socket is bound and
        reached through /proc/self/fd, so no path length limit applies.

        Raises:
            OSError: it cannot be created or is unsafe.
        """
        return _fs.opened_dir(self.dir, create=True, mode=0o700)

    def _attach(self, conn: socket.socket, pid: int | None) -> None:
        """`pid`: the keeper's (SO_PEERCRED would name whoever called listen)."""
        self.sock, self.pid = conn, pid
        if self.child is None and pid and _parent_of(pid) == os.getpid():
            try:  # ours (before a re-exec): reaped through a pidfd, never a stray
                self.child = _proc.Child(self.pid, os.pidfd_open(self.pid))
            except OSError:
                pass

    def _take(self) -> Held:
        assert self.sock is not None
        self.sock.settimeout(ANSWER_TIMEOUT)
        send(self.sock, {"op": "take"})
        taken: Held = {}
        lost = 0
        self._lost_keys = set()
        try:
            while True:
                try:
                    msg, fds = receive(self.sock)
                except DescriptorsLost as exc:
                    lost += 1
                    if isinstance(key := (exc.msg or {}).get("key"), str):
                        self._lost_keys.add(key)  # the keeper still holds it: dropped with the stale ones
                    if loud(lost):
                        log.error("cannot take back what the keeper held: a pipe is taken from the service's "
                                  "guard, a socket bound anew; raise the hard open-files limit",
                                  key=(exc.msg or {}).get("key"),
                                  lost=lost, error=str(exc))
                    continue
                if msg is None:
                    raise ConnectionResetError("the keeper closed the connection")
                if msg.get("op") == "end":
                    if isinstance(msg.get("pid"), int):
                        self._attach(self.sock, msg["pid"])
                    break
                if msg.get("op") == "item" and isinstance(msg.get("key"), str):
                    for fd in fds:
                        os.set_inheritable(fd, False)
                    taken[msg["key"]] = (msg.get("meta") or {}, fds)
                else:
                    for fd in fds:
                        os.close(fd)
        except BaseException:
            close_held(taken)
            raise
        self.sock.setblocking(False)
        return taken

    def _start(self) -> None:
        """Start a keeper and connect to it.

        Raises:
            OSError: it could not be started.
        """
        with self._dir() as dfd:
            os.fchmod(dfd, 0o700)
            try:
                os.unlink("keeper.sock", dir_fd=dfd)  # nobody answered there
            except FileNotFoundError:
                pass
            address = f"/proc/self/fd/{dfd}/keeper.sock"
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            try:
                old = os.umask(0o177)
                try:
                    listener.bind(address)
                finally:
                    os.umask(old)
                listener.listen(4)
                popen = subprocess.Popen([sys.executable, "-I", "-S", SCRIPT], stdin=listener.fileno(),
                                         stdout=subprocess.DEVNULL, close_fds=True, start_new_session=True,
                                         cwd="/")
                popen.returncode = 0  # reaped through its pidfd, never by Popen
                self.child = _proc.Child(popen.pid, os.pidfd_open(popen.pid))
                conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
                conn.connect(address)
            finally:
                listener.close()
        self._attach(conn, popen.pid)
        conn.setblocking(False)
        self.refused = 0
        log.info("keeper started", keeper=self.pid)

    # -- telling it ----------------------------------------------------------------

    def put(self, key: str, meta: dict[str, Any], fds: Iterable[int]) -> None:
        held = tuple(fds)
        self.items[key] = (meta, held)
        self._stale.discard(key)
        self._send({"op": "put", "key": key, "meta": meta}, held)

    def drop(self, key: str, *, wait: bool = False) -> None:
        """Forget `key`; with `wait`, return once the keeper has closed its
        copy (a listening socket's address is free only then)."""
        if self.items.pop(key, None) is None and key not in self._stale:
            return
        self._stale.discard(key)
        self._send({"op": "drop", "key": key, "ack": wait})
        if wait and self.sock is not None:
            self._wait_dropped(key)

    def _wait_dropped(self, key: str) -> None:
        """Block (briefly: the keeper answers at once) for the keeper's answer;
        a keeper that does not answer is replaced."""
        assert self.sock is not None
        try:
            self.sock.settimeout(ANSWER_TIMEOUT)
            while True:
                try:
                    msg, fds = receive(self.sock)
                except DescriptorsLost:  # nothing is sent with descriptors now
                    continue
                for fd in fds:
                    os.close(fd)
                if msg is None:
                    raise ConnectionResetError("the keeper is gone")
                if msg.get("op") == "dropped" and msg.get("key") == key:
                    break
                self._answer(msg)
            self.sock.setblocking(False)
        except (OSError, ValueError):
            log.error("the keeper did not answer; replacing it", keeper=self.pid)
            self._kill()

    def forget_stale(self) -> None:
        """Drop what a previous keeper held that nothing uses any more."""
        for key in list(self._stale):
            self.drop(key)

    def keep_pipe(self, service: str, stream: str, fd: int | None, path: Path,
                  max_size: int, max_backups: int) -> None:
        """A service's pipe (its read end) was made (None: closed)."""
        key = pipe_key(service, stream)
        if fd is None:
            self.drop(key)
            return
        self.put(key, {"kind": "pipe", "service": service, "stream": stream, "path": str(path),
                       "max-size": max_size, "max-backups": max_backups}, (fd,))

    def keep_sockets(self, service: str, sockets: list[tuple[str, int]]) -> None:
        """A service's listening sockets now are these (name, fd)."""
        now = {socket_key(service, what): fd for what, fd in sockets}
        prefix = socket_key(service, "")
        for key in sorted(self._socket_keys.pop(service, set()) - now.keys()):
            self.drop(key, wait=True)  # (nothing sent when it is held no more)
        for key, fd in now.items():
            self.put(key, {"kind": "socket", "service": service, "socket": key[len(prefix):]}, (fd,))
        if now:
            self._socket_keys[service] = set(now)

    def _send(self, msg: dict[str, Any], fds: tuple[int, ...] = ()) -> None:
        """Send at once; if the keeper's queue is full, wait for room up to
        `LAG_TIMEOUT` (the socket's buffer holds a few hundred messages: a
        burst of puts, a re-exec or a mass start of hundreds of services,
        outruns a keeper that merely waits for a time slice), then replace it."""
        if self.sock is None:
            return  # told everything when it is back
        deadline: float | None = None
        while True:
            try:
                send(self.sock, msg, fds)
                return
            except BlockingIOError:
                now = time.monotonic()
                deadline = now + LAG_TIMEOUT if deadline is None else deadline
                if now < deadline and select.select([], [self.sock], [], deadline - now)[1]:
                    continue
                log.error("the keeper does not keep up; replacing it", keeper=self.pid,
                          waited=LAG_TIMEOUT)
                self._kill()
                return
            except OSError:
                return  # gone: `run` sees the connection end

    def _answer(self, msg: dict[str, Any]) -> None:
        """A message from the keeper other than the one awaited."""
        if msg.get("op") != "refused":
            return
        self.refused += 1
        if loud(self.refused):
            log.error("the keeper cannot hold every pipe and socket: if this supervisor is killed, a pipe it "
                      "lacks is taken from the service's guard, a socket bound anew; raise the hard "
                      "open-files limit", keeper=self.pid,
                      refused=self.refused, key=msg.get("key"), error=msg.get("error"), supervisor=table())

    # -- watching it ---------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the keeper again whenever it dies (until `close`)."""
        task_status.started()
        while True:
            if self.sock is not None:
                try:
                    await trio.lowlevel.wait_readable(self.sock)
                    msg, fds = receive(self.sock)
                except (BlockingIOError, DescriptorsLost):  # nothing is sent with descriptors now
                    continue
                except (OSError, ValueError, trio.ClosedResourceError):
                    msg, fds = None, []
                for fd in fds:
                    os.close(fd)
                if msg is not None:
                    self._answer(msg)
                    continue
                if self.closing:
                    self._gone.set()
                    return
                log.warning("the keeper is gone; starting a new one", keeper=self.pid)
            await self._forget()
            await trio.sleep(RESTART_DELAY)
            if self.closing:
                self._gone.set()
                return
            try:
                self._start()
            except OSError as exc:
                log.error("cannot start the keeper", error=str(exc))
                continue
            for key, (meta, held) in list(self.items.items()):
                self._send({"op": "put", "key": key, "meta": meta}, held)

    async def _forget(self) -> None:
        """Let go of a keeper that is gone (reaped if it is our child)."""
        self._disconnect()
        child, self.child, self.pid = self.child, None, None
        if child is not None:
            with trio.move_on_after(ANSWER_TIMEOUT):
                await child.wait()

    def _disconnect(self) -> None:
        if self.sock is not None:
            try:
                trio.lowlevel.notify_closing(self.sock)
            except RuntimeError:  # outside trio (start-up)
                pass
            self.sock.close()
            self.sock = None

    def _kill(self) -> None:
        """A keeper that does not answer: SIGKILL it (`run` starts another)."""
        if self.child is not None:
            self.child.signal(signal.SIGKILL)
        elif self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except OSError:
                pass
        self._disconnect()

    async def close(self) -> None:
        """The orderly shutdown: the keeper closes everything and exits."""
        self.closing = True
        if self.sock is None:
            return
        self._send({"op": "bye"})
        with trio.move_on_after(ANSWER_TIMEOUT):  # `run` sees it leave
            await self._gone.wait()
        await self._forget()
        try:
            with self._dir() as dfd:
                os.unlink("keeper.sock", dir_fd=dfd)
        except OSError:
            pass


def close_held(held: Held) -> None:
    for _meta, fds in held.values():
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
    held.clear()


def _parent_of(pid: int) -> int | None:
    try:
        return psutil.Process(pid).ppid()
    except psutil.Error:
        return None
