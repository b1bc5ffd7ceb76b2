"""Run the status page (``python -m statuspage``) as the tests' separate process."""

from __future__ import annotations

import http.client
import json
import select
import subprocess
import sys
import time
from typing import Any

from helpers import base_env, terminate


class StatusPage:
    """One ``python -m statuspage --listen 127.0.0.1:0 ARGS`` process; ``url`` once it serves."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, timeout: float = 20.0) -> None:
        full_env = base_env()
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "statuspage", "--listen", "127.0.0.1:0", *args],
            env=full_env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, left))
            if not ready:
                self.close()
                raise AssertionError(f"the status page did not say where it listens within {timeout} s")
            chunk = self.proc.stdout.read1(4096)  # type: ignore[attr-defined]
            if not chunk:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise AssertionError(f"the status page exited {self.proc.wait()}: {err}")
            line += chunk
        text = line.decode().strip()
        assert text.startswith("listening on http://127.0.0.1:"), text
        self.url = text.split(" ", 2)[2]
        self.port = int(self.url.rstrip("/").rsplit(":", 1)[1])

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
        """One HTTP request; ``(status, headers with lower-case names, body)``."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def state(self) -> dict[str, Any]:
        status, _, body = self.request("GET", "/api/state")
        assert status == 200, body
        return json.loads(body)

    def close(self) -> None:
        terminate(self.proc)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()
