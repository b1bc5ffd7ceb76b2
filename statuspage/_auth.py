"""Write actions: the operator's token, browser sessions and CSRF tokens.

Writes are off unless the operator starts the page with ``--allow-writes``
and a token file.  The token file must be a regular file owned by the user
the page runs as, readable by nobody else (no group or other bits), holding
one token of at least :data:`MIN_TOKEN` characters.  A browser logs in by
posting the token (``POST /login``); it gets a session cookie (``HttpOnly``,
``SameSite=Strict``) and, through ``/api/state``, a CSRF token that each
write (``POST /api/action``) must send back in the ``X-CSRF-Token`` header.
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
import time
from typing import Final

__all__ = ["TokenError", "load_token", "Sessions", "MIN_TOKEN", "COOKIE"]

MIN_TOKEN: Final = 16
COOKIE: Final = "statuspage-session"
#: A session lasts this long after login (seconds).
SESSION_LIFETIME: Final = 12 * 3600
MAX_SESSIONS: Final = 64


class TokenError(Exception):
    """The token file is unusable; the message names it and says why."""


def load_token(path: str) -> str:
    """The token in ``path``.

    Raises:
        TokenError: the file is missing, not a regular file, not owned by this
            user, readable or writable by group or others, or holds no token
            of at least :data:`MIN_TOKEN` printable characters.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise TokenError(f"token file {path}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TokenError(f"token file {path}: not a regular file")
        if st.st_uid != os.geteuid():
            raise TokenError(f"token file {path}: owned by uid {st.st_uid}, not by this user ({os.geteuid()})")
        if st.st_mode & 0o077:
            raise TokenError(f"token file {path}: mode {stat.S_IMODE(st.st_mode):04o} lets others read or "
                             "write it; chmod 600 it")
        data = os.read(fd, 4097)
    finally:
        os.close(fd)
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise TokenError(f"token file {path}: the token must be printable ASCII") from None
    if len(data) > 4096 or len(token) < MIN_TOKEN or not token.isprintable() or " " in token:
        raise TokenError(f"token file {path}: expected one token of {MIN_TOKEN} to 4096 printable "
                         "characters without spaces (e.g. from 'openssl rand -hex 32')")
    return token


class Sessions:
    """Logged-in browsers: session id -> (CSRF token, expiry)."""

    def __init__(self, token: str) -> None:
        self._token = token
        self._sessions: dict[str, tuple[str, float]] = {}

    def login(self, offered: str) -> str | None:
        """A new session id when ``offered`` is the token, else None."""
        if not hmac.compare_digest(offered.encode(), self._token.encode()):
            return None
        now = time.monotonic()
        self._sessions = {k: v for k, v in self._sessions.items() if v[1] > now}
        while len(self._sessions) >= MAX_SESSIONS:
            self._sessions.pop(next(iter(self._sessions)))
        sid = secrets.token_urlsafe(32)
        self._sessions[sid] = (secrets.token_urlsafe(32), now + SESSION_LIFETIME)
        return sid

    def csrf(self, sid: str | None) -> str | None:
        """The CSRF token of a live session, else None."""
        entry = self._sessions.get(sid or "")
        if entry is None or entry[1] <= time.monotonic():
            return None
        return entry[0]

    def check(self, sid: str | None, csrf: str) -> bool:
        """Whether ``sid`` is a live session and ``csrf`` its token."""
        want = self.csrf(sid)
        return want is not None and hmac.compare_digest(want.encode(), csrf.encode())

    def logout(self, sid: str | None) -> None:
        self._sessions.pop(sid or "", None)
