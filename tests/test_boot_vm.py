"""Issue 20 acceptance: a real machine (QEMU, TCG) booted with the supervisor as its init.

One guest, from the test image (contrib/guest/build-init), goes through the
tests in the order of this file: it boots and runs every configured
service (`herd --json status` over ssh); its PID 1 reaps the orphans a
double-forking service leaves; `herd reexec root` and SIGTERM to PID 1
re-execute it with every service's PID kept; Ctrl-Alt-Del (QMP send-key)
reboots it in order and it comes back up; the ACPI power button (QMP
system_powerdown) stops its services in reverse dependency order, on the
console, and QEMU exits on its own.

TCG on a shared 2-core machine is slow (a boot takes a minute or more, an
ssh command several seconds), so the bounds are minutes.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import need, wait_until
from init_vm import InitVM, all_up, build_image, have_tools

BOOT_TIMEOUT = 600.0
#: Services that stay up, and what each requires among them (contrib/guest/init.toml).
RUNNING = {"syslogd", "sshd", "getty", "power-button", "forker"}
ONE_SHOTS = {"hostname", "loopback", "modules", "network", "run-dirs"}



@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InitVM]:
    missing = have_tools()
    if missing is not None:
        need(missing)  # as root (CI) a failure: contrib/dev installs it
    guest = InitVM(build_image(), tmp_path_factory.mktemp("initvm"))
    guest.start()
    try:
        yield guest
    finally:
        guest.kill()


def _pids(services: list[dict]) -> dict[str, int]:
    return {s["name"]: s["pid"] for s in services if s["state"] == "running"}


def _up(vm: InitVM) -> list[dict]:
    assert vm.exited() is None, f"QEMU exited ({vm.exited()}); console:\n{vm.console()[-3000:]}"
    services = vm.status()
    return services if all_up(services) else []


def _stop_order(console: str) -> list[str]:
    """The services in the order the console says they began stopping."""
    return re.findall(r"new=stopping .*?service=([\w-]+)", console)


def test_boots_with_the_supervisor_as_pid1_and_every_service_up(vm: InitVM) -> None:
    services = wait_until(lambda: _up(vm), BOOT_TIMEOUT, "every service of the guest up", interval=5)
    print(f"all services running {time.monotonic() - vm.started:.1f} s after QEMU started")
    assert {s["name"] for s in services} == RUNNING | ONE_SHOTS
    init = vm.ssh("tr '\\0' ' ' < /proc/1/cmdline; echo; cat /proc/mounts")
    assert init.returncode == 0, init.stderr
    cmdline, mounts = init.stdout.split("\n", 1)
    assert "python3" in cmdline and "init" in cmdline
    for target, fstype in (("/proc", "proc"), ("/sys", "sysfs"), ("/dev", "devtmpfs"), ("/dev/pts", "devpts"),
                           ("/run", "tmpfs"), ("/sys/fs/cgroup", "cgroup2")):
        assert f" {target} {fstype} " in mounts, mounts
    assert vm.ssh("hostname").stdout.strip() == "supervised"


def test_orphans_of_a_double_forking_service_are_reaped(vm: InitVM) -> None:
    # forker: every second a subshell forks `sleep 0.2` and exits, so the
    # sleep is re-parented to PID 1 and exits there.  Zombies seen once must
    # be gone a few seconds later, while orphans of PID 1 kept coming.
    script = ("zombies() { for s in /proc/[0-9]*/stat; do read -r p c st pp rest < $s 2>/dev/null && "
              "[ \"$st\" = Z ] && echo $p; done; }; "
              "orph=0; for i in 1 2 3 4 5 6 7 8 9 10; do "
              "for s in /proc/[0-9]*/stat; do read -r p c st pp rest < $s 2>/dev/null && "
              "[ \"$c\" = '(sleep)' ] && [ \"$pp\" = 1 ] && orph=$((orph + 1)); done; sleep 0.3; done; "
              "first=$(zombies | tr '\\n' ' '); sleep 4; later=$(zombies | tr '\\n' ' '); "
              "echo \"orphans=$orph\"; echo \"first=$first\"; echo \"later=$later\"")
    p = vm.ssh(script)
    assert p.returncode == 0, p.stderr
    found = dict(line.split("=", 1) for line in p.stdout.splitlines() if "=" in line)
    assert int(found["orphans"]) > 0, f"no orphan of PID 1 seen: {p.stdout}"
    stuck = set(found["first"].split()) & set(found["later"].split())
    assert not stuck, f"zombies left for 4 s: {stuck}\n{p.stdout}"


def test_reexec_and_sigterm_keep_every_service(vm: InitVM) -> None:
    before = _pids(wait_until(lambda: _up(vm), BOOT_TIMEOUT, "every service up", interval=5))
    p = vm.ssh("herd reexec root")
    assert p.returncode == 0, p.stdout + p.stderr
    after = _pids(wait_until(lambda: _up(vm), BOOT_TIMEOUT, "every service up after the re-exec", interval=5))
    assert after == before
    # SIGTERM to PID 1 re-executes it too (as systemd does): nothing ends
    offset = len(vm.console())
    p = vm.ssh("kill -TERM 1")
    assert p.returncode == 0, p.stderr
    wait_until(lambda: "resumed after re-exec" in vm.console()[offset:], BOOT_TIMEOUT, "the re-exec on SIGTERM",
               interval=2)
    after = _pids(wait_until(lambda: _up(vm), BOOT_TIMEOUT, "every service up after SIGTERM", interval=5))
    assert after == before
    assert vm.exited() is None


def _stops_in_order(console: str) -> None:
    order = _stop_order(console)
    assert RUNNING <= set(order), f"not every service stopped: {order}"
    assert order.index("sshd") < order.index("syslogd"), order  # sshd requires syslogd


def test_ctrl_alt_delete_reboots_in_order_and_comes_back(vm: InitVM) -> None:
    offset = len(vm.console())
    before = _pids(wait_until(lambda: _up(vm), BOOT_TIMEOUT, "every service up", interval=5))
    assert "error" not in vm.qmp("send-key", keys=[{"type": "qcode", "data": k} for k in ("ctrl", "alt", "delete")])
    wait_until(lambda: "reboot: Restarting system" in vm.console()[offset:], BOOT_TIMEOUT, "the reboot", interval=2)
    went_down = vm.console()[offset:]
    assert "Ctrl-Alt-Del: rebooting" in went_down
    _stops_in_order(went_down)
    assert "all services stopped" in went_down
    back = _pids(wait_until(lambda: _up(vm), BOOT_TIMEOUT, "every service up after the reboot", interval=5))
    assert set(back) == set(before)
    assert vm.exited() is None


def test_power_button_stops_every_service_in_order_and_powers_off(vm: InitVM) -> None:
    wait_until(lambda: _up(vm), BOOT_TIMEOUT, "every service up", interval=5)
    offset = len(vm.console())
    assert "error" not in vm.qmp("system_powerdown")
    wait_until(lambda: vm.exited() is not None, BOOT_TIMEOUT, "QEMU to exit on its own", interval=1)
    assert vm.exited() == 0
    went_down = vm.console()[offset:]
    assert re.search(r"system going down .*how=power-off", went_down), went_down
    _stops_in_order(went_down)
    assert went_down.index("all services stopped") < went_down.index("reboot: Power down")
    # kernel threads are no strays: nothing waits for them to die of SIGTERM
    assert "stray processes survived SIGTERM" not in went_down, went_down
