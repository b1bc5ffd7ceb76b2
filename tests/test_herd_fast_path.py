"""`herd`'s fast path: what a status or a start imports (issue 19).

A client that sends one JSON line should start about as fast as the
interpreter.  These tests run `herd` against a real daemon and list every
module it imported beyond the interpreter's own start-up, so that a heavy
import (``typing``, ``dataclasses``, ``re``, ``socket``, ``json``...) on the
fast path is caught by name.  Nothing here measures time.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import Supervisor, base_env, sleeper, wait_until

#: Modules `herd status` / `herd start X` may import.  ``_socket`` and
#: ``_json`` are the C halves of ``socket`` and ``json``; the Python halves
#: import ``re``, ``enum``, ``selectors`` and ``collections``.
ALLOWED = frozenset(
    {
        "__future__",
        "_json",
        "_socket",
        "math",
        "herd",
        "herd.cli",
        "herd._args",
        "herd._client",
        "herd._json",
        "herd.protocol",
        "herd.render",
    }
)

# Runs herd's main in a fresh interpreter and prints, on its last stderr
# line, the modules loaded since the interpreter started.
PROBE = """
import sys
before = set(sys.modules)
from herd.cli import main
status = main(sys.argv[1:])
sys.stdout.flush()
print("MODULES " + " ".join(sorted(set(sys.modules) - before)), file=sys.stderr)
raise SystemExit(status)
"""


def _herd_imports(sup: Supervisor, *args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run ``herd -s SOCKET ARGS`` through the probe: (the run, the modules it added)."""
    cp = subprocess.run(
        [sys.executable, "-c", PROBE, "-s", str(sup.socket), *args],
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    lines = [line for line in cp.stderr.splitlines() if line.startswith("MODULES ")]
    assert lines, f"the probe printed no module list: {cp.stderr!r}"
    return cp, set(lines[-1].split()[1:])


@pytest.mark.parametrize(
    "args",
    [("status",), ("status", "a"), ("start", "b"), ("stop", "a"), ("status", "--json")],
    ids=["status", "status-one", "start", "stop", "status-json"],
)
def test_fast_path_imports_only_the_wire(sup: Supervisor, args: tuple[str, ...]) -> None:
    sup.start(
        {
            "services": {
                "a": sleeper(sup.marker("a")),
                "b": sleeper(sup.marker("b"), **{"auto-start": False}),
            }
        }
    )
    wait_until(lambda: sup.status("a")["state"] == "running", 10, "a running")
    cp, added = _herd_imports(sup, *args)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.strip(), "herd printed nothing"
    extra = sorted(added - ALLOWED)
    assert not extra, f"`herd {' '.join(args)}` imported {extra}: keep them off the fast path (lazy imports)"


def test_help_still_works_off_the_fast_path() -> None:
    """Loading lazily must not lose what the slow paths need."""
    cp = subprocess.run(
        [sys.executable, "-m", "herd", "--help"], env=base_env(), capture_output=True, text=True, timeout=60
    )
    assert cp.returncode == 0 and "usage: herd" in cp.stdout


SAMPLES = [
    {"id": 1, "action": "start", "service": "a", "args": []},
    {"id": "x", "action": "status", "service": None, "args": [5, "follow", True, False, 1.5, -0.0]},
    {"unicode": "é \u2028 \ud83d\ude00", "quote": "a\"b\\c\n\t\x00", "nested": [{"k": [None, {}]}]},
    "a lone \ud800 surrogate",
    [],
    12345678901234567890,
]


@pytest.mark.parametrize("obj", SAMPLES)
def test_herd_json_is_the_json_module(obj: object) -> None:
    """herd's JSON without the `json` module writes and reads what `json` does."""
    import json

    from herd import _json

    assert _json.dumps(obj) == json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    text = json.dumps(obj)
    assert _json.loads(text) == json.loads(text)
    assert _json.loads((" \n" + text + " \r\n").encode()) == json.loads(text)


@pytest.mark.parametrize("bad", [b"", b"{", b'{"a": 1} x', b"\xff", b"nul", b'{"a":}'])
def test_herd_json_refuses_what_json_refuses(bad: bytes) -> None:
    from herd import _json

    with pytest.raises(ValueError):
        _json.loads(bad)


def test_herd_json_refuses_nan() -> None:
    from herd import _json

    with pytest.raises(ValueError):
        _json.dumps({"x": float("nan")})
