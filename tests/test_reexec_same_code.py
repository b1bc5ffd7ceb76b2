"""A re-exec into unchanged code checks the configuration in process (issue 19).

The re-exec's check of the new image starts an interpreter that imports the
whole daemon: most of a re-exec's time.  When no file of the code changed
since the image started, the new image is the running one, and the same
checks (the configuration in force, the host checks) run in the daemon
instead.  What they refuse is still refused; a changed file still gets the
full check (tests/test_lifecycle_reexec.py, test_broken_new_image_is_refused).
"""

from __future__ import annotations

import shutil

from helpers import SLEEP, Supervisor, daemon_events, sleeper, wait_until

IN_PROCESS = "re-exec: the code is unchanged; its check ran in this process"


def _in_process_checks(sup: Supervisor) -> int:
    return sum(1 for ev in daemon_events(sup) if ev.get("event") == IN_PROCESS)


def _resumed(sup: Supervisor) -> int:
    return sum(1 for ev in daemon_events(sup) if ev.get("event") == "resumed after re-exec")


def test_unchanged_code_is_checked_in_process_and_still_refused_when_the_host_lacks(sup: Supervisor) -> None:
    command = sup.tmp / "my-sleep"
    shutil.copy(SLEEP, command)
    sup.start({"services": {
        "a": sleeper(sup.marker("a")),
        "own": {**sleeper(sup.marker("own")), "command": [str(command), "1000000"]},
    }})
    wait_until(lambda: sup.status("own")["state"] == "running", 15, "own running")
    pid = sup.status("own")["pid"]

    sup.herd("reexec", "root", check=True)
    wait_until(lambda: _resumed(sup) == 1, 30, "the re-exec to resume")
    assert _in_process_checks(sup) == 1, "the unchanged code was checked in a child process"
    assert sup.status("own")["pid"] == pid

    # The host now lacks the command of the configuration in force: the
    # check (in process) refuses, as the child's --check would.
    command.unlink()
    cp = sup.herd("reexec", "root", check=1)
    assert "refused" in cp.stderr and str(command) in cp.stderr, cp.stderr
    assert _resumed(sup) == 1
    assert sup.status("own")["pid"] == pid
