"""Events for dashboards (issue 17): `subscribe` from an (epoch, seq) replays
what the daemon holds or says exactly what is missed (also across a re-exec
and after a SIGKILL), heartbeats, and the example client of
docs/protocol.md, run as the page shows it."""

from __future__ import annotations

import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from helpers import REPO, Client, Supervisor, crash, reexec, restart, sleeper, wait_until


def _config(sup: Supervisor, *names: str) -> dict[str, Any]:
    return {"services": {n: sleeper(sup.marker(n), **{"auto-start": False}) for n in names}}


def _flip(sup: Supervisor, name: str, times: int) -> None:
    """`times` start/stop pairs: 4 state events each."""
    for _ in range(times):
        sup.herd("start", name, check=0)
        sup.herd("stop", name, check=0)


def _subscribe(sup: Supervisor, args: list[Any] | None = None) -> tuple[Client, dict[str, Any]]:
    c = Client(sup.status_socket, timeout=20)
    rep = c.call("subscribe", args=args)
    return c, rep


def _state_events(c: Client, n: int) -> list[dict[str, Any]]:
    got = c.events(lambda evs: len([e for e in evs if e["event"] == "state"]) >= n, 20)
    return [e for e in got if e["event"] == "state"]


def test_a_subscriber_that_comes_back_with_its_last_seq_misses_nothing(sup: Supervisor) -> None:
    sup.start(_config(sup, "a"))
    c, rep = _subscribe(sup)
    assert rep["ok"] and rep["result"]["heartbeat"] == 5.0, rep
    _flip(sup, "a", 1)
    first = _state_events(c, 4)
    last = first[-1]
    c.close()  # gone while more happens
    _flip(sup, "a", 2)
    c, rep = _subscribe(sup, [last["epoch"], last["seq"]])
    result = rep["result"]
    assert result["complete"] is True and result["missed"] == [] and result["replayed"] == 8, result
    replayed = _state_events(c, 8)
    assert [e["seq"] for e in replayed] == list(range(last["seq"] + 1, last["seq"] + 9))
    assert [(e["from"], e["to"]) for e in replayed[:4]] == [
        ("stopped", "starting"), ("starting", "running"), ("running", "stopping"), ("stopping", "stopped")]
    sup.herd("start", "a", check=0)  # and the stream goes on, live, right after
    live = _state_events(c, 2)
    assert [e["seq"] for e in live] == [last["seq"] + 9, last["seq"] + 10]
    # up to date already: nothing replayed, nothing missed
    c2, rep = _subscribe(sup, [live[-1]["epoch"], live[-1]["seq"]])
    assert rep["result"]["replayed"] == 0 and rep["result"]["complete"] is True, rep
    c.close()
    c2.close()


def test_replay_across_a_reexec_keeps_the_epoch_and_the_held_events(sup: Supervisor) -> None:
    sup.start(_config(sup, "a"))
    c, rep = _subscribe(sup)
    epoch, seq = rep["result"]["epoch"], rep["result"]["seq"]
    c.close()
    _flip(sup, "a", 2)
    reexec(sup)
    _flip(sup, "a", 1)
    c, rep = _subscribe(sup, [epoch, seq])
    result = rep["result"]
    assert result["epoch"] == epoch and result["complete"] is True and result["replayed"] == 12, result
    assert [e["seq"] for e in _state_events(c, 12)] == list(range(seq + 1, seq + 13))
    c.close()


def test_after_a_sigkill_the_new_epoch_says_exactly_what_was_missed(sup: Supervisor) -> None:
    sup.start(_config(sup, "a", "b"))
    _flip(sup, "a", 1)
    c, rep = _subscribe(sup)
    old_epoch, old_seq = rep["result"]["epoch"], rep["result"]["seq"]
    c.close()
    crash(sup)
    restart(sup)
    _flip(sup, "b", 1)
    c, rep = _subscribe(sup, [old_epoch, old_seq])
    result = rep["result"]
    assert result["epoch"] != old_epoch, result
    assert result["complete"] is False, result
    assert result["missed"] == [{"epoch": old_epoch, "first": old_seq + 1, "last": None}], result
    # everything of the new epoch is still held: replayed from its first event
    events = _state_events(c, result["replayed"])
    assert [e["seq"] for e in events] == list(range(1, result["seq"] + 1)), events
    assert {e["epoch"] for e in events} == {result["epoch"]}
    c.close()


def test_too_old_a_seq_is_told_the_exact_gap(sup: Supervisor) -> None:
    sup.start(_config(sup, "a"))
    c, rep = _subscribe(sup)
    epoch = rep["result"]["epoch"]
    c.close()
    # more than the 2048 held events: one per disable or enable
    rw = Client(sup.socket, timeout=60)
    try:
        for i in range(2100):
            assert rw.call("disable" if i % 2 == 0 else "enable", "a", timeout=60)["ok"]
    finally:
        rw.close()
    c, rep = _subscribe(sup, [epoch, 1])
    result = rep["result"]
    last = result["seq"]
    assert result["complete"] is False and result["replayed"] == 2048, result
    assert result["missed"] == [{"epoch": epoch, "first": 2, "last": last - 2048}], result
    events = _state_events(c, 2048)
    assert events[0]["seq"] == last - 2047 and events[-1]["seq"] == last
    c.close()


@pytest.mark.parametrize("args, why", [
    (["x"], "takes [] or [EPOCH, SEQ]"),
    ([1, 2], "EPOCH must be"),
    (["", 2], "EPOCH must be"),
    (["e" * 65, 2], "EPOCH must be"),
    (["EPOCH", -1], "SEQ must be"),
    (["EPOCH", True], "SEQ must be"),
    (["EPOCH", "3"], "SEQ must be"),
    (["EPOCH", 10 ** 6], "is ahead of epoch"),
    (["0123456789abcdef", 0], "is not one of this supervisor's"),
])
def test_a_client_that_lies_about_epoch_or_seq_gets_a_clear_error(sup: Supervisor, args: list[Any],
                                                                   why: str) -> None:
    sup.start(_config(sup, "a"))
    c, rep = _subscribe(sup)
    args = [rep["result"]["epoch"] if a == "EPOCH" else a for a in args]
    c.close()
    c, rep = _subscribe(sup, args)
    assert rep["ok"] is False and rep["error"]["code"] == "bad-arguments", rep
    assert why in rep["error"]["message"], rep
    # not subscribed: no event comes, and the connection still serves requests
    sup.herd("start", "a", check=0)
    assert c.call("ping")["ok"]
    assert not [o for o in c.pending if "event" in o]
    c.close()


def test_a_quiet_subscription_gets_heartbeats(sup: Supervisor) -> None:
    sup.start(_config(sup, "a"))
    c, rep = _subscribe(sup)
    t0 = time.monotonic()
    beats = c.events(lambda evs: len(evs) >= 2, 30, heartbeats=True)
    assert [e["event"] for e in beats] == ["heartbeat", "heartbeat"], beats
    assert set(beats[0]) == {"event", "time"}, beats  # neither seq nor epoch
    assert time.monotonic() - t0 >= 9, "one heartbeat per 5 s of silence"
    # a subscription handed over by a re-exec goes on beating, and numbering
    reexec(sup)
    assert [e["event"] for e in c.events(lambda evs: len(evs) >= 1, 30, heartbeats=True)] == ["heartbeat"]
    sup.herd("start", "a", check=0)
    events = _state_events(c, 2)
    assert [e["seq"] for e in events] == [rep["result"]["seq"] + 1, rep["result"]["seq"] + 2], events
    c.close()


# -- the example client of docs/protocol.md, as printed there --------------------------


def _doc_example() -> str:
    text = (REPO / "docs" / "protocol.md").read_text()
    section = text[text.index("## 11. Example"):text.index("## 12.")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "§11 holds one Python block"
    return blocks[0]


class _Lines:
    """The example's stdout, line by line, read in a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.q: queue.Queue[str] = queue.Queue()
        self.all: list[str] = []
        threading.Thread(target=self._run, args=(proc,), daemon=True).start()

    def _run(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.q.put(line.rstrip("\n"))

    def until(self, pattern: str, timeout: float = 20) -> list[str]:
        """Lines up to (and with) one matching `pattern`."""
        got: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} in {timeout} s; got {got!r}") from None
            got.append(line)
            self.all.append(line)
            if re.search(pattern, line):
                return got


@pytest.mark.slow
def test_the_documented_example_client_follows_quiet_reexec_and_crash(sup: Supervisor, tmp_path: Path) -> None:
    script = tmp_path / "follow.py"
    script.write_text(_doc_example())
    sup.start(_config(sup, "a", "b"))
    sup.herd("start", "a", check=0)
    proc = subprocess.Popen([sys.executable, str(script), str(sup.status_socket)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out = _Lines(proc)
        out.until(r"^a\s+running\s+pid=\d+")
        out.until(r"^b\s+stopped")
        # Quiet for longer than the old example's 10 s timeout (and 3 heartbeats).
        time.sleep(17)
        sup.herd("start", "b", check=0)
        lines = out.until(r"^b\s+starting -> running")
        assert not [line for line in lines if line.startswith("#")], lines  # no reconnect
        assert proc.poll() is None
        # A re-exec keeps the connection (and the epoch): nothing to say.
        reexec(sup)
        sup.herd("stop", "a", check=0)
        lines = out.until(r"^a\s+stopping -> stopped")
        assert not [line for line in lines if line.startswith("#")], lines
        # A crash: it reconnects, says what it missed, reads status again.
        crash(sup)
        out.until(r"^# connection lost")
        restart(sup)
        lines = out.until(r"^# missed .*'last': None")
        out.until(r"^b\s+running")
        sup.herd("stop", "b", check=0)
        out.until(r"^b\s+stopping -> stopped \(seq \d+")
    finally:
        proc.kill()
        proc.wait()


def test_epochs_survive_repeated_crashes_and_a_garbled_epochs_file(sup: Supervisor) -> None:
    sup.start(_config(sup, "a"))
    seen = []
    for _ in range(2):  # two SIGKILLs in a row: both earlier epochs are remembered
        c, rep = _subscribe(sup)
        seen.append(rep["result"]["epoch"])
        c.close()
        crash(sup)
        restart(sup)
    for epoch in seen:
        c, rep = _subscribe(sup, [epoch, 0])
        assert rep["ok"] and rep["result"]["missed"][0] == {"epoch": epoch, "first": 1, "last": None}, rep
        c.close()
    # A garbled file (a disk error, a hand edit) costs the memory of earlier
    # epochs, never the start: those epochs are then unknown, and said so.
    (sup.state_dir / "epochs").write_bytes(b"\x00not json[")
    crash(sup)
    restart(sup)
    c, rep = _subscribe(sup, [seen[0], 0])
    assert rep["ok"] is False and "is not one of this supervisor's" in rep["error"]["message"], rep
    c.close()
    assert sup.rstatus()["a"]["state"] == "stopped"
