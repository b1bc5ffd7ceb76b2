"""Issue 2 acceptance: the control sockets under concurrent and misbehaving
clients, the read-only socket, `subscribe`, and protocol basics."""

from __future__ import annotations

import json
import os
import random
import socket
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil
import pytest

from helpers import (
    MARKER_ENV,
    Client,
    ConnectionClosed,
    Deadline,
    Supervisor,
    find_procs,
    launcher,
    run_herd,
    sleeper,
    wait_until,
)

from herd.protocol import ERROR_CODES, MAX_LINE_BYTES

N_SERVICES = 50
N_CLIENTS = 20
HERD_CLIENTS = 4  # of the 20, these run the real `herd`; the rest speak the protocol


def test_concurrent_clients_keep_states_consistent(sup: Supervisor) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    names = [f"s{i:02d}" for i in range(N_SERVICES)]
    sup.start({"services": {n: sleeper(sup.marker(n), **{"auto-start": False}) for n in names}})
    markers = {sup.marker(n): n for n in names}

    problems: list[str] = []
    lock = threading.Lock()

    def problem(msg: str) -> None:
        with lock:
            problems.append(msg)

    final_phase = threading.Event()

    def check_reply(who: str, action: str, service: str | None, rep: dict[str, Any]) -> None:
        if rep.get("ok") is True:
            return
        code = (rep.get("error") or {}).get("code")
        # In phase 1 a start that a concurrent stop overtook may fail
        # ("stopped while starting"); nothing else may, and nothing in phase 2.
        if action == "start" and code == "start-failed" and not final_phase.is_set():
            return
        problem(f"{who}: {action} {service}: {rep}")

    def raw_client(k: int, ops: list[tuple[str, str | None]]) -> None:
        c = Client(sup.socket, timeout=30)
        try:
            # Up to 4 requests in flight at once on this connection.
            for i in range(0, len(ops), 4):
                batch = ops[i:i + 4]
                sent = []
                for action, service in batch:
                    req: dict[str, Any] = {"action": action}
                    if service:
                        req["service"] = service
                    sent.append((c.send(req), action, service))
                for req_id, action, service in sent:
                    try:
                        rep = c.reply(req_id, timeout=60)
                    except (TimeoutError, ConnectionClosed) as exc:
                        problem(f"client {k}: no reply to {action} {service}: {exc}")
                        return
                    check_reply(f"client {k}", action, service, rep)
        finally:
            c.close()

    def herd_client(k: int, ops: list[tuple[str, list[str]]], final: bool = False) -> None:
        for action, services in ops:
            cp = run_herd(sup.socket, action, *services, timeout=60)
            # As above: in phase 1 a start may lose to a concurrent stop (exit 1).
            if cp.returncode == 0 or (cp.returncode == 1 and action == "start" and not final):
                continue
            problem(f"herd client {k}: herd {action} {services} -> {cp.returncode}: {cp.stderr}")

    # A watcher samples the processes throughout: never two for one service.
    stop_watch = threading.Event()
    duplicates: list[str] = []

    def watch() -> None:
        while not stop_watch.is_set():
            counts: dict[str, list[int]] = {}
            for p in find_procs_any(markers):
                counts.setdefault(p[0], []).append(p[1])
            for m, pids in counts.items():
                if len(pids) > 1:
                    duplicates.append(f"{markers[m]}: {pids}")
            stop_watch.wait(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        # Phase 1: random start/stop/status from 20 clients at once.
        with ThreadPoolExecutor(N_CLIENTS) as pool:
            futures = []
            for k in range(N_CLIENTS):
                if k < HERD_CLIENTS:
                    hops = [(rng.choice(["start", "stop", "status"]), [rng.choice(names)]) for _ in range(3)]
                    futures.append(pool.submit(herd_client, k, hops))
                else:
                    rops = [
                        (a, None if a == "status" and rng.random() < 0.3 else rng.choice(names))
                        for a in (rng.choice(["start", "stop", "status"]) for _ in range(12))
                    ]
                    futures.append(pool.submit(raw_client, k, rops))
            for f in futures:
                f.result(timeout=120)
        assert not problems, f"seed {seed}: {problems}"

        # Phase 2: every service gets one last command, all clients at once.
        final = {n: rng.choice(["start", "stop"]) for n in names}
        final_phase.set()
        with ThreadPoolExecutor(N_CLIENTS) as pool:
            futures = []
            for k in range(N_CLIENTS):
                mine = [n for i, n in enumerate(names) if i % N_CLIENTS == k]
                if k < HERD_CLIENTS:
                    hops = [(a, [n for n in mine if final[n] == a]) for a in ("start", "stop")]
                    futures.append(pool.submit(herd_client, k, [(a, s) for a, s in hops if s], True))
                else:
                    futures.append(pool.submit(raw_client, k, [(final[n], n) for n in mine]))
            for f in futures:
                f.result(timeout=120)
        assert not problems, f"seed {seed}: {problems}"
    finally:
        stop_watch.set()
        watcher.join(5)

    status = sup.status()
    wrong = {n: status[n]["state"] for n in names
             if status[n]["state"] != ("running" if final[n] == "start" else "stopped")}
    assert not wrong, f"seed {seed}: final states differ from the last commands: {wrong}"
    for n in names:
        pids = {p.pid for p in find_procs(sup.marker(n))}
        if final[n] == "start":
            assert pids == {status[n]["pid"]}, f"seed {seed}: {n}: status pid {status[n]['pid']}, processes {pids}"
        else:
            assert pids == set(), f"seed {seed}: {n} was stopped last, yet has processes {pids}"
    assert not duplicates, f"seed {seed}: duplicate processes seen: {duplicates[:10]}"


def find_procs_any(markers: dict[str, str]) -> list[tuple[str, int]]:
    """(marker, pid) for every live process carrying one of ``markers``."""
    out = []
    for p in psutil.process_iter(["pid", "cmdline", "environ", "status"]):
        if p.info.get("status") == psutil.STATUS_ZOMBIE or launcher(p.info):
            continue  # (the spawn helper carries the service's environment until the service runs)
        m = (p.info.get("environ") or {}).get(MARKER_ENV)
        if m in markers:
            out.append((m, p.pid))
    return out


#: A poll stuck behind a misbehaving client would wait for its line timeout
#: (10 s) or forever; anything under this bound was not blocked.
POLL_BOUND = 2.0


def test_misbehaving_clients_do_not_block_others(sup: Supervisor) -> None:
    sup.start({"services": {n: sleeper(sup.marker(n)) for n in ("a", "b", "c")}})
    wait_until(lambda: all(s["state"] == "running" for s in sup.rstatus().values()), 10, "a, b, c running")

    latencies: list[float] = []
    slow: list[str] = []
    poll_errors: list[str] = []
    stop_polling = threading.Event()

    def poller() -> None:
        c = Client(sup.socket, timeout=5)
        try:
            n = 0
            while not stop_polling.is_set():
                n += 1
                t0 = time.monotonic()
                try:
                    if n % 5 == 0:  # now and then on a fresh connection
                        fresh = Client(sup.socket, timeout=5)
                        try:
                            rep = fresh.call("status", timeout=5)
                        finally:
                            fresh.close()
                    else:
                        rep = c.call("status", timeout=5)
                except Exception as exc:  # noqa: BLE001 - reported below
                    poll_errors.append(f"poll {n}: {exc!r}")
                    return
                dt = time.monotonic() - t0
                latencies.append(dt)
                if dt >= POLL_BOUND:
                    slow.append(f"poll {n}: {dt * 1000:.0f} ms")
                if rep.get("ok") is not True or len(rep["result"]["services"]) != 3:
                    poll_errors.append(f"poll {n}: bad reply {rep}")
                stop_polling.wait(0.02)
        finally:
            c.close()

    outcome: dict[str, Any] = {}

    def silent() -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(sup.socket))
        outcome["silent"] = s  # kept open, never read, never written

    def half_line() -> None:
        c = sup.connect()
        c.send_raw(b'{"id": 1, "action": "sta')

    def garbage() -> None:
        c = sup.connect()
        c.send_raw(b"\xff\xfe\x00 garbage\n[1, 2, 3]\n{\"id\": 5, \"action\": 7}\n")
        got = []
        for _ in range(3):
            got.append(c.recv(5))
        outcome["garbage"] = got

    def oversize() -> None:
        c = sup.connect(timeout=10)
        chunk = b"x" * (256 * 1024)
        sent = 0
        try:
            c.send_raw(b'{"id": 1, "action": "status", "service": "')
            while sent < 100 * 1024 * 1024:
                c.sock.sendall(chunk)
                sent += len(chunk)
            outcome["oversize-end"] = "sent 100 MB without being disconnected"
        except (BrokenPipeError, ConnectionResetError):
            outcome["oversize-end"] = "disconnected"
        except socket.timeout:
            outcome["oversize-end"] = "server stopped reading but kept the connection"
        outcome["oversize-sent"] = sent
        try:
            outcome["oversize-reply"] = c.recv(5)
            outcome["oversize-eof"] = c.recv(5) is None
        except Exception as exc:  # noqa: BLE001 - reported by the assertions
            outcome["oversize-reply"] = repr(exc)

    def never_reads() -> None:
        c = sup.connect(timeout=3)
        burst = b"".join(
            json.dumps({"id": i, "action": "detailed-status"}).encode() + b"\n" for i in range(20000)
        )
        try:
            c.sock.sendall(burst)
        except (OSError, socket.timeout):
            pass  # the server may stop reading or hang up: both are fine

    def churn() -> None:
        for _ in range(50):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(sup.socket))
            s.close()

    poll_thread = threading.Thread(target=poller, daemon=True)
    poll_thread.start()
    wait_until(lambda: len(latencies) >= 3 or poll_errors, 5, "the poller to get going")
    bad = [threading.Thread(target=f, daemon=True) for f in (silent, half_line, garbage, oversize, never_reads, churn)]
    for t in bad:
        t.start()
    deadline = Deadline(60)
    for t in bad:
        t.join(deadline.remaining())
        assert not t.is_alive(), f"misbehaving client {t} did not finish"
    # Keep polling for a while with every bad client still connected (the
    # silent and half-line ones hold their connections open).
    n = len(latencies)
    wait_until(lambda: len(latencies) >= n + 40 or poll_errors, 10, "forty more polls")
    stop_polling.set()
    poll_thread.join(10)
    try:
        outcome["silent"].close()
    except KeyError:
        pass

    assert not poll_errors, poll_errors
    assert len(latencies) >= 43, f"only {len(latencies)} polls"
    # Every poll is answered, and none waits on a bad client.  The bound is
    # generous on purpose (a shared machine stalls for 100s of ms); the latency
    # itself is measured by contrib/bench and the soak, not asserted here.
    assert not slow, f"{len(slow)} of {len(latencies)} status polls took {POLL_BOUND} s or more: {slow[:10]}"

    assert outcome["oversize-end"] == "disconnected", outcome
    assert outcome["oversize-sent"] < 100 * 1024 * 1024
    rep = outcome["oversize-reply"]
    assert isinstance(rep, dict) and rep.get("ok") is False, rep
    assert rep["error"]["code"] == "line-too-long", rep
    assert outcome["oversize-eof"] is True, "the server must close after line-too-long"

    garbage_replies = outcome["garbage"]
    assert all(r is not None and r.get("ok") is False for r in garbage_replies), garbage_replies
    assert [r["error"]["code"] for r in garbage_replies] == ["bad-request"] * 3, garbage_replies
    assert garbage_replies[2]["id"] == 5

    # Still serving, herd included.
    run_herd(sup.socket, "status", check=True)


def test_limit_on_clients(sup: Supervisor) -> None:
    sup.start({"services": {"a": sleeper(sup.marker("a"), **{"auto-start": False})}})
    held = [sup.connect() for _ in range(256)]
    assert all(c.hello and c.hello.get("hello") == "supervisor" for c in held)
    extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    extra.settimeout(5)
    extra.connect(str(sup.socket))
    data = b""
    while True:
        chunk = extra.recv(65536)
        if not chunk:
            break
        data += chunk
    extra.close()
    objs = [json.loads(line) for line in data.splitlines() if line.strip()]
    codes = [o.get("error", {}).get("code") for o in objs]
    assert "too-many-clients" in codes, objs
    # The read-only socket has its own limit, and one freed slot is usable again.
    assert sup.rstatus("a")["state"] == "stopped"
    held.pop().close()

    def connects() -> bool:
        try:
            c = Client(sup.socket, timeout=2)
        except (OSError, TimeoutError):
            return False
        try:
            return bool(c.hello and "hello" in c.hello)
        finally:
            c.close()

    wait_until(connects, 5, "a connection once a slot is free")


def test_read_only_socket_refuses_writes(sup: Supervisor) -> None:
    marker = sup.marker("a")
    sup.start({"services": {"a": sleeper(marker, **{"auto-start": False})}})
    ro = sup.connect(ro=True)
    rw = sup.connect()
    assert ro.hello["hello"] == "supervisor" and ro.hello["protocol"] == 1
    assert ro.hello["read-only"] is True
    assert rw.hello["read-only"] is False

    for action, service in [("start", "a"), ("stop", "a"), ("restart", "a"), ("enable", "a"),
                            ("disable", "a"), ("reload", "root"), ("reexec", "root")]:
        rep = ro.call(action, service)
        assert rep["ok"] is False, rep
        assert rep["error"]["code"] == "read-only", rep
    assert find_procs(marker) == []
    assert sup.rstatus("a")["enabled"] is True

    for action, service in [("status", None), ("status", "a"), ("detailed-status", None),
                            ("doc", "a"), ("log", None), ("graph", None), ("ping", None)]:
        rep = ro.call(action, service)
        assert rep["ok"] is True, (action, rep)

    cp = run_herd(sup.status_socket, "start", "a", check=1)
    assert "Traceback" not in cp.stderr
    assert find_procs(marker) == []
    cp = run_herd(sup.status_socket, "status", check=True)
    assert "a" in cp.stdout


def test_control_socket_is_private(sup: Supervisor) -> None:
    sup.start({"services": {}})
    assert stat.S_ISSOCK(os.stat(sup.socket).st_mode)
    assert stat.S_IMODE(os.stat(sup.socket).st_mode) == 0o600


@pytest.mark.parametrize("ro", [True, False], ids=["read-only", "read-write"])
def test_subscribe_streams_state_changes(sup: Supervisor, ro: bool) -> None:
    sup.start({"services": {"a": sleeper(sup.marker("a"), **{"auto-start": False})}})
    events = sup.subscribe(ro=ro)
    started = sup.herd("start", "a", json=True, check=True).data["pid"]
    sup.herd("stop", "a", check=True)

    got = events.events(
        lambda ev: any(e["service"] == "a" and e["to"] == "stopped" for e in ev), timeout=5)
    for e in got:
        assert e["event"] == "state"
        assert set(e) >= {"service", "from", "to", "pid", "time", "reason"}, e
        assert isinstance(e["time"], float | int)
        assert "id" not in e
    chain = [(e["from"], e["to"]) for e in got if e["service"] == "a"]
    assert chain[0][0] == "stopped", chain
    for (_, to), (frm, _) in zip(chain, chain[1:]):
        assert frm == to, f"events do not chain: {chain}"
    assert [to for _, to in chain].count("running") == 1, chain
    assert chain[-1][1] == "stopped", chain
    states = {to for _, to in chain}
    assert states <= {"starting", "running", "stopping", "stopped"}, chain
    running = next(e for e in got if e["service"] == "a" and e["to"] == "running")
    assert running["pid"] == started


def test_protocol_basics(sup: Supervisor) -> None:
    sup.start({"services": {
        "A": sleeper(sup.marker("A"), **{"auto-start": False}),
        "C": sleeper(sup.marker("C"), requires=["A"], documentation="The C service.", **{"auto-start": False}),
    }})
    c = sup.connect()
    assert c.hello["hello"] == "supervisor" and c.hello["protocol"] == 1
    assert isinstance(c.hello["version"], str)

    rep = c.call("ping")
    assert rep["ok"] is True and rep["result"]["pong"] is True
    assert rep["result"]["pid"] == sup.proc.pid
    assert isinstance(rep["messages"], list)

    # Several requests in flight on one connection, string ids echoed.
    for req_id in ("one", "two", "three"):
        c.send({"id": req_id, "action": "status"})
    replies = {c.recv(5)["id"] for _ in range(3)}
    assert replies == {"one", "two", "three"}

    rep = c.call("status", "C")
    svc = rep["result"]["services"][0]
    for key in ("name", "provides", "requires", "state", "enabled", "disabled-reason", "one-shot",
                "respawn", "auto-start", "pid", "since", "command", "ready", "last-exit", "respawns",
                "startup-failures", "log-file", "actions", "recent-log"):
        assert key in svc, f"status lacks {key!r}: {svc}"
    assert svc["requires"] == ["A"] and svc["ready"] == {"type": "started"}
    assert svc["log-file"] == str(sup.log_file("C"))
    assert svc["pid"] is None and svc["last-exit"] is None
    rep = c.call("status")
    assert [s["name"] for s in rep["result"]["services"]] == ["A", "C"]
    assert all("recent-log" not in s for s in rep["result"]["services"])

    rep = c.call("doc", "C")
    assert rep["ok"] is True and rep["result"]["documentation"] == "The C service."

    rep = c.call("graph")
    assert '"C" -> "A"' in rep["result"]["dot"], rep
    dot = run_herd(sup.socket, "graph", check=True).stdout
    assert "digraph" in dot and '"C" -> "A"' in dot

    c.send_raw(b'{"id": 9, "action": "status", "bogus": 1}\n')
    rep = c.recv(5)
    assert rep["id"] == 9 and rep["ok"] is False and rep["error"]["code"] == "bad-request"

    # A line just under the limit is read (and refused as a request), not cut.
    padding = "x" * (MAX_LINE_BYTES - 200)
    c.send_raw(json.dumps({"id": 10, "action": "status", "service": padding}).encode() + b"\n")
    rep = c.reply(10, timeout=10)
    assert rep["ok"] is False and rep["error"]["code"] == "unknown-service", rep["error"]["code"]
    assert rep["error"]["code"] in ERROR_CODES
    assert c.call("ping")["ok"] is True
