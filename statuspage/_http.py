"""A tiny HTTP/1.1 server on Trio: one request per connection, GET, POST and SSE.

Enough HTTP for one dashboard, and nothing more, so it is easy to audit:

* the request head is at most :data:`MAX_HEAD` bytes and must arrive within
  :data:`HEAD_TIMEOUT` seconds; a body (POST only) at most :data:`MAX_BODY`
  bytes, with ``Content-Length`` (no chunked uploads);
* every response carries ``Connection: close``; a server-sent event stream
  stays open until the client or the server ends it;
* at most :data:`MAX_CLIENTS` connections at once; the next ones are closed.

The routes are the application's (:mod:`statuspage._app`); this module only
parses and writes.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import trio

__all__ = ["Request", "Response", "HttpError", "serve", "read_request", "MAX_HEAD", "MAX_BODY"]

MAX_HEAD: Final = 16 * 1024
MAX_BODY: Final = 64 * 1024
HEAD_TIMEOUT: Final = 10.0
MAX_CLIENTS: Final = 128

_REASONS: Final = {
    200: "OK", 303: "See Other", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 411: "Length Required", 413: "Content Too Large",
    415: "Unsupported Media Type", 421: "Misdirected Request", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
}

#: Sent with every response: no framing, no sniffing, no referrer, only our own files.
SECURITY_HEADERS: Final = (
    ("Content-Security-Policy",
     "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
     "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    # "same-origin", not "no-referrer": with no-referrer a form POST carries "Origin: null".
    ("Referrer-Policy", "same-origin"),
    ("Cache-Control", "no-store"),
)


class HttpError(Exception):
    """A request the server answers with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True)
class Request:
    """One parsed request."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes = b""

    def header(self, name: str) -> str:
        return self.headers.get(name.lower(), "")

    def cookies(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for part in self.header("cookie").split(";"):
            name, sep, value = part.strip().partition("=")
            if sep and name:
                out[name] = value
        return out


@dataclass(slots=True)
class Response:
    """A complete response, or (``stream`` set) a server-sent event stream."""

    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)
    stream: Callable[[trio.SocketStream], Awaitable[None]] | None = None

    @classmethod
    def json(cls, obj: Any, status: int = 200) -> Response:
        return cls(status, json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode(),
                   "application/json; charset=utf-8")

    @classmethod
    def error(cls, status: int, message: str) -> Response:
        return cls.json({"error": message}, status)

    def head(self) -> bytes:
        lines = [f"HTTP/1.1 {self.status} {_REASONS.get(self.status, 'Unknown')}",
                 f"Content-Type: {self.content_type}", "Connection: close"]
        if self.stream is None:
            lines.append(f"Content-Length: {len(self.body)}")
        lines += [f"{k}: {v}" for k, v in (*SECURITY_HEADERS, *self.headers)]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _token_ok(text: str) -> bool:
    return bool(text) and all(33 <= ord(c) < 127 for c in text)


def parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    """Method, path, query and headers (lower-case names) of a request head.

    Raises:
        HttpError: 400 for anything malformed (bad request line, a header
            without a colon, a repeated Host or Content-Length, a target that
            is not an absolute path).
    """
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes everything
        raise HttpError(400, "undecodable request head") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] not in ("HTTP/1.1", "HTTP/1.0") or not _token_ok(parts[0]):
        raise HttpError(400, "bad request line")
    method, target = parts[0], parts[1]
    if not target.startswith("/") or not _token_ok(target):
        raise HttpError(400, "bad request target")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not _token_ok(name) or any(c in value for c in "\r\n\0"):
            raise HttpError(400, "bad header line")
        key = name.lower()
        if key in headers and key in ("host", "content-length"):
            raise HttpError(400, f"repeated {name} header")
        headers[key] = value.strip()
    split = urlsplit(target)
    try:
        path = unquote(split.path, errors="strict") if "%" in split.path else split.path
    except UnicodeDecodeError:
        raise HttpError(400, "bad percent-encoding in the request target") from None
    return method, path, split.query, headers


async def read_request(stream: trio.SocketStream) -> Request:
    """Read one request (head within :data:`HEAD_TIMEOUT`, body bounded).

    Raises:
        HttpError: malformed (400), too large (413, 431), too slow (408).
    """
    buf = bytearray()
    with trio.move_on_after(HEAD_TIMEOUT) as scope:
        while b"\r\n\r\n" not in buf:
            if len(buf) > MAX_HEAD:
                raise HttpError(431, "request head too large")
            chunk = await stream.receive_some(4096)
            if not chunk:
                raise HttpError(400, "connection closed mid-request")
            buf += chunk
        end = buf.index(b"\r\n\r\n")
        if end > MAX_HEAD:
            raise HttpError(431, "request head too large")
        method, path, query, headers = parse_head(bytes(buf[:end]))
        body = bytes(buf[end + 4 :])
        if method == "POST":
            if "transfer-encoding" in headers:
                raise HttpError(411, "chunked bodies are not accepted; send Content-Length")
            length_text = headers.get("content-length", "")
            if not length_text.isdigit():
                raise HttpError(411, "Content-Length needed")
            length = int(length_text)
            if length > MAX_BODY:
                raise HttpError(413, "request body too large")
            while len(body) < length:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    raise HttpError(400, "connection closed mid-body")
                body += chunk
            body = body[:length]
        else:
            body = b""
    if scope.cancelled_caught:
        raise HttpError(408, "request too slow")
    return Request(method, path, query, headers, body)


Handler = Callable[[Request], Awaitable[Response]]


async def _one(stream: trio.SocketStream, handler: Handler) -> None:
    async with stream:
        try:
            request = await read_request(stream)
            response = await handler(request)
        except HttpError as exc:
            response = Response.error(exc.status, exc.message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        except Exception as exc:  # a bug must not take the page down
            print(f"statuspage: internal error: {exc!r}", file=sys.stderr, flush=True)
            response = Response.error(500, "internal error")
        try:
            await stream.send_all(response.head() + response.body)
            if response.stream is not None:
                await response.stream(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


async def serve(listeners: list[trio.SocketListener], handler: Handler) -> None:
    """Serve ``handler`` on ``listeners`` until cancelled."""
    limit = trio.CapacityLimiter(MAX_CLIENTS)

    async def guarded(stream: trio.SocketStream) -> None:
        try:
            limit.acquire_nowait()
        except trio.WouldBlock:
            await stream.aclose()
            return
        try:
            await _one(stream, handler)
        finally:
            limit.release()

    await trio.serve_listeners(guarded, listeners)
