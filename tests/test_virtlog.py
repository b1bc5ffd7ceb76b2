"""virtlogd (issue 4): virtlogd.conf, configuration errors, and `herd reexec virtlogd` for real.

The real-daemon tests use the private namespaces and the driver of
``test_libvirt.py`` (see its docstring): root and Debian's libvirt-daemon are
needed; not root, they skip; root with a package missing, they fail.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest
from helpers import check_config
from test_libvirt import drive, errors_of, require_real_daemons

from services import virtlog
from supervisor import Table


@pytest.fixture
def real() -> None:
    require_real_daemons()


def rendered(table: dict[str, Any]) -> tuple[list[str], list[str], virtlog.Settings]:
    errors: list[Any] = []
    s = virtlog.read_settings(Table(table, "virtlog", errors), Path("/var/lib/supervisor"))
    lines = [line for line in virtlog.render(s).splitlines() if not line.startswith("# ")]
    return lines, [str(e) for e in errors], s


def test_defaults_are_guix_six_lines_with_the_seed_outputs() -> None:
    lines, errors, s = rendered({})
    assert errors == []
    assert lines == [
        "log_level = 3",
        'log_filters = "3:remote 4:event"',
        'log_outputs = "3:stderr"',
        "max_clients = 1024",
        "max_size = 2097152",
        "max_backups = 3",
    ]
    assert s.binary == "/usr/sbin/virtlogd"
    assert s.conf_path == "/var/lib/supervisor/libvirt/virtlogd.conf"


def test_seed_example_and_other_values() -> None:
    lines, errors, _ = rendered({"max-clients": 1000, "log-level": 1, "log-filters": "1:qemu 1:+util.json",
                                 "log-outputs": "2:file:/var/log/libvirt/virtlogd.log 3:syslog:virtlogd",
                                 "max-size": 0, "max-backups": 10})
    assert errors == []
    assert lines == ["log_level = 1", 'log_filters = "1:qemu 1:+util.json"',
                     'log_outputs = "2:file:/var/log/libvirt/virtlogd.log 3:syslog:virtlogd"',
                     "max_clients = 1000", "max_size = 0", "max_backups = 10"]


@pytest.mark.parametrize(("toml", "line"), [
    ("log-level = 9", "virtlog.log-level: must be at most 4, got 9"),
    ('log-level = "3"', 'virtlog.log-level: expected an integer, got "3"'),
    ('log-filters = "0:remote"',
     'virtlog.log-filters: filter "0:remote": the level must be 1 (debug) to 4 (error), got "0"'),
    ('log-outputs = "3:journal"', ('virtlog.log-outputs: output "3:journal": unknown destination "journal" '
                                   "(known: stderr, syslog:NAME, file:PATH, journald)")),
    ('log-outputs = "3:file:"', 'virtlog.log-outputs: output "3:file:": the path is empty'),
    ("max-size = -1", "virtlog.max-size: must be at least 0, got -1"),
    ("max-backups = 4294967296", "virtlog.max-backups: must be at most 4294967295, got 4294967296"),
    ('max-clients = "1024"', 'virtlog.max-clients: expected an integer, got "1024"'),
    ('libvirt = ""', 'virtlog.libvirt: expected a non-empty string, got ""'),
    ("max-requests = 1", ("virtlog.max-requests: unknown key (did you mean 'max-clients'?) (known keys: auto-start, "
                          "health, libvirt, log-filters, log-level, log-outputs, max-backups, max-clients, max-size, "
                          "socket-activation)")),
])
def test_bad_value_is_one_line_naming_the_key(toml: str, line: str) -> None:
    assert errors_of(f"[virtlog]\n{toml}\n") == [line]


def test_check_names_the_key(tmp_path: Path) -> None:
    proc = check_config(tmp_path, "[virtlog]\nmax-size = -1\n")
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == ["virtlog.max-size: must be at least 0, got -1"]


def test_reexec_keeps_pid_and_clients(tmp_path: Path, real: None) -> None:
    """`herd reexec virtlogd` while a client holds a connection: same PID, the
    connection still works, status says running and when it re-executed."""
    config = {"virtlog": {"log-outputs": "3:stderr 2:file:/var/log/libvirt/svtest/virtlogd.log",
                          "auto-start": False}}
    r = drive(tmp_path, config, """
        S = out["steps"]
        S["not-running"] = herd("reexec", "virtlogd")
        herd_ok("start", "virtlogd")
        before = status("virtlogd")
        S["before"] = before
        conf = before["command"][2]
        st = os.stat(conf)
        S["conf"] = {"mode": st.st_mode, "uid": st.st_uid, "text": open(conf).read()}
        S["logdir"] = os.path.isdir("/var/log/libvirt/svtest")
        client = connect("/run/libvirt/virtlogd-sock")
        S["ping-before"] = ping(client)
        S["reexec"] = herd_json("reexec", "virtlogd")
        S["ping-after"] = ping(client)
        S["fresh-client"] = ping(connect("/run/libvirt/virtlogd-sock"))
        S["after"] = status("virtlogd")
        S["human"] = herd_ok("status", "virtlogd")
        S["reload"] = herd("reload", "virtlogd")
        S["after-reload"] = status("virtlogd")
        S["ping-after-reload"] = ping(client)
        S["bad-args"] = herd("reexec", "virtlogd", "now")
        S["doc"] = herd_ok("doc", "virtlogd")
        client.close()
        S["stop"] = herd_json("stop", "virtlogd")
    """)
    assert r["not-running"]["rc"] == 1 and "virtlogd is not running" in r["not-running"]["err"]
    before, after = r["before"], r["after"]
    assert before["state"] == "running" and before["ready"] == {"type": "notify"}
    assert before["command"][:2] == ["/usr/sbin/virtlogd", "-f"]
    conf = r["conf"]
    assert stat.S_IMODE(conf["mode"]) == 0o600 and conf["uid"] == 0
    assert 'log_outputs = "3:stderr 2:file:/var/log/libvirt/svtest/virtlogd.log"' in conf["text"]
    assert r["logdir"] is True

    assert r["ping-before"] is True
    result = r["reexec"]
    assert result["pid"] == before["pid"] and result["socket"] == "/run/libvirt/virtlogd-sock"
    assert r["ping-after"] is True  # the connection held across the re-exec still works
    assert r["fresh-client"] is True
    # not mistaken for a crash: same process, no exit, no respawn, same start
    assert after["state"] == "running" and after["pid"] == before["pid"]
    assert after["since"] == before["since"] and after["respawns"] == [] and after["last-exit"] is None
    assert after["details"]["re-exec-count"] == 1
    human = r["human"]
    assert "It is running since" in human
    assert "re-executed: 20" in human and "re-executed: never" not in human

    assert r["reload"]["rc"] == 0 and f"PID {before['pid']} unchanged" in r["reload"]["out"]
    again = r["after-reload"]
    assert again["pid"] == before["pid"] and again["details"]["re-exec-count"] == 2
    assert r["ping-after-reload"] is True
    assert r["bad-args"]["rc"] != 0 and "takes no arguments" in r["bad-args"]["err"]
    assert "herd reexec virtlogd" in r["doc"] and "reexec" in r["doc"]
    assert r["stop"]["stopped"] == ["virtlogd"]
