"""Issue 8 acceptance: re-executing the supervisor in place.

SIGUSR1 and ``herd reexec root`` make the daemon check the new image in a
child (``--check``: the code imports, the configuration parses), then hand
its sockets, pidfds, log pipes and unfinished log lines over to the same
command line, executed again in the same process.  Every service keeps its
PID and stays supervised, no output line is lost or doubled, and a broken
new image is refused while the old supervisor goes on serving.

What the tests look at from outside: the daemon's own log (JSON lines on its
stderr: ``re-executing``, ``resumed after re-exec``, ``…merged…``,
``re-exec refused…``), ``/proc/PID`` (its fd count; ``SigBlk``: SIGUSR1,
SIGHUP, SIGTERM and SIGINT are held blocked only while the image is being
replaced), the services' log files, psutil and the control socket.

Nothing here sleeps for a fixed time except to pace the signals it sends
(200 ms between two SIGUSR1 in the 50-re-exec test, as the issue asks): a
re-exec is over once every SIGUSR1 sent has left
its trace in the daemon's log and the last re-exec event is a resumption
(`reexec_settled`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

import helpers
from helpers import (
    REPO,
    Client,
    ConnectionClosed,
    Supervisor,
    assert_one_process_each,
    daemon_events,
    find_pids,
    pids_of,
    py_service,
    sleeper,
    wait_respawned,
    wait_running,
    wait_until,
)

# --------------------------------------------------------------------------
# Helpers of this file

#: argv: MARKER MODE.  Prints "seq 0", "seq 1", … one line about every
#: millisecond, forever.  With MODE "split" each line goes out in two writes
#: (text, then newline), so unfinished lines are often in flight at a re-exec.
SEQ_PRINTER = r"""
import os, sys, time
split = sys.argv[2] == "split"
i = 0
while True:
    if split:
        os.write(1, b"seq %d" % i)
        os.write(1, b"\n")
    else:
        os.write(1, b"seq %d\n" % i)
    i += 1
    time.sleep(0.001)
"""


def event_time(ev: dict[str, Any]) -> float:
    """An event's timestamp (ISO 8601 UTC with its zone, as the daemon writes it) as epoch seconds."""
    return datetime.fromisoformat(ev["timestamp"]).timestamp()


def _kind(ev: dict[str, Any]) -> str | None:
    name = ev["event"]
    if name == "re-executing":
        return "exec"
    if name == "resumed after re-exec":
        return "resumed"
    if "merged" in name:
        return "merged"
    if name.startswith("re-exec refused"):
        return "refused"
    return None


def reexec_kinds(sup: Supervisor) -> list[tuple[str, float]]:
    """(kind, time) of every re-exec event: exec, resumed, merged, refused."""
    return [(k, event_time(ev)) for ev in daemon_events(sup) if (k := _kind(ev)) is not None]


def count_kind(sup: Supervisor, kind: str) -> int:
    return sum(1 for k, _ in reexec_kinds(sup) if k == kind)


def reexec_settled(sup: Supervisor, since: float) -> bool:
    """True once a SIGUSR1 sent at `since` has been fully dealt with.

    Every SIGUSR1 the daemon takes in leaves a line after it was sent: it
    starts a re-exec ("re-executing"), is merged into one under way
    ("merged"), or is refused.  One that comes while the image is being
    replaced stays blocked and is taken in by the new image, so it too leaves
    its line after `since`.  Settled: such a line exists, and the last re-exec
    event is a "resumed" (or a refusal), i.e. nothing is under way.
    """
    kinds = reexec_kinds(sup)
    answered = any(k in ("exec", "merged", "refused") and t > since for k, t in kinds)
    return answered and kinds[-1][0] in ("resumed", "refused")


def wait_reexec_settled(sup: Supervisor, since: float, timeout: float = 30.0) -> None:
    wait_until(lambda: reexec_settled(sup, since), timeout,
               f"the re-exec asked for at {since:.3f} to complete\ndaemon log:\n{sup.stderr_tail(20)}")


#: The signals the daemon holds blocked across its exec.
HELD = (signal.SIGUSR1, signal.SIGHUP, signal.SIGTERM, signal.SIGINT)


def blocked_signals(pid: int) -> int:
    """The SigBlk mask of a process (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigBlk:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def proc_signal_state(pid: int) -> dict[str, Any]:
    """One snapshot of /proc/PID/status: threads, the main thread's blocked
    signals, the process's pending signals (names)."""
    fields: dict[str, str] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
    except OSError:
        return {"gone": True}

    def names(mask: str) -> list[str]:
        bits = int(mask or "0", 16)
        return [signal.Signals(n).name for n in range(1, 32) if bits & (1 << (n - 1))]

    return {"threads": int(fields.get("Threads", "0")), "blocked": names(fields.get("SigBlk", "")),
            "pending": names(fields.get("ShdPnd", ""))}


def in_exec_window(pid: int) -> bool:
    """The daemon holds SIGUSR1, SIGHUP, SIGTERM and SIGINT blocked only from
    just before its exec until the new image listens for signals again.  (A
    signal handler blocks only its own signal while it runs: SIGUSR1 alone
    blocked is not the window; and vfork() or creating a thread blocks *every*
    signal for a moment, which under load can last milliseconds: the window
    is exactly these four.)"""
    return blocked_signals(pid) == sum(1 << (sig - 1) for sig in HELD)


def catch_exec_window(sup: Supervisor, sent: float, stable: float = 0.002, timeout: float = 15.0) -> bool:
    """After a SIGUSR1 sent at `sent`: spin until the daemon is in its exec
    window (True), or until that re-exec is over without it being seen (False).

    With `stable`, the held signals must stay blocked that long: creating a
    thread or vfork()ing blocks every signal for some microseconds too.
    """
    assert sup.proc is not None
    pid = sup.proc.pid
    deadline = time.monotonic() + timeout
    checked = time.monotonic()
    since: float | None = None
    while True:
        now = time.monotonic()
        if in_exec_window(pid):
            since = now if since is None else since
            if now - since >= stable:
                return True
            continue
        since = None
        if now - checked > 0.05:  # reading the daemon's log is slow: not on every turn
            checked = now
            if reexec_settled(sup, sent):
                return False
        assert now < deadline, f"the re-exec asked for at {sent:.3f} did not complete"


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_targets(pid: int) -> list[str]:
    """What each open descriptor of `pid` refers to (``fd -> target``)."""
    out = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(f"{name} -> {os.readlink(f'/proc/{pid}/fd/{name}')}")
        except OSError:
            pass
    return out


def stable_fd_count(pid: int) -> int:
    """The fd count once it reads the same three times in a row (no client
    connection being opened or closed meanwhile)."""
    seen: list[int] = []

    def stable() -> int | None:
        seen.append(fd_count(pid))
        return seen[-1] if len(seen) >= 3 and seen[-1] == seen[-2] == seen[-3] else None

    return wait_until(stable, 10, "a stable fd count", interval=0.05)


def seq_numbers(path: Path) -> list[int]:
    """The sequence numbers of the complete stdout lines of a SEQ_PRINTER log.

    Every stdout line must be exactly ``seq N``: a lost newline or a line
    written twice in pieces would show up as a malformed line.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    lines = raw.decode("utf-8", "replace").split("\n")
    lines.pop()  # "" after the final newline, or a line being written right now
    out = []
    for n, line in enumerate(lines, 1):
        parts = line.split(" ", 2)
        assert len(parts) == 3, f"{path}:{n}: malformed log line {line!r}"
        if parts[1] != "stdout":
            continue
        m = re.fullmatch(r"seq (\d+)", parts[2])
        assert m, f"{path}:{n}: stdout line mangled: {parts[2]!r}"
        out.append(int(m[1]))
    return out


def assert_contiguous(name: str, seqs: list[int]) -> None:
    """0, 1, 2, … with nothing missing and nothing doubled."""
    if seqs == list(range(len(seqs))):
        return
    for i, n in enumerate(seqs):
        if n != i:
            what = "doubled" if n < i else "missing"
            raise AssertionError(
                f"log of {name}: line {i} is 'seq {n}', expected 'seq {i}' ({what} output); "
                f"around it: {seqs[max(0, i - 3):i + 4]}")


def wait_closed(client: Client, timeout: float) -> None:
    """Read (and drop) what comes until the server closes the connection."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, "the connection is still open"
        try:
            obj = client.recv(timeout=left)
        except ConnectionClosed:
            return
        except TimeoutError:
            continue
        if obj is None:
            return


def ping_pid(sup: Supervisor) -> int:
    rep = sup.request({"action": "ping"}, ro=True)
    assert rep.get("ok") is True, rep
    return rep["result"]["pid"]


# --------------------------------------------------------------------------
# The acceptance test: 50 re-execs under heavy output


@pytest.mark.slow
def test_fifty_reexecs_keep_pids_output_and_fds(sup: Supervisor) -> None:
    names = [f"p{i:02d}" for i in range(20)]
    sup.start({"services": {
        name: py_service(SEQ_PRINTER, sup.marker(name), "split" if i % 2 else "whole",
                         **{"log-max-size": 0})
        for i, name in enumerate(names)
    }})
    daemon = sup.proc
    assert daemon is not None
    before = wait_running(sup, names)
    # Every log file is open once every service has had a line written.
    wait_until(lambda: all(seq_numbers(sup.log_file(n)) for n in names), 15,
               "a line in every service's log")
    fds_before = stable_fd_count(daemon.pid)
    targets_before = fd_targets(daemon.pid)

    pacing = 0.2
    last_send = 0.0
    for i in range(50):
        # One SIGUSR1 every 200 ms; when a re-exec takes longer than that, the
        # next signal waits for it (a signal sent meanwhile would be merged
        # into it, and this test wants 50 real re-execs).
        delay = last_send + pacing - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        last_send = time.monotonic()
        sent = time.time()
        os.kill(daemon.pid, signal.SIGUSR1)
        wait_reexec_settled(sup, sent)
        assert daemon.poll() is None, f"the supervisor died at re-exec {i + 1}:\n{sup.stderr_tail()}"

    kinds = [k for k, _ in reexec_kinds(sup)]
    assert kinds.count("refused") == 0, f"re-execs were refused:\n{sup.stderr_tail()}"
    assert kinds.count("exec") == 50 and kinds.count("resumed") == 50, kinds
    assert ping_pid(sup) == daemon.pid

    # Same PIDs, each the only process of its service.
    after = wait_running(sup, names)
    assert after == before
    assert_one_process_each(sup, before)

    # No line missing or doubled in any log (the services kept printing all along).
    for name in names:
        seqs = seq_numbers(sup.log_file(name))
        assert len(seqs) > 1000, f"{name}: only {len(seqs)} lines logged"
        assert_contiguous(name, seqs)
    # ...and the output keeps flowing after the last re-exec.
    sizes = {n: sup.log_file(n).stat().st_size for n in names}
    wait_until(lambda: all(sup.log_file(n).stat().st_size > sizes[n] + 4096 for n in names), 15,
               "more output after the last re-exec")

    # The fd count is back to where it started.
    try:
        wait_until(lambda: fd_count(daemon.pid) == fds_before, 10,
                   f"the supervisor's fd count to be back at {fds_before}")
    except AssertionError as exc:
        now = fd_targets(daemon.pid)
        extra = sorted(set(now) - set(targets_before))
        gone = sorted(set(targets_before) - set(now))
        raise AssertionError(f"{exc}: {len(now)} open; new: {extra}; closed: {gone}") from None

    # Still supervised: a SIGKILLed service is noticed and respawned.
    victim = names[7]
    os.kill(before[victim], signal.SIGKILL)
    svc = wait_respawned(sup, victim, before[victim])
    assert svc["last-exit"]["signal"] == "SIGKILL", svc["last-exit"]
    assert find_pids(sup.marker(victim)) == {svc["pid"]}


# --------------------------------------------------------------------------
# `herd reexec root`


def test_herd_reexec_end_to_end(sup: Supervisor) -> None:
    sup.start({"services": {
        "base": sleeper(sup.marker("base")),
        "web": sleeper(sup.marker("web"), requires=["base"]),
        "held": sleeper(sup.marker("held")),
        "off": sleeper(sup.marker("off"), **{"auto-start": False}),
    }})
    daemon = sup.proc
    assert daemon is not None
    before = wait_running(sup, ["base", "web", "held"])
    # Operator intent, which the new image must keep.
    sup.herd("stop", "held", check=True)
    sup.herd("disable", "off", check=True)
    running = {n: before[n] for n in ("base", "web")}

    old_client = sup.connect()
    assert old_client.call("ping")["ok"] is True
    old_sub = sup.subscribe()

    cp = sup.herd("reexec", "root", check=True)
    assert "Re-executing" in cp.stdout, cp.stdout
    wait_until(lambda: count_kind(sup, "resumed") == 1, 15, "the new image to resume")

    # Connections open across the exec are handed over: a plain one is still
    # answered, a subscribed one still gets events (numbered on).
    assert old_client.call("ping")["result"]["pid"] == daemon.pid
    sup.herd("restart", "base", check=True)
    got = old_sub.events(lambda evs: any(e.get("service") == "base" and e.get("to") == "running" for e in evs), 15)
    seqs = [e["seq"] for e in got if e.get("event") == "state"]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
    running = wait_running(sup, ["base", "web"])  # restarting base restarted web, its dependent

    # The daemon answers, with the same PID; the services were not touched.
    assert ping_pid(sup) == daemon.pid
    assert sup.herd("ping", check=True).returncode == 0
    status = sup.status()
    assert {n: status[n]["pid"] for n in running} == running
    assert all(status[n]["state"] == "running" for n in running)
    assert_one_process_each(sup, running)
    # Intent survives the re-exec: held stays stopped, off stays disabled.
    assert status["held"]["state"] == "stopped" and find_pids(sup.marker("held")) == set()
    assert status["off"]["enabled"] is False and status["off"]["state"] == "stopped"
    cp = sup.herd("start", "off", check=1)
    assert "disabled" in (cp.stdout + cp.stderr)
    events = [ev["event"] for ev in daemon_events(sup)]
    assert "re-executing" in events and "resumed after re-exec" in events

    # A second re-exec right away works just as well.
    sup.herd("reexec", "root", check=True)
    wait_until(lambda: count_kind(sup, "resumed") == 2, 15, "the second re-exec to resume")
    assert ping_pid(sup) == daemon.pid
    assert {n: sup.rstatus(n)["pid"] for n in running} == running


def test_exec_window_clients_are_served_and_deaths_noticed(sup: Supervisor) -> None:
    """A connection made while the image is being replaced waits in the
    listening socket's backlog and is served by the new image; a service that
    dies meanwhile is noticed (its pidfd was handed over) and respawned."""
    sup.start({"services": {
        "steady": sleeper(sup.marker("steady")),
        "victim": sleeper(sup.marker("victim")),
    }})
    daemon = sup.proc
    assert daemon is not None
    pids = wait_running(sup, ["steady", "victim"])

    caught = None
    for _ in range(5):
        sent = time.time()
        os.kill(daemon.pid, signal.SIGUSR1)
        if catch_exec_window(sup, sent):
            # Mid-exec: kill a service and connect a client now.
            os.kill(pids["victim"], signal.SIGKILL)
            client = Client(sup.socket, timeout=15.0, read_hello=False)
            sup.clients.append(client)
            client.send({"id": "mid-exec", "action": "ping"})
            caught = client
            break
        wait_reexec_settled(sup, sent)
    assert caught is not None, "never saw the daemon between its exec and its resumption"
    client = caught

    hello = client.recv(timeout=15.0)
    assert hello is not None and hello.get("hello") == "supervisor", hello
    reply = client.reply("mid-exec", timeout=15.0)
    assert reply["ok"] is True and reply["result"]["pid"] == daemon.pid, reply
    assert count_kind(sup, "resumed") >= 1

    svc = wait_respawned(sup, "victim", pids["victim"])
    assert svc["last-exit"]["signal"] == "SIGKILL", svc["last-exit"]
    assert find_pids(sup.marker("victim")) == {svc["pid"]}
    assert sup.rstatus("steady")["pid"] == pids["steady"]
    assert find_pids(sup.marker("steady")) == {pids["steady"]}


def test_signal_held_across_the_exec_is_handled_after(sup: Supervisor) -> None:
    """A SIGHUP sent while the image is being replaced is not lost: the new
    image reloads the configuration.  Five times, each adding a service."""
    config: dict[str, Any] = {"services": {"one": sleeper(sup.marker("one"))}}
    sup.start(config)
    daemon = sup.proc
    assert daemon is not None
    pid_one = wait_running(sup, ["one"])["one"]

    for n in range(5):
        name = f"extra{n}"
        config["services"][name] = sleeper(sup.marker(name))
        sup.write_config(config)
        seen: dict[str, Any] = {}
        for _ in range(5):
            sent = time.time()
            os.kill(daemon.pid, signal.SIGUSR1)
            if catch_exec_window(sup, sent):
                os.kill(daemon.pid, signal.SIGHUP)
                seen = proc_signal_state(daemon.pid)
                break
            wait_reexec_settled(sup, sent)
        assert seen, "never saw the daemon between its exec and its resumption"
        wait_reexec_settled(sup, sent)
        try:
            wait_running(sup, [name], timeout=10)
        except AssertionError:
            raise AssertionError(
                f"SIGHUP #{n + 1}, sent while the daemon held its signals blocked for its exec, was lost "
                f"(no reload: {name} never came up); right after sending it: {seen}") from None
    pids = wait_running(sup, ["one", *(f"extra{n}" for n in range(5))])
    assert pids["one"] == pid_one
    assert_one_process_each(sup, pids)
    assert ping_pid(sup) == daemon.pid


def test_sigusr1_burst_is_merged(sup: Supervisor) -> None:
    """SIGUSR1s that arrive while a re-exec is under way join it: merged by
    the daemon while it prepares, or, during the exec itself (signals
    blocked), coalesced by the kernel into one more re-exec; never one
    re-exec per signal.  (A re-exec into unchanged code checks in-process
    and takes a few hundred ms, so a burst may see no "merged" at all.)"""
    sup.start({"services": {f"s{i}": sleeper(sup.marker(f"s{i}")) for i in range(3)}})
    daemon = sup.proc
    assert daemon is not None
    pids = wait_running(sup, ["s0", "s1", "s2"])
    sent, signals = 0.0, 0
    while signals < 30 and not (signals and count_kind(sup, "merged")):
        sent = time.time()
        os.kill(daemon.pid, signal.SIGUSR1)
        signals += 1
        time.sleep(0.02)
    wait_reexec_settled(sup, sent)
    kinds = [k for k, _ in reexec_kinds(sup)]
    assert "refused" not in kinds, sup.stderr_tail()
    assert signals >= 2, kinds
    assert 1 <= kinds.count("exec") < signals and kinds.count("exec") == kinds.count("resumed"), (signals, kinds)
    assert ping_pid(sup) == daemon.pid
    assert wait_running(sup, ["s0", "s1", "s2"]) == pids
    assert_one_process_each(sup, pids)


#: argv: MARKER DELAY.  Sends READY=1 to $NOTIFY_SOCKET after DELAY seconds.
NOTIFY_LATE = r"""
import os, socket, sys, time
time.sleep(float(sys.argv[2]))
addr = os.environ["NOTIFY_SOCKET"]
if addr.startswith("@"):
    addr = "\0" + addr[1:]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(b"READY=1", addr)
time.sleep(1e6)
"""


def test_reexec_waits_for_services_in_transition(sup: Supervisor) -> None:
    """A re-exec asked for while a service is starting waits until it is up;
    the reply to that start still reaches its client."""
    sup.start({"services": {
        "steady": sleeper(sup.marker("steady")),
        "slow": py_service(NOTIFY_LATE, sup.marker("slow"), "1.0",
                           **{"auto-start": False, "ready": {"type": "notify"}}),
    }})
    daemon = sup.proc
    assert daemon is not None
    steady = wait_running(sup, ["steady"])["steady"]
    started: dict[str, Any] = {}
    starter = threading.Thread(target=lambda: started.update(cp=sup.herd("start", "slow")))
    starter.start()
    try:
        wait_until(lambda: sup.rstatus("slow")["state"] == "starting", 10, "slow to be starting")
        sup.herd("reexec", "root", check=True)
    finally:
        starter.join(30)
    cp = started["cp"]
    assert cp.returncode == 0, (cp.stdout, cp.stderr)
    wait_until(lambda: count_kind(sup, "resumed") == 1, 15, "the re-exec to resume")

    events = daemon_events(sup)
    names = [(ev["event"], ev.get("service"), ev.get("new")) for ev in events]
    up = names.index(("state", "slow", "running"))
    assert up < names.index(("re-executing", None, None)), "re-executed while slow was starting"
    slow = sup.rstatus("slow")
    assert slow["state"] == "running"
    assert find_pids(sup.marker("slow")) == {slow["pid"]}
    assert sup.rstatus("steady")["pid"] == steady
    assert ping_pid(sup) == daemon.pid


# --------------------------------------------------------------------------
# A broken new image is refused


def copy_image(dest: Path) -> Path:
    """A copy of the importable source tree (what an upgrade would replace)."""
    dest.mkdir()
    for package in ("supervisor", "herd", "services"):
        shutil.copytree(REPO / package, dest / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


@pytest.mark.parametrize("breakage", ["import", "config"])
def test_broken_new_image_is_refused(sup: Supervisor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     breakage: str) -> None:
    image = copy_image(tmp_path / "image")
    real_env = helpers.base_env

    def image_env() -> dict[str, str]:
        env = real_env()
        env["PYTHONPATH"] = str(image)
        return env

    # The daemon (and herd) run from the copy; the test breaks the copy.
    monkeypatch.setattr(helpers, "base_env", image_env)
    config = {"services": {
        "a": sleeper(sup.marker("a")),
        "b": sleeper(sup.marker("b"), requires=["a"]),
    }}
    sup.start(config)
    daemon = sup.proc
    assert daemon is not None
    pids = wait_running(sup, ["a", "b"])
    engine_py = image / "supervisor" / "engine.py"
    good_source = engine_py.read_text()
    if breakage == "import":
        engine_py.write_text(good_source + "\ndef broken(:\n")
        expect = "SyntaxError"
    else:
        # The new code refuses the configuration in force (the file on disk is
        # not what a re-exec checks: it runs the configuration in force).
        config_py = image / "supervisor" / "config.py"
        good_config = config_py.read_text()
        config_py.write_text(good_config + "\n\ndef parse_config(*args, **kwargs):\n"
                             "    raise ConfigErrors([ConfigError('services.b', 'a key the new code refuses')])\n")
        expect = "a key the new code refuses"

    # herd reexec root: refused with the reason, exit status 1.
    cp = sup.herd("reexec", "root", check=1)
    assert "refused" in cp.stderr + cp.stdout and expect in cp.stderr + cp.stdout, (cp.stdout, cp.stderr)
    cp = sup.herd("--json", "reexec", "root", check=1)
    err = json.loads(cp.stdout)
    assert err["code"] == "action-failed" and expect in err["message"], err

    # SIGUSR1: refused as well, and logged.
    sent = time.time()
    os.kill(daemon.pid, signal.SIGUSR1)
    wait_reexec_settled(sup, sent)
    refusals = [ev for ev in daemon_events(sup) if _kind(ev) == "refused"]
    assert refusals and any(expect in json.dumps(ev) for ev in refusals), refusals
    assert count_kind(sup, "exec") == 0

    # The old supervisor keeps serving, its services untouched.
    assert daemon.poll() is None
    assert ping_pid(sup) == daemon.pid
    assert pids_of(sup) == pids
    assert_one_process_each(sup, pids)
    sup.herd("restart", "b", check=True)
    pids["b"] = wait_running(sup, ["b"])["b"]
    assert_one_process_each(sup, pids)

    # Fixed, the same request goes through.
    engine_py.write_text(good_source)
    if breakage == "config":
        config_py.write_text(good_config)
    sup.herd("reexec", "root", check=True)
    wait_until(lambda: count_kind(sup, "resumed") == 1, 15, "the re-exec to resume")
    assert ping_pid(sup) == daemon.pid
    assert pids_of(sup) == pids
    assert_one_process_each(sup, pids)
