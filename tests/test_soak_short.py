"""A short soak: `contrib/bench/soak` for about half a minute of chaos, twice.

The soak starts its own daemon (random SIGKILLs, start/stop/restart storms from
many clients, misbehaving clients, non-reading followers, NaN and 5000-digit
ids, and as root: a loopback port squatter, symlink swaps of a log file and a
notify flood from user nobody), then checks its invariants (state matches the
processes, no zombie or duplicate, fds and RSS back within 10 % of the
baseline, the decoy behind the symlinks untouched, no lost log line, clean
SIGTERM, nothing left) and prints `soak: PASS …` or `soak: FAIL …`.

The first run has no re-execs (one probe `reexec root` at the start when it is
supported) but SIGKILLs the supervisor every few seconds, in settled moments,
and starts a new one on the same state directory and sockets (issue 14):
around each crash, every service keeps its state and PID and no log line is
lost or doubled beyond what a SIGKILL may cut in flight (each such gap is
named); clients' errors while no supervisor runs are counted, not failed.
The second run re-executes the daemon every few seconds, without crashes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parent.parent / "contrib" / "bench" / "soak.py"


def run_soak(*args: str) -> subprocess.CompletedProcess[str]:
    cp = subprocess.run([sys.executable, str(SOAK), "--minutes", "0.4", "--seed", "4242", *args],
                        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    print(cp.stderr[-6000:])
    print(cp.stdout)
    return cp


def verdict(cp: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in cp.stdout.splitlines() if line.startswith("soak: ")]
    assert lines, f"no verdict line; stdout {cp.stdout[-2000:]!r}"
    line = lines[-1]
    if line.startswith("soak: PASS"):
        # The hostile actors did run, and the resources before and after are reported.
        assert re.search(r"[1-9]\d* bad ids", line), line
        assert re.search(r"fds \d+->\d+ \([-+]\d+%\), rss [\d.]+->[\d.]+ MiB", line), line
        if os.geteuid() == 0:
            for actor in ("port squatters", "symlink swaps", "notify floods"):
                assert re.search(rf"[1-9]\d* {actor}", line), line
    return line


@pytest.mark.slow
def test_soak_with_supervisor_sigkills_passes() -> None:
    # Half the SIGKILLs land amid the storms (a spawn not yet recorded, a
    # stop half done), half in settled moments (strict: same PIDs, no line lost).
    cp = run_soak("--no-reexec", "--crash-every", "8", "--crash-amid", "0.5")
    line = verdict(cp)
    assert line.startswith("soak: PASS"), line
    assert re.search(r"; [1-9]\d* supervisor crashes", line), line
    assert cp.returncode == 0


@pytest.mark.slow
def test_soak_with_reexecs_passes() -> None:
    cp = run_soak("--reexec-every", "6", "--crash-every", "0")
    line = verdict(cp)
    assert line.startswith("soak: PASS"), line
    assert cp.returncode == 0
