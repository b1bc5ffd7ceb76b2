"""Issue 19: the service records are a journal (one line appended per change)
and a snapshot (rewritten now and then, and at each clean shutdown), in
``STATE_DIR/services/`` (docs/configuration.md, `state-dir`).  A supervisor
SIGKILLed at any moment -- mid-append, mid-compaction -- leaves the next one
every service's process and every operator's intent; a torn last line is
ignored; records written by an older version (``NAME.toml``) are read and
folded into the snapshot."""

from __future__ import annotations

import json
import os
import random
import threading
import time
from pathlib import Path

import tomli_w

from helpers import (
    Supervisor,
    assert_no_process,
    assert_one_process_each,
    crash,
    find_pids,
    read_record,
    read_records,
    reexec,
    restart,
    sleeper,
    wait_running,
    wait_until,
)

#: Crashes 50 ms after each start, respawned at once: a record change every few ms.
CHURN = ["/bin/sh", "-c", "sleep 0.05; exit 3"]


def churner() -> dict[str, object]:
    return {"command": CHURN, "respawn-delay": 0, "respawn-limit": {"count": 1000000, "seconds": 1}}


class Compactions:
    """Counts the snapshot's replacements (a new inode each), sampled every 5 ms."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "services" / "snapshot"
        self.seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            try:
                self.seen.add(os.stat(self.path).st_ino)
            except FileNotFoundError:
                pass

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return len(self.seen)


def test_sigkill_at_any_moment_of_the_journal_loses_nothing(sup: Supervisor) -> None:
    """Services that restart in a loop write records all the time (the
    journal is compacted every 256 KiB or so); the supervisor is SIGKILLed
    six times at random moments.  Each new one adopts every running
    service (same PID, one process each) and keeps each operator's intent."""
    names = [f"up{i}" for i in range(6)]
    config = {"services": {
        **{n: sleeper(sup.marker(n)) for n in names},
        "held": sleeper(sup.marker("held")),
        "off": sleeper(sup.marker("off")),
        **{f"churn{i}": churner() for i in range(4)},
    }}
    sup.start(config)
    pids = wait_running(sup, names + ["held", "off"])
    sup.herd("stop", "held", check=True)
    sup.herd("disable", "off", check=True)
    sup.herd("stop", "off", check=True)
    del pids["held"], pids["off"]
    rng = random.Random(19)
    compactions = Compactions(sup.state_dir)
    try:
        for round_ in range(6):
            time.sleep(rng.uniform(0.3, 2.0))  # the churners write meanwhile
            crash(sup)
            restart(sup)
            assert wait_running(sup, names) == pids, f"round {round_}: a running service was not adopted"
            assert_one_process_each(sup, pids)
            status = sup.rstatus()
            assert status["held"]["state"] == "stopped", (round_, status["held"])
            assert status["off"]["state"] == "stopped" and status["off"]["enabled"] is False, (round_, status["off"])
            assert_no_process(sup, "held", "off")
    finally:
        seen = compactions.stop()
    assert seen >= 2, f"the journal was compacted {seen - 1} times: the test did not cover compaction"


def test_a_torn_last_line_is_ignored_and_cut_off(sup: Supervisor) -> None:
    """A write cut short by a SIGKILL leaves a line without its newline: it
    is ignored, and the next supervisor cuts it off before it appends (else
    its first record would be glued to it, and lost)."""
    sup.start({"services": {"svc": sleeper(sup.marker("svc")), "other": sleeper(sup.marker("other"))}})
    pids = wait_running(sup, ["svc", "other"])
    sup.herd("stop", "svc", check=True)
    sup.herd("stop", "other", check=True)
    crash(sup)
    with open(sup.state_dir / "services" / "journal", "ab") as f:
        f.write(b'{"name":"svc","state":"running","intent":"up","enabled":true,"pid":%d' % pids["other"])
    restart(sup)
    wait_until(lambda: sup.rstatus("other")["state"] == "stopped", 10, "the new supervisor")
    assert sup.rstatus("svc")["state"] == "stopped", "the torn line was read"
    sup.herd("disable", "svc", check=True)  # the first record after the torn line
    wait_until(lambda: (read_record(sup.state_dir, "svc") or {}).get("enabled") is False, 10,
               "the disable in the journal")
    crash(sup)
    restart(sup)
    wait_until(lambda: sup.rstatus("other")["state"] == "stopped", 10, "the new supervisor")
    assert sup.rstatus("svc")["enabled"] is False, "the record after the torn line was lost"
    assert_no_process(sup, "svc", "other")


def test_records_of_an_older_version_are_read_and_folded_into_the_snapshot(sup: Supervisor) -> None:
    """``services/NAME.toml`` (one file per service, before the journal):
    the operator's intent in it holds; at the clean shutdown the snapshot
    takes it over and the file is removed."""
    services = sup.state_dir / "services"
    services.mkdir(parents=True, mode=0o700)
    (services / "held.toml").write_text(tomli_w.dumps({"name": "held", "state": "stopped", "intent": "down"}))
    sup.start({"services": {"held": sleeper(sup.marker("held")), "plain": sleeper(sup.marker("plain"))}})
    wait_running(sup, ["plain"])
    assert sup.rstatus("held")["state"] == "stopped"
    assert_no_process(sup, "held")
    assert sup.stop() == 0
    assert not (services / "held.toml").exists()
    assert read_records(sup.state_dir)["held"]["intent"] == "down"
    assert (services / "journal").stat().st_size == 0, "a clean shutdown leaves the journal empty"
    restart(sup)
    wait_running(sup, ["plain"])
    assert sup.rstatus("held")["state"] == "stopped"
    assert_no_process(sup, "held")


def test_a_crash_right_after_a_compaction_or_mid_snapshot_loses_nothing(sup: Supervisor) -> None:
    """The states a SIGKILL can leave mid-compaction: a snapshot's temporary
    file not yet renamed (ignored), and a journal whose lines the snapshot
    already holds (replayed over it: the same records)."""
    sup.start({"services": {"svc": sleeper(sup.marker("svc")), "held": sleeper(sup.marker("held"))}})
    pids = wait_running(sup, ["svc", "held"])
    sup.herd("stop", "held", check=True)
    crash(sup)
    services = sup.state_dir / "services"
    journal = (services / "journal").read_bytes()
    snapshot = b"".join(sorted(
        json.dumps(rec).encode() + b"\n" for rec in read_records(sup.state_dir).values()))
    (services / "snapshot").write_bytes(snapshot)  # the rename done, the journal not yet emptied
    assert (services / "journal").read_bytes() == journal
    (services / ".snapshot.0badf00d.tmp").write_bytes(snapshot[: len(snapshot) // 2])  # a write cut short
    restart(sup)
    assert wait_running(sup, ["svc"]) == {"svc": pids["svc"]}
    assert sup.rstatus("held")["state"] == "stopped"
    assert_no_process(sup, "held")
    assert find_pids(sup.marker("svc")) == {pids["svc"]}


def test_records_of_unchanged_services_survive_a_compaction_after_a_reexec(sup: Supervisor) -> None:
    """A re-exec's new image keeps every record for its next compaction, not
    only those that changed since: a crash after two re-execs (the second
    compacts) still finds every running service's record."""
    names = ["a", "b", "c"]
    sup.start({"services": {n: sleeper(sup.marker(n)) for n in names}})
    pids = wait_running(sup, names)
    reexec(sup)
    sup.herd("stop", "c", check=True)
    reexec(sup)  # flushes and compacts: the snapshot must hold a and b too
    crash(sup)
    restart(sup)
    assert wait_running(sup, ["a", "b"]) == {"a": pids["a"], "b": pids["b"]}
    assert sup.status("c")["state"] == "stopped"
