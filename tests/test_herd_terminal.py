"""Issue 16: herd says what is going on -- the summary's sections, status
lines that never contradict each other, "did you mean", `doc root`, human
replies to `reload root`, and a permission error that names `socket-group`.

Black-box: the real daemon, the real herd (as another user where it matters).
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys

from helpers import (
    REPO,
    Deadline,
    Supervisor,
    base_env,
    check_config,
    nobody_python,
    py_service,
    sleeper,
    wait_until,
)


def test_summary_has_disabled_section_and_consistent_lines(sup: Supervisor) -> None:
    sup.start({"services": {
        "web": sleeper(sup.marker("web")),
        "crashy": {"command": ["/bin/false"], "respawn-limit": {"count": 2, "seconds": 30}},
        "once": {"command": ["/bin/true"], "one-shot": True},
    }})
    wait_until(lambda: sup.status("crashy")["enabled"] is False, 20, "crashy disabled by its respawn limit")
    summary = sup.herd("status", check=True).stdout
    sections = summary.split("Disabled:\n", 1)
    assert len(sections) == 2, summary
    assert sections[1].startswith(" x crashy"), summary
    assert " - crashy" not in summary, summary  # not also under Stopped:
    assert " * once" in summary and " + web" in summary, summary
    crashy = sup.herd("status", "crashy", check=True).stdout
    assert "It is disabled." in crashy and "Will be respawned." not in crashy, crashy
    once = sup.herd("status", "once", check=True).stdout
    assert "Will be respawned." not in once and "one-shot" in once, once


def test_timer_has_no_running_value(sup: Supervisor) -> None:
    sup.start({"services": {"tick": {"command": ["/bin/true"], "schedule": "0 0 1 1 *"}}})
    text = sup.herd("status", "tick", check=True).stdout
    assert "It is a timer" in text and "Running value" not in text, text
    doc = sup.herd("doc", "tick", check=True).stdout
    assert "trigger" in doc, doc
    assert "trigger:" in sup.herd("doc", "tick", "action", "trigger", check=True).stdout


def test_did_you_mean(sup: Supervisor) -> None:
    sup.start({"services": {"web": sleeper(sup.marker("web"))}})
    cp = sup.herd("stauts", check=2)
    assert "did you mean 'status'" in cp.stderr, cp.stderr
    cp = sup.herd("status", "wbe", check=2)
    assert "did you mean 'web'" in cp.stderr, cp.stderr
    cp = sup.herd("strat", "web", check=2)
    assert re.search(r"did you mean [^?]*'start'", cp.stderr), cp.stderr  # (among other near names)
    cp = check_config(sup.tmp, '[services.a]\ncommand = ["/bin/true"]\nrespwan = false\n')
    assert cp.returncode == 1
    assert "services.a.respwan: unknown key (did you mean 'respawn'" in cp.stdout + cp.stderr, cp


def test_root_answers_doc_and_status(sup: Supervisor) -> None:
    sup.start({"services": {"web": sleeper(sup.marker("web"))}})
    doc = sup.herd("doc", "root", check=True).stdout
    assert "reload" in doc and "reexec" in doc, doc
    assert "reload:" in sup.herd("doc", "root", "action", "reload", check=True).stdout
    assert " + web" in sup.herd("status", "root", check=True).stdout


def test_reload_root_answers_in_human_lines(sup: Supervisor) -> None:
    sup.start({"services": {"web": sleeper(sup.marker("web"))}})
    cp = sup.herd("reload", "root", check=True)
    assert cp.stdout.strip() == f"Reloaded {sup.config_path}: nothing changed.", cp.stdout
    assert "{" not in cp.stdout


def test_permission_error_names_socket_group(sup: Supervisor) -> None:
    python = nobody_python()
    sup.start({"services": {}})
    os.chmod(sup.sockdir, 0o711)  # nobody may reach the socket, not use it
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "NO_COLOR": "1"}
    cp = subprocess.run([python, "-m", "herd", "-s", str(sup.socket), "status"], env=env, user="nobody",
                        capture_output=True, text=True, timeout=60, cwd="/", stdin=subprocess.DEVNULL)
    assert cp.returncode == 3, cp
    assert "socket-group" in cp.stderr, cp.stderr


# --------------------------------------------------------------------------
# On a terminal: the progress line, and Ctrl-C


class PtyHerd:
    """``herd ARGS`` on a pseudo-terminal; `read_until` collects its output."""

    def __init__(self, sup: Supervisor, *args: str) -> None:
        self.out = b""
        pid, fd = pty.fork()
        if pid == 0:  # the child: herd, on the terminal
            try:
                env = base_env()
                os.execve(sys.executable, [sys.executable, "-m", "herd", "-s", str(sup.socket), *args], env)
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd

    def _pump(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            return False
        self.out += data
        return bool(data)

    def read_until(self, text: str, timeout: float = 30) -> str:
        deadline = Deadline(timeout)
        while text.encode() not in self.out:
            assert not deadline.expired(), f"no {text!r} on the terminal; got {self.out!r}"
            if not self._pump(min(0.1, deadline.remaining())):
                raise AssertionError(f"herd ended before {text!r}; got {self.out!r}")
        return self.out.decode(errors="replace")

    def interrupt(self) -> None:
        os.write(self.fd, b"\x03")  # Ctrl-C: SIGINT to the terminal's foreground group

    def wait(self, timeout: float = 30) -> int:
        deadline = Deadline(timeout)
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                while self._pump(0.05):
                    pass
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            assert not deadline.expired(), f"herd did not exit; got {self.out!r}"
            self._pump(0.05)


def _never_ready(sup: Supervisor) -> dict[str, object]:
    return sleeper(sup.marker("slow"), ready={"type": "notify"}, **{"start-timeout": 120, "auto-start": False})


def test_progress_and_ctrl_c_on_a_terminal(sup: Supervisor) -> None:
    sup.start({"services": {"slow": _never_ready(sup)}})
    herd = PtyHerd(sup, "start", "slow")
    text = herd.read_until(" s of 120)")
    assert "slow: waiting for READY=1 (" in text, text
    herd.interrupt()
    assert herd.wait() == 130
    text = herd.out.decode(errors="replace")
    assert "interrupted; the daemon goes on starting slow (herd stop slow to cancel)" in text, text
    assert sup.status("slow")["state"] == "starting"  # the daemon did go on
    sup.herd("stop", "slow", check=True)


def test_plain_output_unchanged_off_a_terminal(sup: Supervisor) -> None:
    # READY=1 after 1.5 s: long enough for a progress poll, had there been one
    code = ("import os, socket, time; time.sleep(1.5); "
            "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); "
            "s.sendto(b'READY=1', os.environ['NOTIFY_SOCKET']); time.sleep(1e6)")
    sup.start({"services": {"late": py_service(code, sup.marker("late"), ready={"type": "notify"},
                                               **{"auto-start": False})}})
    cp = sup.herd("start", "late", check=True)
    assert cp.stdout == "Service late has been started.\n"
    assert cp.stderr == ""
    # Ctrl-C off a terminal: the same words on stderr, exit 130, nothing on stdout
    sup.write_config({"services": {"slow": _never_ready(sup)}})
    sup.herd("reload", "root", check=True)
    proc = subprocess.Popen([sys.executable, "-m", "herd", "-s", str(sup.socket), "start", "slow"],
                            env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: sup.status("slow")["state"] == "starting", 30, "slow starting")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert out == ""
    assert err == "herd: interrupted; the daemon goes on starting slow (herd stop slow to cancel)\n"
