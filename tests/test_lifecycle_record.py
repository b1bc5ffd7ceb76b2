"""Issue 13: what a service knows survives a re-exec (and a crash of ours)
whole, the configuration in force is what a re-exec runs, and reloads are
serialized."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from typing import Any

from helpers import (
    PY,
    Collector,
    Supervisor,
    base_env,
    count_resumed,
    crash,
    find_pids,
    reexec,
    restart,
    sleeper,
    wait_state,
    wait_until,
)


def snapshot(sup: Supervisor, name: str) -> dict[str, Any]:
    st = sup.rstatus(name)
    keep = ("state", "since", "enabled", "disabled-reason", "pid", "last-exit", "timer", "status-text")
    return {k: st.get(k) for k in keep}


ONE_SHOT = "import sys; print('one-shot ran', sys.argv[1], flush=True)"
CHATTY = "import sys, time\nfor i in range(5): print('line', i, flush=True)\ntime.sleep(1e6)"
STAY_DOWN = "import sys; sys.exit(11)"


def config(sup: Supervisor) -> dict[str, Any]:
    return {"services": {
        "once": {"command": [PY, "-c", ONE_SHOT, sup.marker("once")], "one-shot": True},
        "chatty": {"command": [PY, "-c", CHATTY, sup.marker("chatty")]},
        "off": sleeper(sup.marker("off")),
        "timer": {"command": [PY, "-c", "print('tick')"], "schedule": "0 0 1 1 *"},
        "needless": {"command": [PY, "-c", STAY_DOWN, sup.marker("needless")],
                     "stay-down-exit-codes": [11]},
    }}


def test_a_reexec_keeps_what_each_service_knows(sup: Supervisor) -> None:
    sup.start(config(sup))
    wait_until(lambda: sup.rstatus("once")["state"] == "stopped" and sup.rstatus("chatty")["state"] == "running"
               and sup.rstatus("timer")["state"] == "running" and sup.rstatus("needless")["state"] == "stopped",
               20, "everything started")
    wait_until(lambda: "line 4" in sup.herd("log", "chatty").stdout, 10, "chatty's lines")
    sup.herd("trigger", "timer", check=0)
    wait_until(lambda: (sup.rstatus("timer").get("timer") or {}).get("last-run", {}).get("end"), 10, "a timer run")
    sup.herd("disable", "off", check=0)
    sup.herd("stop", "off", check=0)
    before = {n: snapshot(sup, n) for n in ("once", "chatty", "off", "timer", "needless")}
    log_before = sup.herd("log", "chatty").stdout
    runs = (sup.log_dir / "once.log").read_text().count("one-shot ran")

    for _ in range(2):
        reexec(sup)
        after = {n: snapshot(sup, n) for n in before}
        for name in before:
            assert after[name] == before[name], name
        assert sup.herd("log", "chatty").stdout == log_before, "herd log lost earlier lines"
        assert (sup.log_dir / "once.log").read_text().count("one-shot ran") == runs, "the one-shot ran again"
        assert find_pids(sup.marker("needless")) == set(), "a stay-down service was started again"
    assert after["off"]["disabled-reason"] == "disabled by the operator"


def test_a_crash_of_ours_does_not_run_a_finished_one_shot_again(sup: Supervisor) -> None:
    sup.start(config(sup))
    wait_until(lambda: sup.rstatus("once")["state"] == "stopped" and sup.rstatus("chatty")["state"] == "running",
               20, "everything started")
    wait_until(lambda: "line 4" in sup.herd("log", "chatty").stdout, 10, "chatty's lines")
    runs = (sup.log_dir / "once.log").read_text().count("one-shot ran")
    since = sup.rstatus("once")["since"]
    crash(sup)
    restart(sup)
    wait_until(lambda: sup.rstatus("chatty")["state"] == "running", 20, "chatty adopted")
    assert (sup.log_dir / "once.log").read_text().count("one-shot ran") == runs
    assert sup.rstatus("once")["since"] == since
    assert "line 4" in sup.herd("log", "chatty").stdout, "herd log lost the lines from before the crash"
    assert find_pids(sup.marker("needless")) == set()


def test_a_reexec_runs_the_configuration_in_force(sup: Supervisor) -> None:
    sup.start({"services": {"kept": sleeper(sup.marker("kept")), "other": sleeper(sup.marker("other"))}})
    wait_until(lambda: sup.rstatus("kept")["state"] == "running", 10, "kept running")
    pid = sup.rstatus("kept")["pid"]
    sup.write_config({"services": {"other": sleeper(sup.marker("other"))}})  # edited, not reloaded
    reexec(sup)
    assert sup.rstatus("kept")["pid"] == pid, "a service removed from the file was dropped by a re-exec"
    sup.herd("restart", "kept", check=0)  # still supervised
    wait_until(lambda: sup.rstatus("kept")["state"] == "running" and sup.rstatus("kept")["pid"] != pid, 10,
               "kept restarted")
    sup.herd("reload", "root", check=0)  # the edit takes effect only now
    assert "kept" not in sup.rstatus()
    wait_until(lambda: find_pids(sup.marker("kept")) == set(), 10, "kept stopped by the reload")


def test_a_reexec_checks_the_configuration_in_force_not_the_edited_file(sup: Supervisor) -> None:
    sup.start({"services": {"a": sleeper(sup.marker("a"))}})
    sup.write_config("this is [not toml")  # the file is broken, the configuration in force is fine
    reexec(sup)
    assert sup.rstatus("a")["state"] == "running"


def test_concurrent_reloads_are_applied_one_after_the_other(sup: Supervisor) -> None:
    sup.start({"services": {"a": sleeper(sup.marker("a"))}})
    files = []
    for i in range(2):
        path = sup.tmp / f"conf{i}.toml"
        sup.write_config({"services": {"a": sleeper(sup.marker("a")),
                                       **{f"s{i}-{k}": sleeper(sup.marker(f"s{i}-{k}")) for k in range(5)}}}, path)
        files.append(path)
    replies: list[dict[str, Any]] = []

    def reload(path: Any) -> None:
        replies.append(sup.request({"id": 1, "action": "reload", "service": "root", "args": [str(path)]},
                                   timeout=60))

    threads = [threading.Thread(target=reload, args=(p,)) for p in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert len(replies) == 2 and all(r.get("ok") for r in replies), replies
    names = set(sup.rstatus())
    # the last reload applied wins, whole: a, and one file's five services
    assert names in ({"a", *(f"s0-{k}" for k in range(5))}, {"a", *(f"s1-{k}" for k in range(5))}), names


def test_event_numbers_go_on_across_reexecs(sup: Supervisor) -> None:
    """`seq` numbers every state event, contiguously, and a re-exec keeps the
    counter and the `epoch`; a fresh start draws a new epoch."""
    sup.start({"services": {"a": sleeper(sup.marker("a"))}})
    wait_until(lambda: sup.rstatus("a")["state"] == "running", 10, "a running")
    seen: list[tuple[str, int]] = []
    epoch = None
    for _ in range(3):
        sub = sup.subscribe()
        epoch0, last = sub.subscribed_at
        assert epoch is None or epoch0 == epoch, "a re-exec drew a new epoch"
        epoch = epoch0
        assert not seen or last == seen[-1][1], f"events were numbered while nobody looked: {last} vs {seen[-1]}"
        sup.herd("restart", "a", check=0)
        got = sub.events(lambda evs: sum(1 for e in evs if e.get("to") == "running") >= 1, 10)
        seen += [(e["epoch"], e["seq"]) for e in got if e.get("event") == "state"]
        sub.close()
        reexec(sup)
    seqs = [n for _, n in seen]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
    assert {e for e, _ in seen} == {epoch}
    crash(sup)
    restart(sup)
    assert sup.subscribe().subscribed_at[0] != epoch, "a fresh start must draw a new epoch"


COUNTER = "import sys, time\ni = 0\nwhile True:\n    print(i, flush=True)\n    i += 1\n    time.sleep(0.01)"

#: Connections subscribed before the re-execs (the issue's acceptance: 20).
SUBSCRIBERS = 20
#: Re-execs, each after a restart of a service.  The issue's acceptance asks
#: for 50 (``SVTEST_REEXECS=50``); each re-exec starts Python twice with the
#: whole supervisor imported (the preflight check, then the new image), about
#: 1 s on an idle 2-core machine and several under load, so the default
#: keeps this test, which runs twice (cgroups and the fallback), within a
#: minute a run.
REEXECS = int(os.environ.get("SVTEST_REEXECS", "12"))


def numbers(events: list[dict[str, Any]]) -> list[int]:
    """The counter's numbers in `events` (log events or LOGLINEs), in order."""
    return [int(e["line"]) for e in events if e.get("stream") == "stdout" and e.get("service") == "counter"]


def assert_every_number_once(what: str, seen: list[int], start: int, last: int) -> None:
    """`seen` holds start..last, each once, in order (and may go on after `last`)."""
    seen = seen[: seen.index(last) + 1] if last in seen else seen
    assert seen == sorted(set(seen)), f"{what}: a line was doubled or out of order"
    lost = set(range(start, last + 1)) - set(seen)
    assert not lost, f"{what}: lines lost: {sorted(lost)[:50]} ({len(lost)} in all)"


def test_connections_are_kept_across_reexecs(sup: Supervisor) -> None:
    """Subscribers and log followers connected before many re-execs, with a
    service restarted before each, keep their connection and miss and double
    nothing; a plain connection is still answered."""
    sup.start({"services": {"a": sleeper(sup.marker("a")),
                            "counter": {"command": [PY, "-c", COUNTER, sup.marker("counter")]}}})
    wait_state(sup, "a", "running")
    wait_state(sup, "counter", "running")
    subs = [sup.subscribe(ro=bool(i % 2)) for i in range(SUBSCRIBERS)]
    follower = sup.connect(ro=True)
    first = follower.call("log", "counter", args=[1, "follow"])
    assert first["ok"], first
    readers = [Collector(c) for c in (*subs, follower)]  # read as they come, as a dashboard does
    herd_out, herd_err = sup.tmp / "follow.out", sup.tmp / "follow.err"
    with open(herd_out, "wb") as out, open(herd_err, "wb") as err:
        herd_follow = subprocess.Popen([PY, "-m", "herd", "-s", str(sup.socket), "--json", "log", "counter",
                                        "-n", "1", "-f"], env=base_env(), stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=err)
    try:
        wait_until(lambda: herd_out.read_bytes().count(b"\n") >= 2, 20, "`herd log -f` following")
        plain = sup.connect()  # asks for the restarts
        for _ in range(REEXECS):
            assert plain.call("restart", "a", timeout=30)["ok"] is True
            reexec(sup)
            assert plain.call("ping")["ok"] is True
        assert plain.call("restart", "a", timeout=30)["ok"] is True  # one more after the last re-exec
        restarts = REEXECS + 1

        for k, (sub, reader) in enumerate(zip(subs, readers)):
            def restarted(reader: Collector = reader) -> bool:
                return sum(1 for e in reader.events("state") if e["service"] == "a" and e["to"] == "running") \
                    >= restarts
            wait_until(restarted, 30, f"subscriber {k} to see {restarts} restarts of a")
            got = reader.events("state")
            seqs = [e["seq"] for e in got]
            assert seqs == list(range(sub.subscribed_at[1] + 1, sub.subscribed_at[1] + 1 + len(seqs))), (k, seqs)
            assert {e["epoch"] for e in got} == {sub.subscribed_at[0]}, k
            # every change once: a's four steps per restart, nothing else, nothing twice
            assert [(e["service"], e["from"], e["to"]) for e in got] == \
                [("a", "running", "stopping"), ("a", "stopping", "stopped"), ("a", "stopped", "starting"),
                 ("a", "starting", "running")] * restarts, k
            assert not reader.events("overflow") and not reader.closed and reader.error is None, k

        # both followers saw every line the counter printed, once, in order
        logged = sup.request({"id": 9, "action": "log", "service": "counter", "args": [20]})["result"]["lines"]
        last = numbers(logged)[-1]
        raw = readers[-1]
        wait_until(lambda: last in numbers(raw.events("log")), 30, f"the follower to get line {last}")
        before = numbers(first["result"]["lines"])
        seen = numbers(raw.events("log"))
        assert_every_number_once("the follower", seen, before[-1] + 1 if before else seen[0], last)
        assert not raw.events("overflow") and not raw.closed and raw.error is None

        def herd_lines() -> list[dict[str, Any]]:
            return [json.loads(line) for line in herd_out.read_text().splitlines()[:-1]]  # the last may be partial

        wait_until(lambda: last in numbers(herd_lines()), 30, f"`herd log -f` to print line {last}")
        reply, *events = herd_lines()
        before = numbers(reply["lines"])
        seen = numbers(events)
        assert_every_number_once("`herd log -f`", seen, before[-1] + 1 if before else seen[0], last)
        assert herd_follow.poll() is None, "`herd log -f` ended"
        assert herd_err.read_text() == "", herd_err.read_text()
    finally:
        for reader in readers:
            reader.stop()
        herd_follow.kill()
        herd_follow.wait(10)


def test_every_request_is_answered_once_across_reexecs(sup: Supervisor) -> None:
    """Clients that keep requests in flight while the supervisor re-executes
    get one reply to each, whichever image answers it: a reply made just
    before the exec is handed over, not dropped."""
    sup.start({"services": {"a": sleeper(sup.marker("a")), "b": sleeper(sup.marker("b"))}})
    wait_until(lambda: sup.rstatus("a")["state"] == "running", 10, "a running")
    stop = threading.Event()
    problems: list[str] = []

    def client(k: int) -> None:
        conn = sup.connect()
        asked: dict[Any, str] = {}
        n = 0
        try:
            while not stop.is_set():
                batch = []
                for action, service in (("status", None), ("restart", "ab"[k % 2]), ("ping", None)):
                    n += 1
                    req: dict[str, Any] = {"id": f"{k}-{n}", "action": action}
                    if service:
                        req["service"] = service
                    asked[conn.send(req)] = f"{action} {service or ''}"
                    batch.append(req["id"])
                for req_id in batch:
                    conn.reply(req_id, timeout=60)
                    del asked[req_id]
            extra = conn.events(None, 0.5)  # nothing may come twice
            doubled = [obj.get("id") for obj in extra if "event" not in obj]
            if doubled:
                problems.append(f"client {k}: replies came twice: {doubled}")
        except Exception as exc:  # noqa: BLE001 - reported below, with what was asked
            problems.append(f"client {k}: {type(exc).__name__}: {exc}; unanswered: {asked}")
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    try:
        for i in range(8):  # both ways in: SIGUSR1 (no reply to wait for) and `herd reexec`
            if i % 2:
                reexec(sup)
            else:
                n = count_resumed(sup)
                assert sup.proc is not None
                os.kill(sup.proc.pid, signal.SIGUSR1)
                wait_until(lambda n=n: count_resumed(sup) == n + 1, 20, "the new image to resume")
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert not problems, problems
    assert count_resumed(sup) >= 8
