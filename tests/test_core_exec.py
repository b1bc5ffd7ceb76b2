"""Issue 2 acceptance: the execution environment of a service, checked from
inside the child (a Python probe prints what it sees; the test reads the
service's log file), and the capture of its output."""

from __future__ import annotations

import grp
import os
import pwd
import resource
import tempfile
from datetime import datetime
from typing import Any

import pytest

from helpers import (
    PY_PROBE,
    TOKEN_ENV,
    Supervisor,
    py_service,
    python_for_other_users,
    sleeper,
)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (to switch user and group)")


def probe_service(sup: Supervisor, name: str, **keys: Any) -> dict[str, Any]:
    svc = py_service(PY_PROBE, sup.marker(name))
    svc["auto-start"] = False
    svc.update(keys)
    return svc


def run_probe(sup: Supervisor, name: str) -> dict[str, Any]:
    sup.herd("start", name, check=True)
    return sup.probe(name)


def test_child_sees_only_fds_0_1_2(sup: Supervisor) -> None:
    sup.start({"services": {
        # Other services running: the daemon holds their pipes and log files.
        **{f"busy{i}": sleeper(sup.marker(f"busy{i}")) for i in range(3)},
        "probe": probe_service(sup, "probe"),
    }})
    # Connections open on both sockets while the probe starts.
    sup.subscribe(ro=True)
    sup.subscribe(ro=False)
    info = run_probe(sup, "probe")
    targets = info["fd-targets"]
    # beyond 0-2 only its guards: its own stdout and stderr pipes again (docs/keeper.md)
    extra = sorted(target for fd, target in targets.items() if int(fd) > 2)
    assert len(info["fds"]) == 5 and extra == sorted([targets["1"], targets["2"]]), f"leaked descriptors: {targets}"
    # Each service is in its own session and process group.
    assert info["sid"] == info["pid"] and info["pgid"] == info["pid"]


def test_umask(sup: Supervisor) -> None:
    sup.start({"services": {
        "default": probe_service(sup, "default"),
        "strict": probe_service(sup, "strict", umask="0077"),
        "as-int": probe_service(sup, "as-int", umask=0o027),
    }}, umask=0o002)  # the daemon's own umask differs from the default
    assert run_probe(sup, "default")["umask"] == 0o022
    assert run_probe(sup, "strict")["umask"] == 0o077
    assert run_probe(sup, "as-int")["umask"] == 0o027


def test_directory(sup: Supervisor) -> None:
    workdir = tempfile.mkdtemp(prefix="svt-wd-", dir="/tmp")
    try:
        sup.start({"services": {
            "default": probe_service(sup, "default"),
            "here": probe_service(sup, "here", directory=workdir),
        }})
        assert run_probe(sup, "default")["cwd"] == "/"
        assert run_probe(sup, "here")["cwd"] == os.path.realpath(workdir)
    finally:
        os.rmdir(workdir)


TRICKY = '50% "quoted" $HOME \\n ü'


def test_environment_added(sup: Supervisor) -> None:
    sup.start({"services": {
        "added": probe_service(sup, "added", environment={"FOO": "bar", "TRICKY": TRICKY}),
    }})
    env = run_probe(sup, "added")["env"]
    assert env["FOO"] == "bar"
    assert env["TRICKY"] == TRICKY
    # The supervisor's own environment is kept.
    assert env[TOKEN_ENV] == sup.token
    assert "PATH" in env


def test_environment_cleared(sup: Supervisor) -> None:
    sup.start({"services": {
        "clean": probe_service(sup, "clean", environment={"FOO": "bar", "ONLY": "this"},
                               **{"clear-environment": True}),
    }})
    env = run_probe(sup, "clean")["env"]
    assert env == {"FOO": "bar", "ONLY": "this"}


def nobody() -> tuple[pwd.struct_passwd, grp.struct_group]:
    try:
        user = pwd.getpwnam("nobody")
        group = grp.getgrnam("nogroup")
    except KeyError:
        pytest.skip("no nobody/nogroup on this system")
    return user, group


@needs_root
def test_user_and_group(sup: Supervisor) -> None:
    user, group = nobody()
    python = python_for_other_users()
    if python is None:
        pytest.skip("no Python interpreter that `nobody` may run")
    daemon = grp.getgrnam("daemon").gr_gid if _has_group("daemon") else None

    def svc(name: str, **keys: Any) -> dict[str, Any]:
        s = probe_service(sup, name, **keys)
        s["command"][0] = python
        return s

    services = {
        "both": svc("both", user="nobody", group="nogroup"),
        "numeric": svc("numeric", user=user.pw_uid, group=group.gr_gid),
        "user-only": svc("user-only", user="nobody"),
    }
    if daemon is not None:
        services["extra"] = svc("extra", user="nobody", group="nogroup", **{"supplementary-groups": ["daemon"]})
    sup.start({"services": services})

    for name in ("both", "numeric"):
        info = run_probe(sup, name)
        assert (info["uid"], info["euid"]) == (user.pw_uid, user.pw_uid), info
        assert (info["gid"], info["egid"]) == (group.gr_gid, group.gr_gid), info
        assert 0 not in info["groups"], f"root's groups kept: {info['groups']}"

    info = run_probe(sup, "user-only")
    assert info["uid"] == user.pw_uid
    assert info["gid"] == user.pw_gid, "group defaults to the user's primary group"
    assert set(info["groups"]) <= set(os.getgrouplist("nobody", user.pw_gid)), info["groups"]

    if daemon is not None:
        info = run_probe(sup, "extra")
        assert daemon in info["groups"], info["groups"]
        assert set(info["groups"]) <= {daemon, group.gr_gid}, info["groups"]


def _has_group(name: str) -> bool:
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def test_resource_limits(sup: Supervisor) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    pair_hard = 1024 if hard == resource.RLIM_INFINITY or hard >= 1024 else hard
    sup.start({"services": {
        "limited": probe_service(sup, "limited", **{"resource-limits": {"nofile": 1234, "core": 0}}),
        "pair": probe_service(sup, "pair", **{"resource-limits": {"nofile": [256, pair_hard]}}),
    }})
    info = run_probe(sup, "limited")
    assert info["nofile"] == [1234, 1234]
    assert info["core"] == [0, 0]
    assert run_probe(sup, "pair")["nofile"] == [256, pair_hard]


# Writes lines to stdout and stderr, one of them not UTF-8, then sleeps.
CHATTY = (
    "import sys, time\n"
    "print('out-line-1', flush=True)\n"
    "print('err-line-1', file=sys.stderr, flush=True)\n"
    "sys.stdout.buffer.write(b'bad-\\xff-bytes\\n'); sys.stdout.flush()\n"
    "print('out-line-2', flush=True)\n"
    "time.sleep(1e6)\n"
)


def test_output_is_captured(sup: Supervisor) -> None:
    sup.start({"services": {
        "chatty": py_service(CHATTY, sup.marker("chatty"), **{"auto-start": False}),
        "elsewhere": py_service(CHATTY, sup.marker("elsewhere"),
                                **{"auto-start": False, "log-file": str(sup.tmp / "custom.log")}),
    }})
    sup.herd("start", "chatty", check=True)
    sup.wait_log("chatty", lambda t: t == "out-line-2")
    lines = sup.log_lines("chatty")
    texts = [(stream, text) for _, stream, text in lines]
    assert ("stdout", "out-line-1") in texts
    assert ("stderr", "err-line-1") in texts
    assert ("stdout", "bad-\ufffd-bytes") in texts
    assert texts.index(("stdout", "out-line-1")) < texts.index(("stdout", "out-line-2"))
    for stamp, _, _ in lines:
        when = datetime.fromisoformat(stamp)
        assert when.tzinfo is not None, stamp

    status = sup.status("chatty")
    recent = [(entry["stream"], entry["line"]) for entry in status["recent-log"]]
    assert ("stdout", "out-line-1") in recent and ("stderr", "err-line-1") in recent, recent
    assert all(entry["service"] == "chatty" for entry in status["recent-log"])
    human = sup.herd("status", "chatty", check=True).stdout
    assert "out-line-2" in human

    log = sup.herd("log", "chatty", "-n", "50", check=True).stdout
    assert "out-line-1" in log and "err-line-1" in log
    rep = sup.request({"action": "log", "service": "chatty", "args": [50]})
    assert any(entry["line"] == "out-line-2" for entry in rep["result"]["lines"]), rep

    sup.herd("start", "elsewhere", check=True)
    sup.wait_log("elsewhere", lambda t: t == "out-line-2", path=sup.tmp / "custom.log")
    assert sup.status("elsewhere")["log-file"] == str(sup.tmp / "custom.log")

