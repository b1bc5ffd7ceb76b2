"""What the page shows, kept live: one :class:`HostState` per supervisor.

For each host, :func:`watch` keeps one connection to its (read-only) socket.
On it, it sends ``ping`` (the supervisor's own state), ``subscribe`` (state
events), ``log [0, "follow"]`` (new log lines), ``detailed-status [N]`` (the
services with their recent log) and ``graph``; then each state event (or
``overflow``) makes it ask ``status`` again.  Every change goes to the
browsers through :class:`Hub` (server-sent events).  A lost connection is
retried (0.5 s, doubling to 5 s), and the page says the host is down and why.
"""

from __future__ import annotations

import collections
import re
import time
from dataclasses import dataclass, field
from typing import Any, Final

import trio

from statuspage._source import Link, SourceError, Target, open_link

__all__ = ["HostState", "Hub", "watch", "parse_dot"]

#: Events a browser may fall behind by before its stream is closed (it reconnects
#: and gets fresh snapshots).
SUBSCRIBER_BACKLOG: Final = 512

_EDGE_RE: Final = re.compile(r'^\s*"((?:[^"\\]|\\.)*)"\s*->\s*"((?:[^"\\]|\\.)*)"\s*;\s*$')


def _unquote(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def parse_dot(dot: str) -> list[list[str]]:
    """The edges ``[A, B]`` (A requires B) of the daemon's ``graph`` DOT."""
    edges = []
    for line in dot.splitlines():
        m = _EDGE_RE.match(line)
        if m:
            edges.append([_unquote(m.group(1)), _unquote(m.group(2))])
    return edges


@dataclass(slots=True)
class HostState:
    """One supervisor as the page shows it."""

    target: Target
    log_lines: int = 20
    writable: bool = False
    connected: bool = False
    error: str | None = None
    hello: dict[str, Any] = field(default_factory=dict)
    ping: dict[str, Any] = field(default_factory=dict)
    epoch: str | None = None
    seq: int | None = None
    services: list[dict[str, Any]] = field(default_factory=list)
    edges: list[list[str]] = field(default_factory=list)
    logs: dict[str, collections.deque[dict[str, Any]]] = field(default_factory=dict)
    last_event: float | None = None
    since_down: float | None = None

    def log_for(self, name: str) -> collections.deque[dict[str, Any]]:
        if name not in self.logs:
            self.logs[name] = collections.deque(maxlen=self.log_lines)
        return self.logs[name]

    def snapshot(self) -> dict[str, Any]:
        """What the browser gets for this host (JSON-ready)."""
        return {
            "host": self.target.label,
            "remote": self.target.host is not None,
            "connected": self.connected,
            "error": self.error,
            "down-since": self.since_down,
            "writable": self.writable,
            "supervisor": {
                "version": self.hello.get("version"),
                "read-only": self.hello.get("read-only"),
                "pid": self.ping.get("pid"),
                "since": self.ping.get("since"),
                "containment": self.ping.get("containment"),
                "epoch": self.epoch,
                "seq": self.seq,
                "last-event": self.last_event,
            },
            "services": self.services,
            "edges": self.edges,
            "logs": {name: list(lines) for name, lines in self.logs.items()},
        }


class Hub:
    """The hosts, and the browsers listening for changes."""

    def __init__(self, hosts: list[HostState]) -> None:
        self.hosts = hosts
        self._subscribers: set[trio.MemorySendChannel[tuple[str, Any]]] = set()

    def subscribe(self) -> trio.MemoryReceiveChannel[tuple[str, Any]]:
        """A channel of ``(event, data)``; it is closed when its reader falls too far behind."""
        send, receive = trio.open_memory_channel[tuple[str, Any]](SUBSCRIBER_BACKLOG)
        self._subscribers.add(send)
        return receive

    def unsubscribe(self, receive: trio.MemoryReceiveChannel[tuple[str, Any]]) -> None:
        for send in list(self._subscribers):
            if send.statistics().open_receive_channels == 0:
                self._subscribers.discard(send)
                send.close()
        receive.close()

    def publish(self, event: str, data: Any) -> None:
        for send in list(self._subscribers):
            try:
                send.send_nowait((event, data))
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.discard(send)
                send.close()

    def changed(self, host: HostState) -> None:
        self.publish("host", host.snapshot())

    def state(self) -> list[dict[str, Any]]:
        return [h.snapshot() for h in self.hosts]


def _line_key(line: dict[str, Any]) -> tuple[Any, ...]:
    return (line.get("time"), line.get("stream"), line.get("line"))


class _Follower:
    """Reads one connection and keeps ``host`` up to date."""

    def __init__(self, hub: Hub, host: HostState, link: Link) -> None:
        self.hub = hub
        self.host = host
        self.link = link
        self.pending: dict[int, str] = {}
        self.early_logs: list[dict[str, Any]] | None = []  # log events before the first status
        self.status_in_flight = False
        self.status_again = False

    async def ask(self, action: str, args: list[Any] | None = None) -> None:
        self.pending[await self.link.send(action, None, args)] = action

    async def refresh(self) -> None:
        if self.status_in_flight:
            self.status_again = True
            return
        self.status_in_flight = True
        await self.ask("status")

    async def run(self) -> None:
        host = self.host
        await self.ask("ping")
        await self.ask("subscribe")
        await self.ask("log", [0, "follow"])
        await self.ask("detailed-status", [host.log_lines])
        await self.ask("graph")
        while True:
            obj = await self.link.read()
            if "event" in obj:
                await self.event(obj)
            else:
                await self.reply(obj)

    async def event(self, obj: dict[str, Any]) -> None:
        kind = obj.get("event")
        host = self.host
        if kind == "log":
            if self.early_logs is not None:
                self.early_logs.append(obj)
                return
            line = {k: obj.get(k) for k in ("time", "service", "stream", "line")}
            host.log_for(str(obj.get("service"))).append(line)
            self.hub.publish("log", {"host": host.target.label, "line": line})
        elif kind == "state":
            host.last_event = time.time()
            if isinstance(obj.get("seq"), int):
                host.seq = obj["seq"]
            await self.refresh()
        elif kind == "overflow":
            await self.refresh()
        elif kind == "heartbeat":
            host.last_event = time.time()

    async def reply(self, obj: dict[str, Any]) -> None:
        action = self.pending.pop(obj.get("id"), None)  # type: ignore[arg-type]
        if action is None:
            return
        host = self.host
        if obj.get("ok") is not True:
            error = obj.get("error") if isinstance(obj.get("error"), dict) else {}
            raise SourceError(f"{host.target.label}: {action} failed: {error.get('message') or error}")
        result = obj.get("result") or {}
        if action == "ping":
            host.ping = result
        elif action == "subscribe":
            host.epoch, host.seq = result.get("epoch"), result.get("seq")
        elif action == "graph":
            host.edges = parse_dot(str(result.get("dot", "")))
        elif action in ("status", "detailed-status"):
            names = [s.get("name") for s in host.services]
            services = [dict(s) for s in result.get("services") or []]
            for svc in services:
                svc.pop("processes", None)  # live figures: not in `status`, so not shown half the time
                recent = svc.pop("recent-log", None)
                if recent is not None:
                    log = host.log_for(svc["name"])
                    log.clear()
                    log.extend(recent)
            if self.early_logs is not None and action == "detailed-status":
                for ev in self.early_logs:
                    log = host.log_for(str(ev.get("service")))
                    line = {k: ev.get(k) for k in ("time", "service", "stream", "line")}
                    if _line_key(line) not in {_line_key(x) for x in log}:
                        log.append(line)
                self.early_logs = None
            host.services = services
            if action == "status":
                self.status_in_flight = False
                if self.status_again:
                    self.status_again = False
                    await self.refresh()
                if [s.get("name") for s in services] != names:
                    await self.ask("graph")
        self.hub.changed(host)


async def watch(hub: Hub, host: HostState) -> None:
    """Keep ``host`` connected and current, forever (until cancelled)."""
    delay = 0.5
    while True:
        try:
            link = await open_link(host.target)
        except SourceError as exc:
            _down(hub, host, str(exc))
        else:
            async with link:
                host.connected, host.error, host.since_down = True, None, None
                host.hello = link.hello
                delay = 0.5
                try:
                    await _Follower(hub, host, link).run()
                except SourceError as exc:
                    _down(hub, host, str(exc))
        await trio.sleep(delay)
        delay = min(delay * 2, 5.0)


def _down(hub: Hub, host: HostState, reason: str) -> None:
    if host.connected or host.error != reason:
        host.connected = False
        host.error = reason
        if host.since_down is None:
            host.since_down = time.time()
        hub.changed(host)
