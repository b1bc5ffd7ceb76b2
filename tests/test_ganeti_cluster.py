"""Ganeti (issue 7): a one-node cluster, every daemon under the supervisor.

Inside fresh mount, network, UTS and PID namespaces (the driver of
``test_ganeti.py``): a veth pair with 192.0.2.10 on ``gnt0`` (addresses that
exist only inside the test's own network namespace), the host name
``node1.example.test``, an ``/etc/hosts`` of the test's own bound over the
machine's, tmpfs over Ganeti's state directories, and the shipped
``daemon-util`` replacement bound over Debian's.  ``gnt-cluster init`` with
the fake hypervisor and diskless storage then starts the daemons through the
supervisor; the test checks the cluster commands, the watcher timer and
``force-start``.
"""

from __future__ import annotations

from pathlib import Path

from test_ganeti import HINT, daemons_by_name, drive, herd, require_ganeti, wait

from services import _ganeti_daemon_util as daemon_util

HOSTS = ("127.0.0.1 localhost\n"
         "192.0.2.10 node1.example.test node1\n"
         "192.0.2.100 cluster.example.test cluster\n")
INIT = ["gnt-cluster", "init", "--no-ssh-init", "--no-etc-hosts", "--enabled-hypervisors=fake",
        "--enabled-disk-templates=diskless", "--master-netdev=gnt0", "--nic-parameters=link=gnt1",
        "cluster.example.test"]
RUNNING = ["noded", "confd", "wconfd", "luxid", "rapi", "mond", "metad"]


def test_one_node_cluster_under_the_supervisor(tmp_path: Path) -> None:
    require_ganeti()
    table = {"config-directory": str(tmp_path / "etc-ganeti"),
             "metad": {"port": 18080},  # port 80 would need a file capability on the machine's own binary
             # the default health checks (noded: TLS on its port; confd: a signed ping), checked often here
             "health": {"noded": {"interval": 1}, "confd": {"interval": 1}}}
    r = drive(tmp_path, table, [
        wait("noded-tried", "ganeti-noded", "startup-failures.0"),  # no certificate before init
        {"id": "init", "do": "run", "arg": INIT, "timeout": 120},
        *[wait(f"up-{d}", f"ganeti-{d}", values=["running"]) for d in RUNNING if d != "metad"],
        herd("metad", "start", "ganeti-metad"),
        wait("kvmd-down", "ganeti-kvmd", "status-text"),
        wait("noded-healthy", "ganeti-noded", "health.last-success"),
        wait("confd-healthy", "ganeti-confd", "health.last-success"),
        {"id": "info", "do": "run", "arg": ["gnt-cluster", "info"]},
        {"id": "nodes", "do": "run", "arg": ["gnt-node", "list", "--no-headers", "-o", "name,master_candidate"]},
        {"id": "before", "do": "status"},
        herd("trigger", "trigger", "ganeti-watcher"),
        wait("watched", "ganeti-watcher", "timer.last-run.end", timeout=90),
        {"id": "procs", "do": "procs"},
        {"id": "after", "do": "status"},
        {"id": "watcher-log", "do": "read", "arg": "/var/log/ganeti/watcher.log"},
        herd("watcher-human", "status", "ganeti-watcher"),
        herd("force", "force-start", "ganeti-wconfd"),
        {"id": "hint-after", "do": "exists", "arg": HINT},
        wait("wconfd-forced", "ganeti-wconfd", values=["running"]),
        {"id": "forced-procs", "do": "procs"},
        {"id": "getmaster", "do": "run", "arg": ["gnt-cluster", "getmaster"]},
    ], veth="192.0.2.10/24", hostname="node1.example.test", hosts=HOSTS, daemon_util=daemon_util.__file__)

    r.waited("noded-tried")
    r.ok("init")
    for d in RUNNING:
        if d != "metad":
            r.waited(f"up-{d}")
    r.ok("metad")
    assert "not needed" in r.waited("kvmd-down")  # fake hypervisor: kvmd exits 0 and stays down
    r.waited("noded-healthy")
    r.waited("confd-healthy")
    info = r.ok("info")["out"]
    assert "Cluster name: cluster.example.test" in info and "node1.example.test" in info.lower()
    assert r.ok("nodes")["out"].split() == ["node1.example.test", "Y"]

    before, after = r.step("before"), r.step("after")
    for d in RUNNING:
        svc = after[f"ganeti-{d}"]
        assert svc["state"] == "running" and svc["pid"] == before[f"ganeti-{d}"]["pid"], (d, svc)
        assert svc["respawns"] == before[f"ganeti-{d}"]["respawns"], (d, svc)  # none during the watcher
    run = after["ganeti-watcher"]["timer"]["last-run"]
    assert run["code"] == 0, (run, r.service_log("ganeti-watcher"))
    assert "exit code 0" in r.ok("watcher-human")["out"]
    # the watcher asked daemon-util (the replacement) to check-and-start kvmd, which is down for a
    # reason: refused, not restarted behind the supervisor's back
    assert "ganeti-kvmd supervised by the supervisor but not running, will not restart" in \
        r.step("watcher-log")["text"], r.step("watcher-log")
    by_name = daemons_by_name(r.step("procs"))
    for d in RUNNING:  # exactly one copy of each daemon, the supervised one
        copies = by_name.get(f"ganeti-{d}", [])
        assert [p["pid"] for p in copies] == [after[f"ganeti-{d}"]["pid"]], (d, copies)
        assert copies[0]["daemon-argv"][1] == "-f"
    assert "ganeti-kvmd" not in by_name

    force = r.ok("force")
    assert "Forcefully starting the wconfd daemon..." in force["out"]
    assert r.step("hint-after") == {"exists": False}
    r.waited("wconfd-forced")
    [wconfd] = daemons_by_name(r.step("forced-procs"))["ganeti-wconfd"]
    assert wconfd["daemon-argv"] == ["/usr/sbin/ganeti-wconfd", "-f", "--force-node", "--no-voting", "--yes-do-it"]
    assert r.ok("getmaster")["out"].strip() == "node1.example.test"
    assert r.out["daemon-exit"] == 0
    assert r.out["after-exit"] == []
