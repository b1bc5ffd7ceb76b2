"""Issue 8 acceptance: reloading the configuration (``herd reload root
[FILE]`` and SIGHUP).

A file with errors changes nothing: the reply is ``config-error`` with the
key path of every error (herd exits 1).  A valid one is applied as a diff:
added services are registered (auto-start ones started), removed ones are
stopped and dropped, changed running ones keep running with
``"replacement-pending": true`` until their next (re)start (``herd restart``
applies it at once), changed stopped ones take the new definition at once,
and unchanged services keep their process.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import psutil

from helpers import (
    SLEEP,
    Supervisor,
    assert_one_process_each,
    count_events,
    daemon_events,
    find_pids,
    pids_of,
    read_records,
    sleeper,
    wait_running,
    wait_until,
)

# --------------------------------------------------------------------------
# Helpers of this file


def sleep_for(sup: Supervisor, name: str, seconds: str = "1000000", **keys: Any) -> dict[str, Any]:
    """A `sleep SECONDS` service marked for `name` (SECONDS tells two definitions apart)."""
    svc = sleeper(sup.marker(name), **keys)
    svc["command"] = [SLEEP, seconds]
    return svc


def cmdline(pid: int) -> list[str]:
    return psutil.Process(pid).cmdline()


# --------------------------------------------------------------------------
# Tests


def test_reload_applies_a_diff(sup: Supervisor, tmp_path: Path) -> None:
    sup.start({"services": {
        "keep": sleep_for(sup, "keep"),
        "keep-dep": sleep_for(sup, "keep-dep", requires=["keep"]),
        "old": sleep_for(sup, "old"),
        "old-dep": sleep_for(sup, "old-dep", requires=["old"]),
        "chg": sleep_for(sup, "chg"),
        "chg-idle": sleep_for(sup, "chg-idle", **{"auto-start": False}),
    }})
    before = wait_running(sup, ["keep", "keep-dep", "old", "old-dep", "chg"])
    assert sup.rstatus("chg-idle")["state"] == "stopped"

    new_file = tmp_path / "new.toml"
    sup.write_config({"services": {
        "keep": sleep_for(sup, "keep"),
        "keep-dep": sleep_for(sup, "keep-dep", requires=["keep"]),
        "chg": sleep_for(sup, "chg", "999999"),
        "chg-idle": sleep_for(sup, "chg-idle", "999998", **{"auto-start": False}),
        "new": sleep_for(sup, "new"),
        "new-dep": sleep_for(sup, "new-dep", requires=["keep"]),
        "new-manual": sleep_for(sup, "new-manual", **{"auto-start": False}),
    }}, new_file)
    cp = sup.herd("reload", "root", str(new_file), json=True, check=True)
    result = cp.data
    assert result["config"] == str(new_file), result
    assert sorted(result["added"]) == ["new", "new-dep", "new-manual"], result
    assert sorted(result["removed"]) == ["old", "old-dep"], result
    assert sorted(result["changed"]) == ["chg", "chg-idle"], result
    assert result["pending"] == ["chg"], result

    # Removed: stopped and gone from the supervisor.
    assert find_pids(sup.marker("old")) == set() and find_pids(sup.marker("old-dep")) == set()
    status = sup.status()
    assert "old" not in status and "old-dep" not in status, sorted(status)
    cp = sup.herd("status", "old", check=2)
    assert "old" in cp.stderr
    # ...and from the service records (names come and go: they must not pile up)
    records = read_records(sup.state_dir)
    assert "old" not in records and "old-dep" not in records and "chg" in records, sorted(records)

    # Added: the auto-start ones run (once), the others are registered only.
    added = wait_running(sup, ["new", "new-dep"])
    assert_one_process_each(sup, added)
    assert sup.rstatus("new-manual")["state"] == "stopped"
    assert find_pids(sup.marker("new-manual")) == set()
    sup.herd("start", "new-manual", check=True)

    # Unchanged: the very same processes.
    same = {n: before[n] for n in ("keep", "keep-dep")}
    assert {n: sup.rstatus(n)["pid"] for n in same} == same
    assert_one_process_each(sup, same)

    # Changed and running: untouched until its next start, marked as pending.
    chg = sup.status("chg")
    assert chg["state"] == "running" and chg["pid"] == before["chg"], chg
    assert chg["replacement-pending"] is True, chg
    assert cmdline(before["chg"])[-1] == "1000000"
    # Changed while stopped: the new definition is in effect at once.
    idle = sup.status("chg-idle")
    assert idle["replacement-pending"] is False and idle["command"] == [SLEEP, "999998"], idle
    sup.herd("start", "chg-idle", check=True)
    pid_idle = sup.rstatus("chg-idle")["pid"]
    assert cmdline(pid_idle)[-1] == "999998"

    # `herd restart` switches it now.
    sup.herd("restart", "chg", check=True)
    chg = sup.status("chg")
    assert chg["state"] == "running" and chg["pid"] != before["chg"], chg
    assert chg["replacement-pending"] is False, chg
    assert chg["command"] == [SLEEP, "999999"], chg
    assert cmdline(chg["pid"])[-1] == "999999"
    assert find_pids(sup.marker("chg")) == {chg["pid"]}

    # Reloading the same file again (no FILE: the last one loaded) changes nothing.
    unchanged = pids_of(sup)
    cp = sup.herd("reload", "root", json=True, check=True)
    assert cp.data == {"config": str(new_file), "added": [], "removed": [], "changed": [], "pending": []}
    assert pids_of(sup) == unchanged
    assert count_events(sup, "configuration reloaded") == 2


def test_reload_with_errors_changes_nothing(sup: Supervisor, tmp_path: Path) -> None:
    config = {"services": {
        "a": sleep_for(sup, "a"),
        "b": sleep_for(sup, "b", requires=["a"]),
    }}
    sup.start(config)
    before = wait_running(sup, ["a", "b"])

    bad = tmp_path / "bad.toml"
    bad.write_text(
        "[services.a]\n"
        f"command = [{json.dumps(SLEEP)}, \"5\"]\n"
        "[services.a.respawn-limit]\n"
        "count = \"five\"\n"
        "seconds = 7\n"
        "[services.c]\n"
        f"command = [{json.dumps(SLEEP)}, \"5\"]\n"
        "requires = [\"nothing\"]\n"
    )
    cp = sup.herd("reload", "root", str(bad), check=1)
    text = cp.stdout + cp.stderr
    assert "services.a.respawn-limit.count" in text, text
    assert "services.c.requires" in text, text
    cp = sup.herd("reload", "root", str(bad), json=True, check=1)
    error = json.loads(cp.stdout)
    assert error["code"] == "config-error", error
    assert "services.a.respawn-limit.count" in error["message"], error

    # A TOML syntax error and a missing file are configuration errors too.
    broken = tmp_path / "broken.toml"
    broken.write_text("[services.a\ncommand = 1\n")
    cp = sup.herd("reload", "root", str(broken), json=True, check=1)
    assert json.loads(cp.stdout)["code"] == "config-error", cp.stdout
    cp = sup.herd("reload", "root", str(tmp_path / "absent.toml"), json=True, check=1)
    assert json.loads(cp.stdout)["code"] == "config-error", cp.stdout
    # A relative path is refused by the daemon (herd makes paths absolute).
    rep = sup.request({"action": "reload", "service": "root", "args": ["relative.toml"]})
    assert rep["ok"] is False and rep["error"]["code"] == "bad-arguments", rep

    # Nothing changed: the same services, the same processes.
    status = sup.status()
    assert sorted(status) == ["a", "b"]
    assert {n: status[n]["pid"] for n in status} == before
    assert all(not svc["replacement-pending"] for svc in status.values())
    assert_one_process_each(sup, before)
    assert any(ev["event"] == "reload refused" for ev in daemon_events(sup))

    # The last good file is still the one a plain reload reads.
    cp = sup.herd("reload", "root", json=True, check=True)
    assert cp.data["config"] == str(sup.config_path), cp.data
    assert cp.data["added"] == cp.data["removed"] == cp.data["changed"] == [], cp.data
    assert pids_of(sup) == before


def test_sighup_reloads_the_last_loaded_file(sup: Supervisor, tmp_path: Path) -> None:
    config: dict[str, Any] = {"services": {"a": sleep_for(sup, "a")}}
    sup.start(config)
    daemon = sup.proc
    assert daemon is not None
    pid_a = wait_running(sup, ["a"])["a"]

    # Edit the file in place, SIGHUP: b is added and started.
    config["services"]["b"] = sleep_for(sup, "b", requires=["a"])
    sup.write_config(config)
    os.kill(daemon.pid, signal.SIGHUP)
    pids = wait_running(sup, ["a", "b"])
    assert pids["a"] == pid_a
    assert_one_process_each(sup, pids)
    wait_until(lambda: count_events(sup, "configuration reloaded") == 1, 10, "the reload to be logged")

    # A broken file on SIGHUP: refused, logged, nothing changes, the daemon runs on.
    sup.config_path.write_text("[services.a\n")
    os.kill(daemon.pid, signal.SIGHUP)
    wait_until(lambda: count_events(sup, "reload refused") == 1, 10, "the refusal to be logged")
    assert daemon.poll() is None
    assert pids_of(sup) == pids
    assert_one_process_each(sup, pids)

    # After `herd reload root OTHER`, SIGHUP reads OTHER.
    other = tmp_path / "other.toml"
    other_config: dict[str, Any] = {"services": {"a": sleep_for(sup, "a"), "b": sleep_for(sup, "b", requires=["a"])}}
    sup.write_config(other_config, other)
    cp = sup.herd("reload", "root", str(other), json=True, check=True)
    assert cp.data["changed"] == [], cp.data  # b's definition is the same
    other_config["services"]["c"] = sleep_for(sup, "c")
    sup.write_config(other_config, other)
    os.kill(daemon.pid, signal.SIGHUP)
    pids = wait_running(sup, ["a", "b", "c"])
    assert pids["a"] == pid_a
    assert_one_process_each(sup, pids)
    wait_until(lambda: count_events(sup, "configuration reloaded") == 3, 10, "the reload to be logged")
    reloaded = [ev for ev in daemon_events(sup) if ev["event"] == "configuration reloaded"]
    assert reloaded[-1]["config"] == str(other), reloaded[-1]
