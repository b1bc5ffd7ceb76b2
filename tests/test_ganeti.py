"""Ganeti (issue 7): configuration, command lines, files, daemon-util, timers, real daemons.

The real-daemon tests run the supervisor with Debian's Ganeti inside new
mount, network, UTS and PID namespaces (``unshare``, as root): tmpfs over
``/var/lib/ganeti``, ``/var/run/ganeti`` and ``/var/log/ganeti`` (so nothing
of the machine's own Ganeti is touched; ``/etc/ganeti`` stays, it holds
Debian's version links, and the generated files go to a directory of the
test's own), only the loopback interface, and everything killed with the
namespace.  The namespace driver (``namespaces.py``) runs inside as the
namespace's PID 1: it sets the namespace up (`INSIDE`), starts the supervisor,
runs the steps the test asks for and reports the results in JSON.

``tests/test_ganeti_cluster.py`` uses the same driver for a one-node cluster.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import PY, Supervisor, check_config, find_pids, wait_until

import namespaces

from services import _ganeti_daemon_util as daemon_util
from services import _ganeti_files as gfiles
from services import ganeti
from supervisor import Table
from supervisor.config import parse_config
from supervisor.schema import ConfigErrors

ROOT = Path(__file__).resolve().parents[1]
HINT = "/var/lib/ganeti/guix_wconfd_force_node_hint"

# -- the documented command lines (guix-reference.md §5.2, §5.3), plus -f after the program --------

#: Every field set to something other than its default.
FULL = {
    "ganeti": "/opt/g0",
    "noded": {"ganeti": "/opt/g1", "port": 11811, "address": "192.0.2.1", "interface": "eth1", "max-clients": 7,
              "ssl": True, "ssl-key": "/k/noded.key", "ssl-cert": "/k/noded.crt", "debug": True},
    "confd": {"ganeti": "/opt/g2", "port": 11814, "address": "192.0.2.2", "debug": True},
    "wconfd": {"ganeti": "/opt/g3", "no-voting": True, "debug": True},
    "luxid": {"ganeti": "/opt/g4", "no-voting": True, "debug": True},
    "rapi": {"ganeti": "/opt/g5", "require-authentication": True, "port": 15080, "address": "192.0.2.5",
             "interface": "eth5", "max-clients": 9, "ssl": False, "ssl-key": "/k/rapi.key",
             "ssl-cert": "/k/rapi.crt", "debug": True},
    "kvmd": {"ganeti": "/opt/g6", "debug": True},
    "mond": {"ganeti": "/opt/g7", "port": 11815, "address": "192.0.2.7", "debug": True},
    "metad": {"ganeti": "/opt/g8", "port": 18080, "address": "192.0.2.8", "debug": True},
    "watcher": {"ganeti": "/opt/g9", "schedule": "*/7 * * * *", "rapi-ip": "192.0.2.9", "job-age": 3600,
                "verify-disks": False, "debug": True},
    "cleaner": {"ganeti": "/opt/g10", "master-schedule": "1 2 * * *", "node-schedule": "3 4 * * *"},
}

FULL_ARGV = {
    "ganeti-noded": ["/opt/g1/sbin/ganeti-noded", "-f", "--port=11811", "--bind=192.0.2.1", "--interface=eth1",
                     "--max-clients=7", "--ssl-key=/k/noded.key", "--ssl-cert=/k/noded.crt", "--debug"],
    "ganeti-confd": ["/opt/g2/sbin/ganeti-confd", "-f", "--port=11814", "--bind=192.0.2.2", "--debug"],
    "ganeti-wconfd": ["/opt/g3/sbin/ganeti-wconfd", "-f", "--no-voting", "--yes-do-it", "--debug"],
    "ganeti-luxid": ["/opt/g4/sbin/ganeti-luxid", "-f", "--no-voting", "--yes-do-it", "--debug"],
    "ganeti-rapi": ["/opt/g5/sbin/ganeti-rapi", "-f", "--require-authentication", "--port=15080",
                    "--bind=192.0.2.5", "--interface=eth5", "--max-clients=9", "--no-ssl", "--debug"],
    "ganeti-kvmd": ["/opt/g6/sbin/ganeti-kvmd", "-f", "--debug"],
    "ganeti-mond": ["/opt/g7/sbin/ganeti-mond", "-f", "--port=11815", "--bind=192.0.2.7", "--debug"],
    "ganeti-metad": ["/opt/g8/sbin/ganeti-metad", "-f", "--port=18080", "--bind=192.0.2.8", "--debug"],
    "ganeti-watcher": ["/opt/g9/sbin/ganeti-watcher", "--rapi-ip=192.0.2.9", "--job-age=3600",
                       "--no-verify-disks", "--debug"],
    "ganeti-master-cleaner": ["/opt/g10/sbin/ganeti-cleaner", "master"],
    "ganeti-node-cleaner": ["/opt/g10/sbin/ganeti-cleaner", "node"],
}

DEFAULT_ARGV = {
    "ganeti-noded": ["/usr/sbin/ganeti-noded", "-f", "--port=1811", "--bind=0.0.0.0", "--max-clients=20",
                     "--ssl-key=/var/lib/ganeti/server.pem", "--ssl-cert=/var/lib/ganeti/server.pem"],
    "ganeti-confd": ["/usr/sbin/ganeti-confd", "-f", "--port=1814", "--bind=0.0.0.0"],
    "ganeti-wconfd": ["/usr/sbin/ganeti-wconfd", "-f"],
    "ganeti-luxid": ["/usr/sbin/ganeti-luxid", "-f"],
    "ganeti-rapi": ["/usr/sbin/ganeti-rapi", "-f", "--port=5080", "--bind=0.0.0.0", "--max-clients=20",
                    "--ssl-key=/var/lib/ganeti/rapi.pem", "--ssl-cert=/var/lib/ganeti/rapi.pem"],  # deviation
    "ganeti-kvmd": ["/usr/sbin/ganeti-kvmd", "-f"],
    "ganeti-mond": ["/usr/sbin/ganeti-mond", "-f", "--port=1815", "--bind=0.0.0.0"],
    "ganeti-metad": ["/usr/sbin/ganeti-metad", "-f", "--port=80"],
    "ganeti-watcher": ["/usr/sbin/ganeti-watcher", "--job-age=21600"],
    "ganeti-master-cleaner": ["/usr/sbin/ganeti-cleaner", "master"],
    "ganeti-node-cleaner": ["/usr/sbin/ganeti-cleaner", "node"],
}

#: Debian's daemon-util users and groups; the timers as in Debian's /etc/cron.d/ganeti.
USERS = {"ganeti-noded": ("root", "root"), "ganeti-confd": ("gnt-confd", "gnt-confd"),
         "ganeti-wconfd": ("gnt-masterd", "gnt-confd"), "ganeti-luxid": ("gnt-masterd", "gnt-luxid"),
         "ganeti-rapi": ("gnt-rapi", "gnt-rapi"), "ganeti-kvmd": ("root", "gnt-daemons"),
         "ganeti-mond": ("root", "root"), "ganeti-metad": ("gnt-metad", "gnt-metad"),
         "ganeti-watcher": ("root", None), "ganeti-master-cleaner": ("gnt-masterd", None),
         "ganeti-node-cleaner": ("root", None)}


def specs(table: dict[str, Any]) -> dict[str, Any]:
    return {s.name: s for s in parse_config({"ganeti": table}).services}


def daemon_argv(spec: Any) -> list[str]:
    """The daemon's argv (wconfd's command is its wrapper: sh -c SCRIPT NAME HINT ARGV...)."""
    command = list(spec.command)
    if spec.name == "ganeti-wconfd":
        assert command[:2] == ["/bin/sh", "-c"] and command[3:5] == ["ganeti-wconfd-wrapper", HINT], command
        return command[5:]
    return command


def test_default_services_argv_users_and_schedules() -> None:
    got = specs({})
    assert list(got) == list(DEFAULT_ARGV)  # Guix's order
    for name, argv in DEFAULT_ARGV.items():
        assert daemon_argv(got[name]) == argv, name
        assert (got[name].user, got[name].group) == USERS[name], name
    assert {n: s.schedule for n, s in got.items() if s.schedule} == {
        "ganeti-watcher": "*/5 * * * *", "ganeti-master-cleaner": "45 1 * * *", "ganeti-node-cleaner": "45 2 * * *"}
    assert [n for n, s in got.items() if not s.auto_start] == ["ganeti-metad"]
    assert all(s.respawn and not s.requires for s in got.values())
    ready = {n: s.ready.to_json() for n, s in got.items() if not s.schedule}
    assert ready == {
        "ganeti-noded": {"type": "tcp", "address": "127.0.0.1:1811"},
        "ganeti-confd": {"type": "pid-file", "path": "/var/run/ganeti/ganeti-confd.pid"},
        "ganeti-wconfd": {"type": "unix", "path": "/var/run/ganeti/socket/ganeti-wconfd"},
        "ganeti-luxid": {"type": "unix", "path": "/var/run/ganeti/socket/ganeti-query"},
        "ganeti-rapi": {"type": "tcp", "address": "127.0.0.1:5080"},
        "ganeti-kvmd": {"type": "started"},
        "ganeti-mond": {"type": "tcp", "address": "127.0.0.1:1815"},
        "ganeti-metad": {"type": "unix", "path": "/var/run/ganeti/socket/ganeti-metad"},
    }
    for name in ("ganeti-noded", "ganeti-wconfd", "ganeti-luxid", "ganeti-rapi", "ganeti-mond"):
        assert dict(got[name].stay_down_exits).keys() == {11, 12}, name
    assert dict(got["ganeti-kvmd"].stay_down_exits).keys() == {0, 11, 12}
    assert "not master" in dict(got["ganeti-wconfd"].stay_down_exits)[11]
    assert [a.name for a in got["ganeti-wconfd"].actions] == ["force-start"]
    # Guix replaces the environment of six daemons; every service knows the supervisor's socket
    assert {n for n, s in got.items() if s.clear_environment} == {
        "ganeti-noded", "ganeti-confd", "ganeti-wconfd", "ganeti-luxid", "ganeti-rapi", "ganeti-kvmd"}
    assert all("SUPERVISOR_SOCKET" in dict(s.environment) for s in got.values())


def test_every_field_set_gives_the_documented_argv() -> None:
    got = specs(FULL)
    for name, argv in FULL_ARGV.items():
        assert daemon_argv(got[name]) == argv, name
    assert (got["ganeti-watcher"].schedule, got["ganeti-master-cleaner"].schedule,
            got["ganeti-node-cleaner"].schedule) == ("*/7 * * * *", "1 2 * * *", "3 4 * * *")
    # readiness: with an interface the address is unknown here, so the PID file
    assert got["ganeti-noded"].ready.to_json() == {"type": "pid-file", "path": "/var/run/ganeti/ganeti-noded.pid"}
    assert got["ganeti-metad"].ready.to_json() == {"type": "tcp", "address": "192.0.2.8:18080"}
    assert got["ganeti-mond"].ready.to_json() == {"type": "tcp", "address": "192.0.2.7:11815"}
    assert "/opt/g3/lib/ganeti/ensure-dirs" == ganeti.Ganeti(
        ganeti.read_settings(Table(FULL, "ganeti", []))).ensure_dirs("wconfd")
    # IPv6 wildcard and literal
    v6 = specs({"noded": {"address": "::"}, "mond": {"address": "2001:db8::1"}})
    assert v6["ganeti-noded"].ready.address == "[::1]:1811"
    assert v6["ganeti-mond"].ready.address == "[2001:db8::1]:1815"


@pytest.mark.parametrize("hint", [False, True])
def test_wconfd_wrapper_execs_the_daemon_with_or_without_force(tmp_path: Path, hint: bool) -> None:
    """The wrapper as generated, run for real with a stand-in wconfd that prints its argv."""
    prefix = tmp_path / "g"
    (prefix / "sbin").mkdir(parents=True)
    fake = prefix / "sbin" / "ganeti-wconfd"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$0" "$@"\n')
    fake.chmod(0o755)
    hint_file = tmp_path / "hint"
    if hint:
        hint_file.touch()
    s = ganeti.read_settings(Table(
        {"wconfd": {"ganeti": str(prefix), "no-voting": True, "debug": True}}, "ganeti", []))
    command = ganeti.service_command(s, "wconfd", hint=str(hint_file))
    out = subprocess.run(list(command), capture_output=True, text=True, check=True).stdout.splitlines()
    args = ["--no-voting", "--yes-do-it", "--debug"]
    forced = ["--force-node", "--no-voting", "--yes-do-it"] if hint else []
    assert out == [str(fake), "-f", *forced, *args]


@pytest.mark.parametrize(("toml", "line"), [
    ("[ganeti.noded]\nport = 0", "ganeti.noded.port: must be at least 1, got 0"),
    ('[ganeti.noded]\nssl = "no"', 'ganeti.noded.ssl: expected true or false, got "no"'),
    ('[ganeti.noded]\naddress = "everywhere"', 'ganeti.noded.address: expected an IP address, got "everywhere"'),
    ('[ganeti.rapi]\ninterface = "eth 0"',
     'ganeti.rapi.interface: expected a network interface name like "eth0", got "eth 0"'),
    ('[ganeti.watcher]\nschedule = "every five minutes"', "ganeti.watcher.schedule: not a valid cron expression"),
    ("[ganeti.watcher]\njob-age = -1", "ganeti.watcher.job-age: must be at least 0, got -1"),
    ('[ganeti.metad]\nganeti = "usr"', "ganeti.metad.ganeti: expected the directory Ganeti is installed in"),
    ("[ganeti.kvmd]\nport = 1", "ganeti.kvmd.port: unknown key (known keys: auto-start, debug, ganeti)"),
    ('[ganeti.mond]\nauto-start = "no"', 'ganeti.mond.auto-start: expected true or false, got "no"'),
    ('[ganeti.watcher]\nrapi-ip = true', 'ganeti.watcher.rapi-ip: expected a non-empty string, got true'),
    ('[ganeti]\nfile-storage-paths = ["srv"]', 'ganeti.file-storage-paths[0]: must be an absolute path, got "srv"'),
    ('[ganeti]\nnodedd = {}', "ganeti.nodedd: unknown key"),
    ('[[ganeti.os]]\nname = "a/b"', 'ganeti.os[0].name: "a/b" is not a valid name'),
    ('[[ganeti.os]]\nname = "x"\n[[ganeti.os.variants]]\nname = "v"',
     'ganeti.os[0].variants[0]: needs exactly one of "configuration"'),
    (('[[ganeti.os]]\nname = "x"\n[[ganeti.os.variants]]\nname = "v"\n[ganeti.os.variants.debootstrap]\n'
      'suite = "bookworm main"'),
     "ganeti.os[0].variants[0].debootstrap.suite: must not contain whitespace or shell special characters"),
    (('[[ganeti.os]]\nname = "x"\n[[ganeti.os.variants]]\nname = "v"\ncontent = ""\n[[ganeti.os.variants]]\n'
      'name = "v"\ncontent = ""'), 'ganeti.os[0].variants[1].name: variant "v" is listed twice'),
])
def test_config_errors_name_the_key(tmp_path: Path, toml: str, line: str) -> None:
    proc = check_config(tmp_path, toml + "\n")
    assert proc.returncode == 1, proc
    assert any(out.startswith(line) for out in proc.stdout.splitlines()), proc.stdout


def test_auto_start_per_daemon_table() -> None:
    """Optional daemons can be left off (mond, kvmd), metad started at boot."""
    got = specs({"mond": {"auto-start": False}, "kvmd": {"auto-start": False}, "metad": {"auto-start": True}})
    assert sorted(n for n, s in got.items() if not s.auto_start) == ["ganeti-kvmd", "ganeti-mond"]


def test_false_is_the_seeds_no_value_for_every_field_that_defaults_to_it() -> None:
    """Every field whose seed default is #f takes false, meaning that default."""
    table = {"noded": {"interface": False}, "rapi": {"interface": False}, "metad": {"address": False},
             "watcher": {"rapi-ip": False},
             "os": [{"name": "debootstrap", "variants": [{"name": "v", "debootstrap": {
                 "hooks": False, "proxy": False, "mirror": False, "arch": False, "suite": False,
                 "components": False, "clean-cache": False}}]}]}
    got, default = specs(table), specs({})
    for name in ("ganeti-noded", "ganeti-rapi", "ganeti-metad", "ganeti-watcher"):
        assert got[name].command == default[name].command, name


def test_config_reports_every_error() -> None:
    with pytest.raises(ConfigErrors) as info:
        parse_config({"ganeti": {"noded": {"port": "x", "bogus": 1}, "watcher": {"debug": 1}}})
    assert [e.path for e in info.value.errors] == ["ganeti.noded.port", "ganeti.noded.bogus", "ganeti.watcher.debug"]


# -- files --------------------------------------------------------------------------------------------


def test_seed_example_os_variant_files(tmp_path: Path) -> None:
    """The manual's example: eigenes-os, variant foo, content "das genügt"."""
    etc = tmp_path / "etc-ganeti"
    t = Table({
        "config-directory": str(etc), "file-storage-paths": ["/srv/ganeti/file-storage"],
        "os": [{"name": "eigenes-os", "extension": ".conf",
                "variants": [{"name": "foo", "content": "das genügt"}]}]}, "ganeti", [])
    s = ganeti.read_settings(t)
    assert t.errors == []
    written = gfiles.write_files(s.files)
    assert written == [f"{etc}/file-storage-paths", f"{etc}/instance-eigenes-os/variants/foo.conf",
                       f"{etc}/instance-eigenes-os/variants/variants.list"]
    assert (etc / "file-storage-paths").read_text() == "/srv/ganeti/file-storage"  # no trailing newline
    assert (etc / "instance-eigenes-os/variants/foo.conf").read_text() == "das genügt"
    assert (etc / "instance-eigenes-os/variants/variants.list").read_text() == "foo\n"
    assert sorted(p.name for p in (etc / "instance-eigenes-os/variants").iterdir()) == ["foo.conf", "variants.list"]
    gfiles.write_files(s.files)  # again: same result, no temporary files left
    assert sorted(p.name for p in (etc / "instance-eigenes-os/variants").iterdir()) == ["foo.conf", "variants.list"]


def test_default_os_is_debootstrap_with_guix_default_variant(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    s = ganeti.read_settings(Table({"config-directory": str(etc)}, "ganeti", []))
    gfiles.write_files(s.files)
    assert not (etc / "file-storage-paths").exists()  # an empty list writes nothing
    variants = etc / "instance-debootstrap" / "variants"
    customize = etc / "instance-debootstrap" / "customize" / "default"
    assert (variants / "variants.list").read_text() == "default\n"
    assert (variants / "default.conf").read_text() == (
        "SUITE=stable\n"
        "EXTRA_PKGS=acpi-support-base,udev,linux-image-amd64,openssh-server,locales-all,grub-pc\n"
        f"CUSTOMIZE_DIR={customize}\n"
        "GENERATE_CACHE=yes\nCLEAN_CACHE=14\nPARTITION_STYLE=msdos\nPARTITION_ALIGNMENT=2048\n")
    assert sorted(p.name for p in customize.iterdir()) == ["10-interfaces", "90-grub"]
    assert all((p.stat().st_mode & 0o777) == 0o555 for p in customize.iterdir())
    for hook in customize.iterdir():
        subprocess.run(["sh", "-n", str(hook)], check=True)  # valid shell


def test_debootstrap_every_field_links_and_hooks(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    hook_src = tmp_path / "hello"
    hook_src.write_text("#!/bin/sh\necho Hallo Welt\n")
    bar = tmp_path / "bar.scm"
    bar.write_text("(operating-system)")
    t = Table({"config-directory": str(etc), "hooks": "/srv/ganeti-hooks", "os": [
        {"name": "debootstrap", "extension": ".conf", "variants": [
            {"name": "full", "debootstrap": {
                "proxy": "http://proxy.example:3128", "mirror": "http://deb.example/debian", "arch": "armhf",
                "suite": "bookworm", "extra-pkgs": ["openssh-server", "udev"], "components": ["main", "contrib"],
                "hooks": {"99-hallo-welt": str(hook_src), "50-inline": {"content": "#!/bin/sh\ntrue\n"}},
                "generate-cache": False, "clean-cache": 3, "partition-style": "none", "partition-alignment": 1}},
            {"name": "bare", "debootstrap": {"hooks": False, "suite": False, "extra-pkgs": [], "clean-cache": False,
                                              "partition-style": False, "partition-alignment": False}},
            {"name": "dir", "debootstrap": {"hooks": "/srv/my-hooks"}}]},
        {"name": "guix", "extension": ".scm", "variants": [{"name": "default", "configuration": str(bar)}]},
        {"name": "empty"}]}, "ganeti", [])
    s = ganeti.read_settings(t)
    assert t.errors == []
    gfiles.write_files(s.files)
    variants = etc / "instance-debootstrap" / "variants"
    customize = etc / "instance-debootstrap" / "customize" / "full"
    assert (variants / "full.conf").read_text() == (
        "PROXY=http://proxy.example:3128\nMIRROR=http://deb.example/debian\nARCH=armhf\nSUITE=bookworm\n"
        "EXTRA_PKGS=openssh-server,udev\nCOMPONENTS=main,contrib\n"
        f"CUSTOMIZE_DIR={customize}\n"
        "GENERATE_CACHE=no\nCLEAN_CACHE=3\nPARTITION_STYLE=none\nPARTITION_ALIGNMENT=1\n")
    assert (customize / "99-hallo-welt").read_text() == hook_src.read_text()
    assert (customize / "50-inline").read_text() == "#!/bin/sh\ntrue\n"
    assert (variants / "bare.conf").read_text() == "GENERATE_CACHE=yes\n"
    assert "CUSTOMIZE_DIR=/srv/my-hooks\n" in (variants / "dir.conf").read_text()
    assert (variants / "variants.list").read_text() == "full\nbare\ndir\n"
    assert os.readlink(etc / "instance-guix" / "variants" / "default.scm") == str(bar)  # linked, as Guix does
    assert (etc / "instance-guix" / "variants" / "variants.list").read_text() == "default\n"
    assert not (etc / "instance-empty").exists()  # no variants: no variants.list
    assert os.readlink(etc / "hooks") == "/srv/ganeti-hooks"


# -- daemon-util against a supervisor with stand-in services ------------------------------------------


def run_daemon_util(sup: Supervisor, *args: str, original: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SUPERVISOR_SOCKET=str(sup.socket))
    if original is not None:
        env["GANETI_DAEMON_UTIL_ORIGINAL"] = str(original)
    return subprocess.run(["/usr/bin/python3", str(Path(daemon_util.__file__)), *args], capture_output=True,
                          text=True, env=env, timeout=60, check=False)


def test_daemon_util_routes_through_the_supervisor(sup: Supervisor, tmp_path: Path) -> None:
    sleep = "import sys, time; time.sleep(1e6)"
    sup.start({"services": {
        "ganeti-noded": {"command": [PY, "-c", sleep, sup.marker("noded")]},
        "ganeti-luxid": {"command": [PY, "-c", "import sys; sys.exit(11)", sup.marker("luxid")],
                         "stay-down-exit-codes": [11]},
        "ganeti-metad": {"command": [PY, "-c", sleep, sup.marker("metad")], "auto-start": False},
        "ganeti-wconfd": {"command": [PY, "-c", sleep, sup.marker("wconfd")], "auto-start": False},
    }})
    wait_until(lambda: sup.rstatus("ganeti-noded")["state"] == "running", 10, "noded running")
    wait_until(lambda: sup.rstatus("ganeti-luxid")["state"] == "stopped"
               and sup.rstatus("ganeti-luxid")["last-exit"], 10, "luxid down")
    assert run_daemon_util(sup, "check", "ganeti-noded").returncode == 0
    assert run_daemon_util(sup, "check", "ganeti-metad").returncode == 1
    assert run_daemon_util(sup, "check", "ganeti-rapi").returncode == 1  # unknown to the supervisor
    noded_pid = sup.rstatus("ganeti-noded")["pid"]
    assert run_daemon_util(sup, "check-and-start", "ganeti-noded").returncode == 0
    refused = run_daemon_util(sup, "check-and-start", "ganeti-luxid")
    assert refused.returncode == 1 and "will not restart" in refused.stdout
    assert sup.rstatus("ganeti-luxid")["state"] == "stopped"
    started = run_daemon_util(sup, "start", "ganeti-metad")
    assert started.returncode == 0, started
    assert sup.rstatus("ganeti-metad")["state"] == "running"
    assert run_daemon_util(sup, "stop", "ganeti-metad").returncode == 0
    assert sup.rstatus("ganeti-metad")["state"] == "stopped"
    assert run_daemon_util(sup, "stop", "ganeti-kvmd").returncode == 0  # unknown: nothing to do
    sup.herd("disable", "ganeti-metad", check=True)
    assert run_daemon_util(sup, "start", "ganeti-metad").returncode == 0  # enabled first, as Guix does
    assert sup.rstatus("ganeti-metad")["state"] == "running"
    assert run_daemon_util(sup, "stop-all").returncode == 0
    assert {n: s["state"] for n, s in sup.rstatus().items()} == dict.fromkeys(
        ["ganeti-luxid", "ganeti-metad", "ganeti-noded", "ganeti-wconfd"], "stopped")
    assert run_daemon_util(sup, "start-all").returncode == 0  # luxid exits 11 again: not an error
    assert sup.rstatus("ganeti-noded")["state"] == "running"
    assert sup.rstatus("ganeti-noded")["pid"] != noded_pid
    assert sup.rstatus("ganeti-metad")["state"] == "stopped"  # on demand only
    # master failover: start wconfd --force-node → force-start (a stand-in has no such action)
    forced = run_daemon_util(sup, "start", "ganeti-wconfd", "--force-node", "--no-voting", "--yes-do-it")
    assert forced.returncode == 1 and "force-start" in forced.stderr
    assert run_daemon_util(sup, "list-start-daemons").stdout.split() == [
        "ganeti-noded", "ganeti-confd", "ganeti-wconfd", "ganeti-rapi", "ganeti-luxid", "ganeti-kvmd", "ganeti-mond"]
    assert run_daemon_util(sup, "daemon-pidfile", "ganeti-noded").stdout == "/var/run/ganeti/ganeti-noded.pid\n"
    assert run_daemon_util(sup, "check_and_start", "x").returncode == 1
    assert run_daemon_util(sup, "frobnicate").returncode == 1
    wrong = run_daemon_util(sup, "check")
    assert wrong.returncode == 1 and "wrong arguments" in wrong.stderr
    # without a supervisor: the original script runs
    original = tmp_path / "daemon-util.distrib"
    original.write_text('#!/bin/sh\necho "original $*"\n')
    original.chmod(0o755)
    sup.stop()
    fallback = run_daemon_util(sup, "check", "ganeti-noded", original=original)
    assert fallback.returncode == 0 and fallback.stdout == "original check ganeti-noded\n"


# -- timers (the engine's, as Ganeti uses them) ---------------------------------------------------------

TICK = r"""
import os, sys, time
start = time.time()
with open(sys.argv[1], "a") as f:
    f.write(f"start {start:.3f} {os.getpid()}\n")
time.sleep(float(sys.argv[2]))
with open(sys.argv[1], "a") as f:
    f.write(f"end {time.time():.3f} {os.getpid()}\n")
"""


def test_timer_every_second_runs_never_overlap_and_slow_runs_are_killed(sup: Supervisor, tmp_path: Path) -> None:
    ticks, slow = tmp_path / "ticks", tmp_path / "slow"
    sup.start({"services": {
        "tick": {"command": [PY, "-c", TICK, str(ticks), "0.2", sup.marker("tick")], "schedule": "* * * * * *"},
        "slow": {"command": [PY, "-c", TICK, str(slow), "30", sup.marker("slow")], "schedule": "* * * * * *",
                 "max-duration": 1.5, "stop-timeout": 1},
    }})
    deadline = time.monotonic() + 5.5
    most = 0
    while time.monotonic() < deadline:  # never two runs of the slow timer at once
        most = max(most, len(find_pids(sup.marker("slow"))))
        time.sleep(0.05)
    assert most == 1
    lines = [line.split() for line in ticks.read_text().splitlines()]
    starts = [float(t) for kind, t, _ in lines if kind == "start"]
    assert len(starts) >= 4, lines
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(0.5 < g < 1.6 for g in gaps), gaps  # once a second (an event may come a little late)
    events = [(kind, pid) for kind, _, pid in lines]
    for i in range(0, len(events) - 1, 2):  # start/end pairs of the same run, never interleaved
        assert events[i][0] == "start" and events[i + 1] == ("end", events[i][1]), events
    tick = wait_until(lambda: (t := sup.rstatus("tick")["timer"]) and "end" in (t["last-run"] or {}) and t, 5,
                      "a finished run of tick")
    assert tick["schedule"] == "* * * * * *" and tick["last-run"]["code"] == 0 and tick["next-run"]
    slow_runs = [line.split() for line in slow.read_text().splitlines()]
    assert slow_runs and all(kind == "start" for kind, _, _ in slow_runs)  # none got to its end
    last = wait_until(lambda: (r := sup.rstatus("slow")["timer"]["last-run"]) and "end" in r and r, 5,
                      "a finished slow run")
    assert last["overrun"] is True and last["signal"] == "SIGTERM"
    assert 1.4 < last["end"] - last["start"] < 3.0
    assert "exceeded max-duration" in " ".join(t for _, _, t in sup.log_lines("slow"))
    assert sup.rstatus("slow")["state"] == "running"  # still armed


# -- the real daemons, without a cluster -------------------------------------------------------------------

INSIDE = r'''
import urllib.error
import urllib.request

env["SUPERVISOR_SOCKET"] = sock


def setup():
    sh("ip", "link", "set", "lo", "up")
    if spec.get("veth"):
        sh("ip", "link", "add", "gnt0", "type", "veth", "peer", "name", "gnt1")
        sh("ip", "addr", "add", spec["veth"], "dev", "gnt0")
        sh("ip", "link", "set", "gnt0", "up")
        sh("ip", "link", "set", "gnt1", "up")
    if spec.get("hostname"):
        sh("hostname", spec["hostname"])
    for d in ("/var/lib/ganeti", "/var/run/ganeti", "/var/log/ganeti"):
        real = os.path.realpath(d)
        os.makedirs(real, exist_ok=True)
        sh("mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", real)
    if spec.get("hosts"):
        with open(f"{work}/hosts", "w") as f:
            f.write(spec["hosts"])
        sh("mount", "--bind", f"{work}/hosts", "/etc/hosts")
    if spec.get("daemon_util"):
        shutil.copy(spec["daemon_util"], f"{work}/daemon-util")
        os.chmod(f"{work}/daemon-util", 0o755)
        sh("mount", "--bind", f"{work}/daemon-util", os.path.realpath("/usr/lib/ganeti/daemon-util"))


def finish():
    out["after-exit"] = procs()


def dig(obj, path):
    for part in path.split("."):
        if isinstance(obj, list) and part.isdigit():
            obj = obj[int(part)] if int(part) < len(obj) else None
        elif isinstance(obj, dict):
            obj = obj.get(part)
        else:
            return None
    return obj


def http(step):
    data = step.get("data")
    req = urllib.request.Request(step["url"], data=data.encode() if data is not None else None,
                                 method=step.get("method", "GET"))
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return {"status": resp.status, "body": resp.read().decode(errors="replace")}
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, "body": exc.read().decode(errors="replace")}
    except OSError as exc:
        return {"error": str(exc)}


def procs():
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[:-1]
            stat = open(f"/proc/{pid}/stat").read()
            st = os.stat(f"/proc/{pid}")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] == "Z":
            continue
        argv = [a.decode(errors="replace") for a in argv]
        if any("ganeti-" in a for a in argv[:3]):
            found.append({"pid": int(pid), "ppid": int(fields[1]), "argv": argv, "uid": st.st_uid, "gid": st.st_gid})
    return found


def wait(step):
    deadline = time.monotonic() + step.get("timeout", 30)
    while True:
        svc = status(step["service"])
        value = dig(svc, step["path"])
        if ("in" in step and value in step["in"]) or ("present" in step and value is not None):
            return {"ok": True, "value": value, "waited": step.get("timeout", 30) - (deadline - time.monotonic())}
        if time.monotonic() > deadline:
            return {"ok": False, "value": value, "service": svc}
        time.sleep(0.1)


KINDS.update(http=http, procs=lambda step: procs(), wait=wait)
'''


def require_ganeti() -> None:
    """Skip when not root (naming the need); as root, a missing tool is a failure."""
    if os.geteuid() != 0:
        pytest.skip("needs root: mount, network, UTS and PID namespaces, and switching to Ganeti's users")
    missing = [what for what, path in (("Debian package ganeti (/usr/sbin/ganeti-noded)", "/usr/sbin/ganeti-noded"),
                                       ("Ganeti's ensure-dirs", "/usr/lib/ganeti/ensure-dirs"),
                                       ("util-linux (unshare)", shutil.which("unshare") or ""),
                                       ("iproute2 (ip)", shutil.which("ip") or ""))
               if not path or not os.path.exists(path)]
    if missing:
        pytest.fail("missing: " + "; ".join(missing) + " -- run `contrib/dev test` (as root it installs them)")


def drive(tmp_path: Path, table: dict[str, Any], steps: list[dict[str, Any]], *, timeout: float = 170,
          **setup: Any) -> namespaces.Run:
    """Run the supervisor with ``[ganeti] = table`` in fresh namespaces and do `steps`."""
    return namespaces.drive(tmp_path, {"ganeti": table}, steps, inside=INSIDE,
                            namespaces=namespaces.unshare("--net", "--uts"), timeout=timeout, **setup)


def herd(step_id: str, *args: str) -> dict[str, Any]:
    return {"id": step_id, "do": "herd", "arg": list(args)}


def wait(step_id: str, service: str, path: str = "state", *, values: list[Any] | None = None,
         timeout: float = 30) -> dict[str, Any]:
    step: dict[str, Any] = {"id": step_id, "do": "wait", "service": service, "path": path, "timeout": timeout}
    if values is None:
        step["present"] = True
    else:
        step["in"] = values
    return step


def daemons_by_name(procs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The main processes of each Ganeti program (a process forked by one of the same name is left out),
    each with its ``daemon-argv``: the argv from the program on (Python ones run under an interpreter)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for p in procs:
        i = next(i for i, a in enumerate(p["argv"]) if "ganeti-" in os.path.basename(a))
        p = dict(p, **{"daemon-argv": p["argv"][i:]})
        out.setdefault(os.path.basename(p["argv"][i]), []).append(p)
    for name, found in out.items():
        pids = {p["pid"] for p in found}
        out[name] = [p for p in found if p["ppid"] not in pids]
    return out


def test_real_daemons_without_a_cluster(tmp_path: Path) -> None:
    require_ganeti()
    etc = tmp_path / "etc-ganeti"
    table = {
        "config-directory": str(etc),
        "file-storage-paths": ["/srv/ganeti/file-storage"],
        "noded": {"ssl": False},
        "metad": {"port": 18080, "address": "127.0.0.1"},
        "os": [{"name": "eigenes-os", "extension": ".conf", "variants": [{"name": "foo", "content": "das genügt"}]}],
    }
    settled = [wait(f"settled-{d}", f"ganeti-{d}", "state", values=["running", "stopped"])
               for d in ("confd", "wconfd", "luxid", "rapi", "kvmd", "mond")]
    r = drive(tmp_path, table, [
        wait("noded-up", "ganeti-noded", values=["running"]),
        {"id": "version", "do": "http", "method": "POST", "url": "http://127.0.0.1:1811/version", "data": "[]"},
        *settled,
        wait("kvmd-down", "ganeti-kvmd", "last-exit", timeout=45),
        {"id": "pause", "do": "sleep", "arg": 2},  # time enough for a respawn loop to show
        {"id": "all", "do": "status"},
        herd("wconfd-human", "status", "ganeti-wconfd"),
        herd("kvmd-human", "status", "ganeti-kvmd"),
        herd("metad-start", "start", "ganeti-metad"),
        {"id": "metad-http", "do": "http", "url": "http://127.0.0.1:18080/"},
        {"id": "procs", "do": "procs"},
        herd("noded-details", "--json", "status", "ganeti-noded"),
        herd("force", "force-start", "ganeti-wconfd"),
        {"id": "hint-after", "do": "exists", "arg": HINT},
        {"id": "wconfd-after", "do": "status", "service": "ganeti-wconfd"},
        {"id": "queue", "do": "ls", "arg": "/var/lib/ganeti"},
        {"id": "foo", "do": "read", "arg": f"{etc}/instance-eigenes-os/variants/foo.conf"},
        {"id": "list", "do": "read", "arg": f"{etc}/instance-eigenes-os/variants/variants.list"},
        {"id": "storage", "do": "read", "arg": f"{etc}/file-storage-paths"},
    ])
    r.waited("noded-up")
    assert json.loads(r.step("version")["body"]) == [True, 3000000], r.step("version")
    for d in ("confd", "wconfd", "luxid", "rapi", "kvmd", "mond"):
        r.waited(f"settled-{d}")
    services = r.step("all")
    for d in ("wconfd", "luxid", "rapi"):  # not needed on a node with no cluster: down, with the reason, no loop
        svc = services[f"ganeti-{d}"]
        assert svc["state"] == "stopped" and svc["enabled"], svc
        assert svc["respawns"] == [], svc
        assert "not master" in (svc["last-failure"] or "") + (svc["status-text"] or ""), svc
        assert len(svc["startup-failures"]) == 1, svc
    assert "not master" in r.ok("wconfd-human")["out"]
    kvmd = services["ganeti-kvmd"]  # ran, exited 0: "not needed", not a crash
    assert kvmd["state"] == "stopped" and kvmd["respawns"] == [] and kvmd["last-exit"]["code"] == 0, kvmd
    assert "not needed" in kvmd["status-text"] and "not needed" in r.ok("kvmd-human")["out"]
    for d in ("confd", "mond"):  # no hmac.key: a real failure (a crash if it came after the PID file), bounded
        svc = services[f"ganeti-{d}"]
        assert svc["state"] == "stopped" and len(svc["respawns"]) <= 5, svc
        assert (svc["startup-failures"] or not svc["enabled"]) and "hmac.key" in r.service_log(f"ganeti-{d}"), svc
    assert services["ganeti-metad"]["state"] == "stopped"  # not auto-started
    r.ok("metad-start")
    assert r.step("metad-http") == {"status": 404, "body": "Resource not found"}
    by_name = daemons_by_name(r.step("procs"))
    [noded] = by_name["ganeti-noded"]
    assert noded["daemon-argv"] == ["/usr/sbin/ganeti-noded", "-f", "--port=1811", "--bind=0.0.0.0",
                                    "--max-clients=20", "--no-ssl"]
    [metad] = by_name["ganeti-metad"]
    import pwd
    assert (metad["uid"], metad["gid"]) == (pwd.getpwnam("gnt-metad").pw_uid, pwd.getpwnam("gnt-metad").pw_gid)
    [noded_svc] = json.loads(r.ok("noded-details")["out"])["services"]
    assert noded_svc["details"]["master-node"].startswith("none") and noded_svc["details"]["runs-as"] == "root:root"
    # force-start: the hint makes wconfd skip the master check; with no config.data it still fails (at
    # once, or just after its socket is up: wconfd binds it before reading the configuration)
    force = r.step("force")
    assert "Forcefully starting the wconfd daemon..." in force["out"], force
    assert r.step("hint-after") == {"exists": False}
    assert "config.data" in r.service_log("ganeti-wconfd")
    assert "queue" in r.step("queue")["entries"]  # ensure-dirs ran
    assert r.step("foo") == {"text": "das genügt"}
    assert r.step("list") == {"text": "foo\n"}
    assert r.step("storage") == {"text": "/srv/ganeti/file-storage"}
    assert r.out["daemon-exit"] == 0
    assert r.out["after-exit"] == []  # the supervisor stopped every daemon


def test_a_crashing_daemon_is_respawned_within_limits(tmp_path: Path) -> None:
    """A real crash (SIGKILL) of a running daemon is respawned, and it answers again."""
    require_ganeti()
    r = drive(tmp_path, {"config-directory": str(tmp_path / "etc"), "noded": {"ssl": False}}, [
        wait("up", "ganeti-noded", values=["running"]),
        {"id": "before", "do": "status", "service": "ganeti-noded"},
        {"id": "kill", "do": "run", "arg": ["sh", "-c", "kill -KILL $(cat /var/run/ganeti/ganeti-noded.pid)"]},
        wait("respawned", "ganeti-noded", "respawns.0"),
        wait("up-again", "ganeti-noded", values=["running"]),
        {"id": "version", "do": "http", "method": "POST", "url": "http://127.0.0.1:1811/version", "data": "[]"},
        {"id": "after", "do": "status", "service": "ganeti-noded"},
    ])
    r.waited("up")
    r.ok("kill")
    r.waited("respawned")
    r.waited("up-again")
    assert json.loads(r.step("version")["body"]) == [True, 3000000]
    assert r.step("after")["pid"] != r.step("before")["pid"]
    assert r.step("after")["last-exit"]["signal"] == "SIGKILL"
