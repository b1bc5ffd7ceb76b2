"""A log directory that appears late (issue 20: early boot, before /var is mounted).

What a service writes while its log file cannot be opened is kept and
written to the file, first and in order, once the file can be opened.
"""

from __future__ import annotations

from pathlib import Path

from helpers import Supervisor, py_service, wait_until

#: argv: MARKER FLAG.  Prints "early 0..2"; once FLAG exists, "late", and
#: "later" 2 s after (the file is tried again at a line, at most once a second).
EARLY_LATE = r'''
import os, sys, time
for i in range(3):
    os.write(1, b"early %d\n" % i)  # whole lines, one write each
    os.write(2, b"warn %d\n" % i)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.05)
os.write(1, b"late\n")
time.sleep(2)
os.write(1, b"later\n")
time.sleep(1e6)
'''


def _texts(path: Path) -> list[str]:
    return [line.split(" ", 2)[1] + " " + line.split(" ", 2)[2]
            for line in path.read_text().splitlines() if " " in line]


def test_output_before_the_log_directory_exists_reaches_the_file(sup: Supervisor, tmp_path: Path) -> None:
    blocker = tmp_path / "var"
    blocker.write_text("not a directory yet\n")  # as an unmounted /var: the directory cannot be made
    log_path = blocker / "log" / "w.log"
    flag = tmp_path / "flag"
    sup.start({"services": {"w": py_service(EARLY_LATE, sup.marker("w"), str(flag), **{"log-file": str(log_path)})}})
    wait_until(lambda: "log file not writable" in sup.stderr_path.read_text(errors="replace"), 20,
               "the supervisor to report the unwritable log")
    wait_until(lambda: [e for e in sup.herd("log", "w", json=True, check=True).data["lines"]
                        if e["line"] == "warn 2"], 20, "the early lines in memory")
    blocker.unlink()  # "/var is mounted"
    flag.touch()
    wait_until(lambda: log_path.exists() and "stdout later" in _texts(log_path), 20, "the lines in the file")
    texts = _texts(log_path)
    stdout = [t for t in texts if t.startswith("stdout ")]
    stderr = [t for t in texts if t.startswith("stderr ")]
    assert stdout == ["stdout early 0", "stdout early 1", "stdout early 2", "stdout late",
                      "stdout later"], texts
    assert stderr == ["stderr warn 0", "stderr warn 1", "stderr warn 2"], texts
    assert texts.index("stdout early 2") < texts.index("stdout late")
