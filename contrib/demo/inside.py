"""The demo VM host's PID 1, inside its namespaces (started by contrib/demo/run).

Run as ``python inside.py SPEC.json`` as the first process of a new PID,
mount and network namespace (and a user namespace: identity-mapped for root,
one uid for a normal user).  It builds the private world, starts the
supervisor, reaps orphans and forwards SIGINT/SIGTERM to the supervisor as
SIGTERM.  When the supervisor has exited, this process exits with its code,
and with it the PID namespace: nothing it started outlives it, and its mounts
end with its mount namespace.

Standard library only.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

supervisor: subprocess.Popen[bytes] | None = None


def sh(*argv: str) -> None:
    """Run a set-up command.

    Raises:
        SystemExit: it failed (its error is on stderr).
    """
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"contrib/demo: {' '.join(argv)}: {proc.stderr.strip()}")


def private_world(spec: dict[str, object]) -> None:
    """Mounts of this namespace only: /proc of the PID namespace, tmpfs over /run
    (and libvirt's directories), an overlay over /etc; lo up."""
    sh("mount", "--make-rprivate", "/")
    sh("mount", "-t", "proc", "-o", "nosuid,nodev,noexec", "proc", "/proc")
    sh("mount", "-t", "tmpfs", "-o", "mode=755", "tmpfs", "/run")
    if spec["root"]:
        for d in ("/var/lib/libvirt", "/var/log/libvirt", "/var/cache/libvirt"):
            if os.path.isdir(d):
                sh("mount", "-t", "tmpfs", "-o", "mode=755", "tmpfs", d)
        os.makedirs("/run/demo-etc/upper")
        os.makedirs("/run/demo-etc/work")
        sh("mount", "-t", "overlay", "overlay", "-o",
           "lowerdir=/etc,upperdir=/run/demo-etc/upper,workdir=/run/demo-etc/work", "/etc")
    guest = spec.get("guest")
    if guest:  # where QEMU's user may read it, whatever the checkout's modes
        os.makedirs("/run/demo-guest", mode=0o755)
        for name in ("vmlinuz", "initrd.gz"):
            shutil.copyfile(os.path.join(str(guest), name), f"/run/demo-guest/{name}")
            os.chmod(f"/run/demo-guest/{name}", 0o644)
    if shutil.which("ip"):
        sh("ip", "link", "set", "lo", "up")


def forward(signum: int, _frame: object) -> None:
    # os.kill, not Popen.send_signal: that one may reap the supervisor, which main() waits for.
    if supervisor is not None:
        try:
            os.kill(supervisor.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def main() -> int:
    global supervisor
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    private_world(spec)
    supervisor = subprocess.Popen(spec["argv"], env=dict(os.environ, **spec["env"]), cwd=spec["cwd"])
    while True:  # PID 1: reap every orphan; end with the supervisor
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return 1
        if pid == supervisor.pid:
            code = os.waitstatus_to_exitcode(status)
            return code if code >= 0 else 128 - code  # killed by a signal: 128 + its number, as a shell says


if __name__ == "__main__":
    sys.exit(main())
