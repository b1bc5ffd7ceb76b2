"""The status page's routes.

========================  ==================================================
``GET /``                 the page (``index.html``; ``app.js``, ``app.css``,
                          ``favicon.svg`` beside it), all from the package
``GET /api/state``        every host's snapshot, and whether writes are on
``GET /events``           server-sent events: ``host`` (a host's snapshot),
                          ``log`` (one new log line); a comment every 15 s
``POST /login``           (writes on) the operator's token -> session cookie
``POST /logout``          (writes on) ends the session
``POST /api/action``      (writes on) ``{"host", "action", "service"}``,
                          with the session cookie and ``X-CSRF-Token``
========================  ==================================================

Every request must name this server in its ``Host`` header (the listening
address, ``localhost:PORT`` on a loopback address, or a ``--server-name``):
a page on another site that rebinds its DNS name to 127.0.0.1 gets 421.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from importlib import resources
from typing import Any, Final
from urllib.parse import parse_qs

import trio

from herd._client import next_object
from herd.protocol import PROTOCOL_VERSION, encode
from statuspage._auth import COOKIE, Sessions
from statuspage._http import HttpError, Request, Response
from statuspage._hub import HostState, Hub

__all__ = ["App", "WRITE_ACTIONS"]

#: The actions the page offers when writes are on.
WRITE_ACTIONS: Final = ("start", "stop", "restart", "enable", "disable")
#: Seconds between keep-alive comments on an event stream.
SSE_KEEPALIVE: Final = 15.0
#: Seconds a write action may take (a start waits for readiness).
ACTION_TIMEOUT: Final = 300.0

_STATIC: Final = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
}


def _load_static() -> dict[str, tuple[bytes, str]]:
    root = resources.files("statuspage") / "static"
    return {path: ((root / name).read_bytes(), ctype) for path, (name, ctype) in _STATIC.items()}


class App:
    """Routes requests; owns the hub, the sessions and the control socket for writes."""

    def __init__(self, hub: Hub, *, server_names: Iterable[str], sessions: Sessions | None = None,
                 control_socket: str | None = None) -> None:
        self.hub = hub
        self.server_names = {n.lower() for n in server_names}
        self.sessions = sessions
        self.control_socket = control_socket
        self.static = _load_static()

    # -- dispatch ---------------------------------------------------------
    async def __call__(self, request: Request) -> Response:
        host = request.header("host").lower()
        if host not in self.server_names:
            raise HttpError(421, f"this server does not answer for Host {host!r}")
        if request.method == "GET":
            return self._get(request)
        if request.method == "POST":
            return await self._post(request)
        raise HttpError(405, f"method {request.method} not allowed")

    def _get(self, request: Request) -> Response:
        if request.path in self.static:
            body, ctype = self.static[request.path]
            return Response(200, body, ctype)
        if request.path == "/api/state":
            return Response.json(self.state(request))
        if request.path == "/events":
            return Response(200, b"", "text/event-stream; charset=utf-8", stream=self._events)
        raise HttpError(404, "no such page")

    def state(self, request: Request) -> dict[str, Any]:
        csrf = self.sessions.csrf(request.cookies().get(COOKIE)) if self.sessions else None
        return {"writes": self.sessions is not None, "logged-in": csrf is not None, "csrf": csrf,
                "actions": list(WRITE_ACTIONS) if csrf else [], "hosts": self.hub.state()}

    # -- server-sent events ----------------------------------------------
    async def _events(self, stream: trio.SocketStream) -> None:
        receive = self.hub.subscribe()
        try:
            first = b"retry: 1000\n\n" + b"".join(_sse("host", h) for h in self.hub.state())
            await stream.send_all(first)
            while True:
                with trio.move_on_after(SSE_KEEPALIVE):
                    event, data = await receive.receive()
                    await stream.send_all(_sse(event, data))
                    continue
                await stream.send_all(b": keep-alive\n\n")
        except (trio.EndOfChannel, trio.ClosedResourceError, trio.BrokenResourceError):
            return  # fell behind (the browser reconnects), or went away
        finally:
            self.hub.unsubscribe(receive)

    # -- writes -----------------------------------------------------------
    def _same_origin(self, request: Request) -> None:
        origin = request.header("origin")
        if origin and origin.lower() != "http://" + request.header("host").lower():
            raise HttpError(403, "cross-origin request refused")
        site = request.header("sec-fetch-site")
        if site and site not in ("same-origin", "none"):
            raise HttpError(403, "cross-site request refused")

    async def _post(self, request: Request) -> Response:
        if self.sessions is None:
            raise HttpError(403, "write actions are off (start the page with --allow-writes)")
        self._same_origin(request)
        sid = request.cookies().get(COOKIE)
        if request.path == "/login":
            offered = parse_qs(request.body.decode("utf-8", "replace")).get("token", [""])[0]
            new = self.sessions.login(offered)
            if new is None:
                await trio.sleep(1)  # slows down guessing
                raise HttpError(403, "wrong token")
            cookie = f"{COOKIE}={new}; HttpOnly; SameSite=Strict; Path=/"
            return Response(303, b"", headers=[("Location", "/"), ("Set-Cookie", cookie)])
        if request.path == "/logout":
            if self.sessions.check(sid, request.header("x-csrf-token")):
                self.sessions.logout(sid)
            return Response(303, b"", headers=[("Location", "/"),
                                               ("Set-Cookie", f"{COOKIE}=; Max-Age=0; Path=/")])
        if request.path != "/api/action":
            raise HttpError(404, "no such page")
        if not self.sessions.check(sid, request.header("x-csrf-token")):
            raise HttpError(403, "log in first (session and X-CSRF-Token needed)")
        if request.header("content-type").split(";")[0].strip() != "application/json":
            raise HttpError(415, "send application/json")
        return await self._action(request.body)

    async def _action(self, body: bytes) -> Response:
        try:
            obj = json.loads(body)
        except ValueError:
            raise HttpError(400, "the body is not JSON") from None
        if not isinstance(obj, dict) or set(obj) != {"host", "action", "service"}:
            raise HttpError(400, 'expected {"host", "action", "service"}')
        action, service = obj["action"], obj["service"]
        if action not in WRITE_ACTIONS:
            raise HttpError(400, f"action {action!r} is not offered here")
        host = self._writable_host(obj["host"])
        if not isinstance(service, str) or service not in {s.get("name") for s in host.services}:
            raise HttpError(400, f"no service {service!r} on {host.target.label}")
        reply = await self._call(action, service)
        return Response.json(reply)

    def _writable_host(self, label: Any) -> HostState:
        for host in self.hub.hosts:
            if host.target.label == label:
                if not host.writable:
                    raise HttpError(403, f"write actions are off for {label}")
                return host
        raise HttpError(400, f"no host {label!r}")

    async def _call(self, action: str, service: str) -> dict[str, Any]:
        """One request on the read-write socket; the reply object."""
        assert self.control_socket is not None
        try:
            with trio.fail_after(ACTION_TIMEOUT):
                async with await trio.open_unix_socket(self.control_socket) as stream:
                    buf = bytearray()
                    lines = _lines(stream, buf)
                    hello = await lines.__anext__()
                    if hello.get("protocol") != PROTOCOL_VERSION or hello.get("read-only"):
                        raise HttpError(502, f"{self.control_socket} is not a read-write supervisor socket")
                    await stream.send_all(encode({"id": 1, "action": action, "service": service, "args": []}))
                    async for obj in lines:
                        if obj.get("id") == 1:
                            return obj
        except (OSError, StopAsyncIteration, trio.BrokenResourceError, ValueError) as exc:
            raise HttpError(502, f"the supervisor at {self.control_socket} did not answer: {exc}") from None
        except trio.TooSlowError:
            raise HttpError(502, f"{action} {service}: no reply within {ACTION_TIMEOUT:g} s") from None
        raise HttpError(502, f"the supervisor at {self.control_socket} closed the connection")


async def _lines(stream: trio.SocketStream, buf: bytearray):  # type: ignore[no-untyped-def]
    """JSON objects read from ``stream``, one per line.

    Raises:
        ValueError: a line is not a JSON object.
    """
    while True:
        obj = next_object(buf)
        if obj is not None:
            yield obj
            continue
        chunk = await stream.receive_some(65536)
        if not chunk:
            return
        buf += chunk


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()
