"""Issue 3 acceptance: service logs.

Every line of a service's stdout/stderr lands in ``LOG_DIR/NAME.log`` as
``ISO-TIMESTAMP STREAM TEXT``; the file rotates by size (``log-max-size``,
``log-max-backups``) without losing a line; odd output (non-UTF-8, a 1 MiB
line) does not hurt the daemon; ``herd log -n/-f`` and ``herd status NAME``
show the recent lines; an unwritable log does not stop the service.

Services print a final ``DONE`` line and then sleep, so a test knows when the
output is complete by polling for it (with a deadline), never by sleeping.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

from helpers import (
    Deadline,
    Supervisor,
    base_env,
    find_pids,
    pid_alive,
    py_service,
    wait_until,
)

# --------------------------------------------------------------------------
# Helpers of this file

#: argv: MARKER COUNT.  Prints "line 000000" … COUNT lines in big writes, then DONE.
NUMBERED = r'''
import sys, time
out = sys.stdout.buffer
n = int(sys.argv[2])
for start in range(0, n, 1000):
    out.write("".join("line %06d\n" % i for i in range(start, min(n, start + 1000))).encode())
out.write(b"DONE\n")
out.flush()
time.sleep(1e6)
'''

#: argv: MARKER FLAG COUNT.  Once FLAG exists prints "line 1" … "line COUNT", then DONE.
PRINT_ON_FLAG = r'''
import os, sys, time
while not os.path.exists(sys.argv[2]):
    time.sleep(0.01)
for i in range(1, int(sys.argv[3]) + 1):
    print("line %d" % i)
print("DONE", flush=True)
time.sleep(1e6)
'''

#: argv: MARKER FIFO.  Echoes each line written to FIFO as "got LINE".
ECHO_FIFO = r'''
import os, sys
fd = os.open(sys.argv[2], os.O_RDWR)   # also a writer: never sees EOF
buf = b""
while True:
    buf += os.read(fd, 4096)
    while b"\n" in buf:
        line, buf = buf.split(b"\n", 1)
        print("got " + line.decode(), flush=True)
'''

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}[+-]\d\d:\d\d$")


def wait_done(sup: Supervisor, name: str, path: Path | None = None, timeout: float = 30.0) -> None:
    """Wait until the (newest) log file of ``name`` holds the DONE line."""
    sup.wait_log(name, lambda t: t == "DONE", timeout=timeout, path=path)


def log_files(sup: Supervisor, name: str) -> list[Path]:
    """NAME.log.K … NAME.log.1, NAME.log: oldest first."""
    base = sup.log_file(name)
    backups = []
    for p in base.parent.iterdir():
        m = re.fullmatch(re.escape(base.name) + r"\.(\d+)", p.name)
        if m:
            backups.append((int(m.group(1)), p))
    backups.sort(reverse=True)
    return [p for _, p in backups] + ([base] if base.exists() else [])


def backup_suffixes(sup: Supervisor, name: str) -> list[int]:
    base = sup.log_file(name)
    return sorted(int(p.name.rsplit(".", 1)[1]) for p in log_files(sup, name) if p != base)


def stdout_texts(sup: Supervisor, name: str) -> list[str]:
    out = []
    for path in log_files(sup, name):
        out.extend(text for _, stream, text in sup.log_lines(name, path) if stream == "stdout")
    return out


def raw_log(sup: Supervisor, name: str, n: int) -> list[dict[str, object]]:
    rep = sup.request({"action": "log", "service": name, "args": [n]}, ro=True)
    assert rep["ok"] is True, rep
    return rep["result"]["lines"]


# --------------------------------------------------------------------------
# Format


def test_lines_are_timestamped_with_their_stream(sup: Supervisor) -> None:
    code = (
        "import sys, time\n"
        "print('to stdout', flush=True)\n"
        "print('to stderr', file=sys.stderr, flush=True)\n"
        "print('DONE', flush=True)\n"
        "time.sleep(1e6)\n"
    )
    t0 = time.time()
    sup.start({"services": {"fmt": py_service(code, sup.marker("fmt"))}})
    wait_done(sup, "fmt", timeout=10)
    raw = sup.log_file("fmt").read_text()
    entries = sup.log_lines("fmt")
    assert len(raw.splitlines()) == len(entries)
    for stamp, stream, text in entries:
        assert TIMESTAMP.match(stamp), f"not an ISO timestamp with microseconds and offset: {stamp!r}"
        when = datetime.fromisoformat(stamp).timestamp()
        assert t0 - 5 <= when <= time.time() + 5, stamp
        assert stream in ("stdout", "stderr", "supervisor"), (stream, text)
    assert ("stdout", "to stdout") in [(s, t) for _, s, t in entries], entries
    assert ("stderr", "to stderr") in [(s, t) for _, s, t in entries], entries
    assert any(s == "supervisor" and "fmt" in t for _, s, t in entries), \
        "no supervisor line about the service (its start) in its log"
    stamps = [datetime.fromisoformat(stamp) for stamp, _, _ in entries]
    assert stamps == sorted(stamps), "log lines are not in time order"


# --------------------------------------------------------------------------
# Rotation


def test_rotation_loses_no_line(sup: Supervisor) -> None:
    count = 200_000
    sup.start({"services": {
        "chatty": py_service(NUMBERED, sup.marker("chatty"), str(count),
                             **{"log-max-size": 65536, "log-max-backups": 1000}),
    }})
    wait_done(sup, "chatty", timeout=45)

    suffixes = backup_suffixes(sup, "chatty")
    assert suffixes, "the log never rotated"
    assert suffixes == list(range(1, len(suffixes) + 1)), f"gaps in the backups: {suffixes}"
    for path in log_files(sup, "chatty"):
        assert path.stat().st_size <= 65536, f"{path.name} is {path.stat().st_size} bytes > log-max-size"

    texts = stdout_texts(sup, "chatty")
    assert texts[-1] == "DONE", texts[-3:]
    numbers = texts[:-1]
    expected = [f"line {i:06d}" for i in range(count)]
    if numbers != expected:
        seen = set(numbers)
        missing = [e for e in expected if e not in seen]
        dups = len(numbers) - len(seen)
        first_bad = next(i for i, (a, b) in enumerate(zip(numbers + [None] * count, expected)) if a != b)
        raise AssertionError(
            f"{len(numbers)} lines across {len(suffixes) + 1} files; {len(missing)} missing "
            f"(first: {missing[:3]}), {dups} duplicated, first difference at index {first_bad}")
    # The daemon and the service are fine afterwards.
    st = sup.status("chatty")
    assert st["state"] == "running" and pid_alive(st["pid"]), st


def test_rotation_keeps_at_most_max_backups(sup: Supervisor) -> None:
    sup.start({"services": {
        "small": py_service(NUMBERED, sup.marker("small"), "400",
                            **{"log-max-size": 2000, "log-max-backups": 2}),
    }})
    wait_done(sup, "small", timeout=10)
    assert backup_suffixes(sup, "small") == [1, 2], [p.name for p in log_files(sup, "small")]
    texts = stdout_texts(sup, "small")
    assert texts[-1] == "DONE"
    kept = texts[:-1]
    # What is kept is the newest lines, contiguous, in order; the oldest are dropped.
    assert kept, texts
    first = int(kept[0].split()[1])
    assert first > 0, "nothing was dropped although 400 lines do not fit in 3 × 2000 bytes"
    assert kept == [f"line {i:06d}" for i in range(first, 400)], kept
    for path in log_files(sup, "small"):
        assert path.stat().st_size <= 2000, path


# --------------------------------------------------------------------------
# Odd output

#: Non-UTF-8 bytes; a line of 16 × 64 KiB + 100 bytes; a line of 66000
#: bytes written in two parts, the second (with the newline) only once the
#: supervisor has read the first; then ordinary lines.
ODD_OUTPUT = r'''
import fcntl, struct, sys, termios, time
out = sys.stdout.buffer
def drained():
    return struct.unpack("i", fcntl.ioctl(1, termios.FIONREAD, b"\0\0\0\0"))[0] == 0
out.write(b"bad \xff\xfe bytes\n")
out.flush()
out.write(b"A" * (16 * 65536 + 100))
out.flush()
out.write(b"\n")
out.write(b"B" * 65000)
out.flush()
while not drained():
    time.sleep(0.01)
out.write(b"B" * 1000 + b"\n")
out.write(b"after\nDONE\n")
out.flush()
time.sleep(1e6)
'''


def test_non_utf8_and_huge_lines_do_not_hurt(sup: Supervisor) -> None:
    sup.start({"services": {"odd": py_service(ODD_OUTPUT, sup.marker("odd"))}})
    wait_done(sup, "odd", timeout=20)
    assert sup.proc is not None and sup.proc.poll() is None, "the daemon died"
    texts = stdout_texts(sup, "odd")
    assert texts[0] == "bad \ufffd\ufffd bytes", texts[0][:80]
    assert texts[-2:] == ["after", "DONE"]
    # No byte of the long lines is lost.
    middle = "".join(texts[1:-2])
    assert middle == "A" * (16 * 65536 + 100) + "B" * 66000, f"{len(middle)} bytes of long lines logged"

    # The daemon still answers, and herd shows these lines without trouble.
    st = sup.status("odd")
    assert st["state"] == "running", st
    assert [e["line"] for e in raw_log(sup, "odd", 2)] == ["after", "DONE"]
    cp = sup.herd("log", "odd", "-n", "2", check=True)
    assert "Traceback" not in cp.stderr
    assert cp.stdout.rstrip("\n").endswith("odd stdout: DONE")
    cp = sup.herd("status", "odd", check=True)  # 10 recent lines: 640 KiB of "A" and "B"
    assert "odd" in cp.stdout and "Traceback" not in cp.stderr


def test_long_lines_are_split_in_chunks_of_64k(sup: Supervisor) -> None:
    sup.start({"services": {"odd": py_service(ODD_OUTPUT, sup.marker("odd"))}})
    wait_done(sup, "odd", timeout=20)
    chunks = stdout_texts(sup, "odd")[1:-2]
    lengths = [(c[:1], len(c)) for c in chunks]
    assert lengths == [("A", 65536)] * 16 + [("A", 100), ("B", 65536), ("B", 464)], \
        f"long lines must be split in chunks of 65536 bytes: {lengths}"
    for path in log_files(sup, "odd"):
        for line in path.read_bytes().split(b"\n"):
            assert len(line) <= 65536 + 100, f"a log line of {len(line)} bytes in {path.name}"


def test_herd_log_of_more_than_a_mebibyte_of_lines(sup: Supervisor) -> None:
    """`herd log -n 30` (all services) after a 1 MiB line: the reply (about
    1.1 MB) is bigger than the daemon's per-client output queue, yet the
    client reads it.  (One service keeps at most 1 MiB of recent text, all
    services together 8 MiB: see test_hostile_files.py.)"""
    sup.start({"services": {"odd": py_service(ODD_OUTPUT, sup.marker("odd"))}})
    wait_done(sup, "odd", timeout=20)
    rep = sup.request({"action": "log", "args": [30]}, ro=True)
    assert rep["ok"] is True, rep
    texts = [entry["line"] for entry in rep["result"]["lines"]]
    assert "bad \ufffd\ufffd bytes" in texts
    assert texts[-2:] == ["after", "DONE"]
    assert sum(len(t) for t in texts) > 1024 * 1024
    cp = sup.herd("log", "-n", "30", check=True)
    assert "odd stdout: bad \ufffd\ufffd bytes" in cp.stdout
    assert cp.stdout.rstrip("\n").endswith("odd stdout: DONE")


# --------------------------------------------------------------------------
# herd log -n, herd status NAME


def test_herd_log_n_and_status_show_the_last_lines(sup: Supervisor, tmp_path: Path) -> None:
    flag = tmp_path / "go"
    sup.start({"services": {
        "talk": py_service(PRINT_ON_FLAG, sup.marker("talk"), str(flag), "50", **{"auto-start": False}),
    }})
    sup.herd("start", "talk", check=True)
    flag.touch()
    wait_done(sup, "talk", timeout=10)
    tail = [f"line {i}" for i in range(1, 51)] + ["DONE"]

    # herd log -n 5: the last 5 lines, oldest first.
    cp = sup.herd("log", "talk", "-n", "5", check=True)
    out = cp.stdout.splitlines()
    assert len(out) == 5, out
    for got, want in zip(out, tail[-5:]):
        assert got.endswith(f" talk stdout: {want}"), (got, want)
    cp = sup.herd("log", "talk", "-n", "5", json=True, check=True)
    assert [e["line"] for e in cp.data["lines"]] == tail[-5:], cp.data
    assert all(e["service"] == "talk" and e["stream"] == "stdout" for e in cp.data["lines"])
    cp = sup.herd("log", "talk", "-n", "30", json=True, check=True)
    assert [e["line"] for e in cp.data["lines"]] == tail[-30:]

    # herd status NAME: the last 10 lines.
    human = sup.herd("status", "talk", check=True).stdout
    assert "Recent messages" in human, human
    shown = human.split("Recent messages", 1)[1].splitlines()[1:]
    shown = [s for s in shown if s.strip()]
    assert len(shown) == 10, shown
    for got, want in zip(shown, tail[-10:]):
        assert got.rstrip().endswith(f"stdout: {want}"), (got, want)
    st = sup.status("talk")
    assert [e["line"] for e in st["recent-log"]] == tail[-10:], st["recent-log"]
    # -n widens it.
    cp = sup.herd("status", "talk", "-n", "20", json=True, check=True)
    assert [e["line"] for e in cp.data["services"][0]["recent-log"]] == tail[-20:]


# --------------------------------------------------------------------------
# herd log -f


class LineReader:
    """Reads a pipe's lines in a thread; ``next(timeout)`` with a deadline."""

    def __init__(self, stream) -> None:  # type: ignore[no-untyped-def]
        self.q: queue.Queue[str | None] = queue.Queue()
        self.t = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self.t.start()

    def _run(self, stream) -> None:  # type: ignore[no-untyped-def]
        for line in stream:
            self.q.put(line.rstrip("\n"))
        self.q.put(None)

    def until(self, predicate, timeout: float, what: str) -> list[str]:  # type: ignore[no-untyped-def]
        """Lines read until one satisfies ``predicate`` (that one included)."""
        deadline = Deadline(timeout)
        got: list[str] = []
        while True:
            try:
                line = self.q.get(timeout=max(0.01, deadline.remaining()))
            except queue.Empty:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}; got {got!r}") from None
            if line is None:
                raise AssertionError(f"the stream ended while waiting for {what}; got {got!r}")
            got.append(line)
            if predicate(line):
                return got


def test_herd_log_follow(sup: Supervisor, tmp_path: Path) -> None:
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    sup.start({"services": {
        "echo": py_service(ECHO_FIFO, sup.marker("echo"), str(fifo), **{"auto-start": False}),
    }})
    sup.herd("start", "echo", check=True)
    follow = subprocess.Popen(
        [sys.executable, "-m", "herd", "-s", str(sup.socket), "log", "echo", "-f"],
        env=base_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, bufsize=1,
    )
    writer = -1
    try:
        reader = LineReader(follow.stdout)
        # The history comes first (at least the "started" line): then it follows.
        reader.until(lambda l: "echo supervisor:" in l, 10, "the history from herd log -f")
        writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        for word in ("hello-1", "hello-2", "hello-3"):
            os.write(writer, f"{word}\n".encode())
            reader.until(lambda l, w=word: l.endswith(f"echo stdout: got {w}"), 10, f"'got {word}' followed")
        # Supervisor lines are followed too.
        sup.herd("restart", "echo", check=True)
        reader.until(lambda l: "echo supervisor:" in l and "started" in l, 10, "the restart followed")
        assert follow.poll() is None, "herd log -f ended on its own"
        follow.send_signal(signal.SIGINT)
        try:
            rc = follow.wait(10)
        except subprocess.TimeoutExpired:
            raise AssertionError("herd log -f did not end on SIGINT") from None
        assert rc == 0, follow.stderr.read() if follow.stderr else rc
    finally:
        if writer >= 0:
            os.close(writer)
        if follow.poll() is None:
            follow.kill()
        follow.wait(10)
        for f in (follow.stdout, follow.stderr):
            if f:
                f.close()


# --------------------------------------------------------------------------
# An unwritable log


def test_unwritable_log_does_not_stop_the_service(sup: Supervisor, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    log_path = blocker / "w.log"
    marker = sup.marker("w")
    # 5000 lines (> a pipe's 64 KiB): it only gets to DONE if its output is drained.
    sup.start({"services": {
        "w": py_service(NUMBERED, marker, "5000", **{"log-file": str(log_path), "auto-start": False}),
    }})
    cp = sup.herd("start", "w", json=True, check=True)
    pid = cp.data["pid"]
    wait_until(lambda: (lines := raw_log(sup, "w", 1)) and lines[-1]["line"] == "DONE", 20,
               "the service to get through its output")
    wait_until(lambda: "log file not writable" in sup.stderr_path.read_text(errors="replace"), 10,
               "the supervisor to report the unwritable log")
    report = [l for l in sup.stderr_path.read_text(errors="replace").splitlines()
              if "log file not writable" in l]
    assert any("w.log" in l for l in report), report
    st = sup.status("w")
    assert st["state"] == "running" and st["pid"] == pid, st
    assert find_pids(marker) == {pid}
    assert st["log-file"] == str(log_path), st
    assert [e["line"] for e in raw_log(sup, "w", 2)] == ["line 004999", "DONE"]
    assert not log_path.exists()
    # The daemon itself is fine.
    assert sup.proc is not None and sup.proc.poll() is None
    json.dumps(sup.status())  # status of everything still answers
