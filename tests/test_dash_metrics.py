"""Metrics for Prometheus (issue 17): `herd metrics` for a node exporter's
textfile collector, and the exporter process serving HTTP on 127.0.0.1;
both checked by `promtool check metrics` and against `herd --json status`."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from typing import Any

import psutil
import pytest

from helpers import REPO, Supervisor, base_env, need, py_service, sleeper, wait_until

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _parse(text: str) -> Samples:
    """The samples of a Prometheus text exposition."""
    out: Samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
        assert m, f"not a sample line: {line!r}"
        labels = tuple(sorted(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m[2] or "")))
        out[(m[1], labels)] = float(m[3])
    return out


def _promtool(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        need("promtool (Debian package prometheus)")
    assert promtool is not None
    assert text.count("\n") > 20, text  # promtool accepts an empty input
    cp = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stdout + cp.stderr


def _services(sup: Supervisor) -> dict[str, Any]:
    sup.start({"services": {
        "a": sleeper(sup.marker("a")),
        "b": sleeper(sup.marker("b"), **{"auto-start": False}),
        "code": py_service("import sys; sys.exit(3)", sup.marker("code"), respawn=False),
        "killed": sleeper(sup.marker("killed"), respawn=False),
    }})
    sup.herd("disable", "b", check=0)
    killed = wait_until(lambda: sup.rstatus()["killed"]["pid"], 20, "killed running")
    os.kill(killed, signal.SIGKILL)
    wait_until(lambda: sup.rstatus()["killed"]["last-exit"], 20, "killed's exit")
    wait_until(lambda: sup.rstatus()["code"]["last-exit"], 20, "code's exit")
    return sup.status()


def _check_against_status(samples: Samples, status: dict[str, Any], containment: str) -> None:
    def value(name: str, **labels: str) -> float | None:
        return samples.get((name, tuple(sorted(labels.items()))))

    for name, svc in status.items():
        for state in ("stopped", "starting", "running", "stopping"):
            assert value("supervisor_service_state", service=name, state=state) == (svc["state"] == state), name
        assert value("supervisor_service_enabled", service=name) == svc["enabled"], name
        assert value("supervisor_service_state_since_seconds", service=name) == pytest.approx(svc["since"], abs=1e-3)
        in_state = value("supervisor_service_time_in_state_seconds", service=name)
        assert in_state is not None and 0 <= in_state <= time.time() - svc["since"] + 1, (name, in_state)
        assert value("supervisor_service_recent_respawns", service=name) == len(svc["respawns"])
        assert value("supervisor_service_recent_startup_failures", service=name) == len(svc["startup-failures"])
        last = svc["last-exit"]
        assert value("supervisor_service_last_exit_code", service=name) == (last and last["code"]), name
        if last and last["signal"]:
            assert value("supervisor_service_last_exit_signal", service=name, signal=last["signal"]) == 1
        if containment == "cgroup":
            running = svc["state"] == "running"
            assert value("supervisor_service_processes", service=name) == (1 if running else 0), name
            memory = value("supervisor_service_memory_bytes", service=name)
            assert memory is not None and (memory > 0) == running, (name, memory)
            if running:
                assert value("supervisor_service_cpu_seconds_total", service=name) is not None, name
    assert status["b"]["enabled"] is False and status["code"]["last-exit"]["code"] == 3
    assert status["killed"]["last-exit"]["signal"] == "SIGKILL"


def test_herd_metrics_is_valid_and_matches_status(sup: Supervisor) -> None:
    status = _services(sup)
    cp = sup.herd("metrics", check=0)
    _promtool(cp.stdout)
    samples = _parse(cp.stdout)
    _check_against_status(samples, status, sup.containment)
    assert samples[("supervisor_info", (("containment", "cgroup" if sup.containment == "cgroup"
                                         else "process-tree"), ("version", "0.1.0")))] == 1
    # the status socket serves it too (a monitoring user's textfile job)
    ro = subprocess.run([sys.executable, "-m", "herd", "-s", str(sup.status_socket), "metrics"],
                        env=base_env(), capture_output=True, text=True, timeout=60)
    assert ro.returncode == 0 and "supervisor_service_state{" in ro.stdout, ro.stderr


def test_herd_metrics_without_a_daemon_exits_3(sup: Supervisor) -> None:
    cp = subprocess.run([sys.executable, "-m", "herd", "-s", str(sup.socket), "metrics"], env=base_env(),
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 3 and cp.stdout == "", cp


class _Exporter:
    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "supervisor_exporter", *args], env=base_env(),
                                     stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        m = re.search(r"http://([\d.]+):(\d+)/metrics", line)
        assert m, line + self.proc.stderr.read()
        self.url = f"http://{m[1]}:{m[2]}/metrics"

    def scrape(self) -> str:
        with urllib.request.urlopen(self.url, timeout=30) as resp:
            assert resp.status == 200
            return resp.read().decode()

    def stop(self) -> None:
        self.proc.terminate()
        assert self.proc.wait(20) == 0


def test_the_exporter_serves_valid_metrics_that_match_status(sup: Supervisor) -> None:
    status = _services(sup)
    exporter = _Exporter("--listen", "127.0.0.1:0", "-s", str(sup.status_socket))
    try:
        text = exporter.scrape()
        _promtool(text)
        samples = _parse(text)
        assert samples[("supervisor_up", ())] == 1
        _check_against_status(samples, status, sup.containment)
        sup.stop()  # the supervisor is gone: the scrape still answers, up is 0
        samples = _parse(exporter.scrape())
        assert samples == {("supervisor_up", ()): 0.0}, samples
    finally:
        exporter.stop()


def test_the_exporter_listens_on_localhost_by_default(sup: Supervisor) -> None:
    sup.start({"services": {"a": sleeper(sup.marker("a"))}})
    proc = subprocess.Popen([sys.executable, "-m", "supervisor_exporter", "-s", str(sup.status_socket)],
                            env=base_env(), stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "http://127.0.0.1:9816/metrics" in line, line + proc.stderr.read()
        listening = [c.laddr for c in psutil.Process(proc.pid).net_connections("inet")
                     if c.status == psutil.CONN_LISTEN]
        assert listening == [("127.0.0.1", 9816)], listening
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.mark.parametrize("listen", ["9816", "localhost:http", ":9816", "[::1]:99999"])
def test_the_exporter_refuses_a_bad_address(listen: str) -> None:
    cp = subprocess.run([sys.executable, "-m", "supervisor_exporter", "--listen", listen], env=base_env(),
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 2 and f"got {listen!r}" in cp.stderr, cp.stderr


def test_neither_the_exporter_nor_herd_status_imports_what_it_must_not() -> None:
    code = ("import sys, supervisor_exporter.__main__, supervisor_exporter._collector; "
            "print(json.dumps(sorted(m for m in sys.modules if m == 'trio' or m.startswith('supervisor.'))))")
    cp = subprocess.run([sys.executable, "-c", "import json; " + code], env=base_env(), capture_output=True,
                        text=True, timeout=60, cwd=REPO)
    assert cp.returncode == 0 and json.loads(cp.stdout) == [], cp.stdout + cp.stderr
    cp = subprocess.run([sys.executable, "-X", "importtime", "-m", "herd", "-s", "/nonexistent", "status"],
                        env=base_env(), capture_output=True, text=True, timeout=60)
    assert "herd._metrics" not in cp.stderr and "prometheus_client" not in cp.stderr
