"""The keeper: holds every service's output pipes and listening sockets
while the supervisor is down (docs/keeper.md).

A small process of the standard library only, started by the supervisor as
``python -I -S .../supervisor/_keeper.py`` with its listening socket
(``STATE_DIR/keeper/keeper.sock``, a SOCK_SEQPACKET Unix socket, mode 0600
in a 0700 directory) as standard input.  The supervisor stays connected to
it; the connection is how each learns of the other's death.

* While a supervisor is connected, the keeper only receives duplicates of
  descriptors (``put``, ``drop``) and reads nothing else: it costs no CPU.
  It holds a pipe's read end only.  At start it raises its soft open-files
  limit to the hard one; a descriptor it cannot take all the same (its table
  is full: the message arrives with MSG_CTRUNC) is never lost silently: it
  says so on its stderr (the supervisor's log) and answers
  ``{"op": "refused", "key": K, "error": ...}``, which the supervisor logs.
* When the connection ends without a ``bye`` (the supervisor was killed), it
  drains every pipe it holds into the services' log files, through
  `_logfile` (the same format, rotation and symlink protections as the
  supervisor's), timestamping each line when it reads it.  Nothing is kept
  in memory beyond one read.  A pipe at its end (the service and all it
  left running are gone) gets its last line ended and is read no more.
* A supervisor started on the same state directory connects, asks for
  everything (``take``): the keeper stops reading at once and sends each
  descriptor back; the file already holds what it drained, in order, and an
  unfinished line there is completed by the next writer.
* ``bye`` (the supervisor's orderly shutdown): it closes everything and exits.

Messages are JSON objects, one per datagram, descriptors attached with
SCM_RIGHTS: ``{"op": "put", "key": K, "meta": {...}}`` + fds,
``{"op": "drop", "key": K}`` (with ``"ack": true`` answered by
``{"op": "dropped"}``: a listening socket must be closed before its address
is bound again), ``{"op": "reset"}``, ``{"op": "take"}`` (answered
by one ``{"op": "item", "key": K, "meta": {...}}`` + fds per item, then
``{"op": "end", "pid": P}``) and ``{"op": "bye"}``.  A pipe's meta is
``{"kind": "pipe", "service", "stream", "path", "max-size", "max-backups"}``
(its one descriptor: the read end).
Only a peer with the keeper's own uid (or root) is served.
"""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import socket
import sys
import types
from datetime import datetime
from pathlib import Path
from typing import Any, Final

__all__ = ["MAX_MESSAGE", "MAX_FDS", "DescriptorsLost", "send", "receive", "table", "loud", "main"]

#: The largest message (bytes) and the most descriptors one carries.
MAX_MESSAGE: Final = 65536
MAX_FDS: Final = 16
#: How much is read from one pipe at a time while draining.
READ_SIZE: Final = 65536


class DescriptorsLost(ValueError):
    """A message arrived without its descriptors (MSG_CTRUNC: the receiver's
    table was full); `msg` is the message, when it could be read."""

    def __init__(self, msg: dict[str, Any] | None, why: str) -> None:
        super().__init__(why)
        self.msg = msg


def loud(count: int) -> bool:
    """Whether the `count`-th of a repeated failure is logged: the 1st, 10th, 100th …"""
    while count % 10 == 0:
        count //= 10
    return count == 1


def table() -> str:
    """This process's descriptors in use and its limit, for a message."""
    try:
        used = str(len(os.listdir("/proc/self/fd")))
    except OSError:
        used = "?"
    return f"{used} descriptors open, open-files limit {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}"


def send(sock: socket.socket, msg: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
    """One message (with descriptors).

    Raises:
        OSError: the peer is gone (or would block).
    """
    data = json.dumps(msg, separators=(",", ":")).encode()
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def receive(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """One message and its descriptors; (None, []) at the end of the connection.

    Raises:
        OSError: the connection broke (reset), or nothing is there (non-blocking).
        DescriptorsLost: the message came without (all) its descriptors (those
            that came are closed).
        ValueError: not a message of ours (descriptors received are closed).
    """
    data, fds, flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
    if flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        try:
            msg = json.loads(data)
        except ValueError:
            msg = None
        raise DescriptorsLost(msg if isinstance(msg, dict) else None,
                              f"descriptors sent were lost (MSG_CTRUNC; {table()})")
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    try:
        msg = json.loads(data)
        if not isinstance(msg, dict):
            raise ValueError("not an object")
    except ValueError:
        for fd in fds:
            os.close(fd)
        raise
    return msg, fds


def _warn(text: str, **fields: object) -> None:
    try:
        print(json.dumps({"event": text, "logger": "supervisor.keeper", "pid": os.getpid(), **fields}),
              file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _load_logfile() -> types.ModuleType:
    """`supervisor._logfile` without the package's __init__ (which imports trio)."""
    here = os.path.dirname(os.path.abspath(__file__))
    pkg = sys.modules.get("supervisor")
    if pkg is None:
        pkg = types.ModuleType("supervisor")
        pkg.__path__ = [here]  # type: ignore[attr-defined]
        sys.modules["supervisor"] = pkg
    from supervisor import _logfile
    return _logfile


class Keeper:
    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.peer: socket.socket | None = None
        self.items: dict[str, tuple[dict[str, Any], list[int]]] = {}
        self.files: dict[str, Any] = {}  # log path → LogFile (only while draining)
        self.open_files: Any = None  # `_logfile.OpenFiles`, once a file is written
        self.ended: set[int] = set()  # pipes at their end (no writer left): not polled
        self.refused = 0  # descriptors that could not be taken (see `_refuse`)
        self._logfile: types.ModuleType | None = None

    # -- the connection -----------------------------------------------------------

    def accept(self) -> None:
        conn, _ = self.listener.accept()
        uid = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        peer_uid = int.from_bytes(uid[4:8], sys.byteorder)
        if peer_uid not in (0, os.getuid()) or self.peer is not None:
            conn.close()  # a stranger, or a second supervisor while one is connected
            return
        self.peer = conn
        for f in self.files.values():  # it writes from now on
            f.close()
        self.files.clear()
        self.ended.clear()
        self.open_files = None

    def serve(self) -> bool:
        """One message from the supervisor; False when it is gone."""
        assert self.peer is not None
        try:
            msg, fds = receive(self.peer)
        except BlockingIOError:
            return True
        except DescriptorsLost as exc:
            self._refuse(exc)
            return True
        except ConnectionResetError:
            msg, fds = None, []
        except (OSError, ValueError) as exc:
            _warn("bad message from the supervisor; disconnecting", error=str(exc))
            msg, fds = None, []
        if msg is None:
            self.peer.close()
            self.peer = None
            return False
        op = msg.get("op")
        if op == "put" and isinstance(msg.get("key"), str) and isinstance(msg.get("meta"), dict):
            self._close(msg["key"])
            self.items[msg["key"]] = (msg["meta"], fds)
            return True
        for fd in fds:
            os.close(fd)
        if op == "drop" and isinstance(msg.get("key"), str):
            self._close(msg["key"])
            if msg.get("ack"):
                send(self.peer, {"op": "dropped", "key": msg["key"]})
        elif op == "reset":
            for key in list(self.items):
                self._close(key)
        elif op == "take":
            for key, (meta, held) in self.items.items():
                send(self.peer, {"op": "item", "key": key, "meta": meta}, held)
            send(self.peer, {"op": "end", "pid": os.getpid()})
        elif op == "bye":
            for key in list(self.items):
                self._close(key)
            raise SystemExit(0)  # the supervisor removes the socket
        return True

    def _refuse(self, exc: DescriptorsLost) -> None:
        """A `put` whose descriptors did not come: say so, loudly (the
        supervisor logs the answer); what the key held before is let go."""
        assert self.peer is not None
        key = exc.msg.get("key") if exc.msg is not None else None
        if isinstance(key, str):
            self._close(key)
        self.refused += 1
        if loud(self.refused):
            _warn("cannot hold a descriptor: the supervisor is told (raise the hard open-files limit)",
                  key=key, error=str(exc), refused=self.refused)
        try:
            send(self.peer, {"op": "refused", "key": key, "error": str(exc)})
        except OSError:
            pass

    def _close(self, key: str) -> None:
        item = self.items.pop(key, None)
        if item is not None:
            for fd in item[1]:
                self.ended.discard(fd)
                os.close(fd)

    # -- draining -------------------------------------------------------------------

    def pipes(self) -> dict[int, dict[str, Any]]:
        """read end → meta, for every pipe held that may still give something."""
        return {fds[0]: meta for meta, fds in self.items.values()
                if meta.get("kind") == "pipe" and fds and fds[0] not in self.ended}

    def drain(self, fd: int, meta: dict[str, Any]) -> None:
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            _warn("cannot read a pipe", service=meta.get("service"), error=str(exc))
            self.ended.add(fd)  # not polled again: it would spin
            return
        now = datetime.now().astimezone()  # when it was read
        path, stream = str(meta.get("path")), str(meta.get("stream"))
        if not data:  # no writer left: end its last line, and read it no more
            self.ended.add(fd)
            if (f := self.files.get(path)) is not None and f.unfinished(stream):
                f.feed(stream, b"", now, final=True)
                self.open_files.used(f)
            return
        f = self.files.get(path)
        if f is None:
            if self._logfile is None:
                self._logfile = _load_logfile()
            service = meta.get("service")

            def report(exc: OSError, service: object = service, path: str = path) -> None:
                _warn("log file not writable; output lost", service=service, path=path, error=str(exc))

            f = self.files[path] = self._logfile.LogFile(
                Path(path), max_size=int(meta.get("max-size", 0)), max_backups=int(meta.get("max-backups", 3)),
                on_error=report, collect=False)
        if self.open_files is None:
            self.open_files = self._logfile.OpenFiles(self._logfile.MAX_OPEN)
        f.feed(stream, data, now)
        self.open_files.used(f)

    # -- the loop -------------------------------------------------------------------

    def run(self) -> None:
        while True:
            poll = select.poll()
            poll.register(self.listener, select.POLLIN)
            pipes: dict[int, dict[str, Any]] = {}
            if self.peer is not None:
                poll.register(self.peer, select.POLLIN)
            else:
                pipes = self.pipes()
                for fd in pipes:
                    poll.register(fd, select.POLLIN)
            for fd, _events in poll.poll():
                if fd == self.listener.fileno():
                    if self.peer is None:
                        self.accept()
                    else:
                        self.listener.accept()[0].close()
                elif self.peer is not None and fd == self.peer.fileno():
                    if not self.serve():
                        _warn("the supervisor is gone; draining the services' output", pipes=len(self.pipes()))
                        break
                elif self.peer is None and fd in pipes:
                    self.drain(fd, pipes[fd])


def _raise_nofile() -> None:
    """Soft open-files limit to the hard one: it holds every service's pipes."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            _warn("cannot raise the open-files limit", soft=soft, hard=hard, error=str(exc))


def main() -> int:
    _raise_nofile()
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    devnull = os.open(os.devnull, os.O_RDONLY)
    listener = socket.socket(fileno=os.dup(0))
    os.dup2(devnull, 0)
    os.close(devnull)
    listener.set_inheritable(False)
    Keeper(listener).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
