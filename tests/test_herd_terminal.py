"""Issue 16: herd says what is going on -- the summary's sections, status
lines that never contradict each other, "did you mean", `doc root`, human
replies to `reload root`, and a permission error that names `socket-group`.

Black-box: the real daemon, the real herd (as another user where it matters).
"""

from __future__ import annotations

import os
import subprocess

from helpers import (
    REPO,
    Supervisor,
    check_config,
    nobody_python,
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
    assert "did you mean 'start'" in cp.stderr, cp.stderr
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
