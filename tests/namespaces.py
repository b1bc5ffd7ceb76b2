"""One driver for the tests that run the supervisor inside private namespaces.

The libvirt, virtlog, Ganeti and qemu-binfmt tests run real daemons that
want ``/run``, ``/etc``, ``/var/lib/…``, the network or binfmt_misc of their
own.  `drive` runs ``ns_driver.py`` under ``unshare`` (a new mount and PID
namespace, plus what the test asks for: ``--net``, ``--uts``, ``--user``):
the driver is the namespace's PID 1, so every process the test started
(guests included) ends with it.

A test file gives:

* ``inside``: Python source run in the driver's module first; it may
  define ``setup()`` (build the private world: mounts, links, users),
  ``finish()`` (after the supervisor stopped) and step kinds of its own
  (``KINDS["name"] = function(step)``), and use the driver's helpers
  (``sh``, ``run``, ``herd``, ``status``, ``wait_for``, …, see
  ``ns_driver.py``);
* ``steps``: what to do once the supervisor sent ``READY=1``;
* anything else its ``inside`` code reads from ``spec``.

The result is a `Run`: the steps' results, the supervisor's own log and its
services' logs (both kept in ``tmp_path``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import tomli_w

ROOT = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).resolve().with_name("ns_driver.py")


def unshare(*more: str) -> list[str]:
    """``unshare`` with a private mount and PID namespace (and /proc), plus `more`
    (``--net``, ``--uts``, ``--user --map-root-user``)."""
    return ["unshare", *more, "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child",
            "--mount-proc"]


class Run:
    """The driver's report: `step(id)` (or ``run[id]``), `ok(id)` for a command, `json(id)`
    for its output, `waited(id)` for a wait step; `log` is the supervisor's own log."""

    def __init__(self, out: dict[str, Any], log: str, log_dir: Path) -> None:
        self.out, self.log, self.log_dir = out, log, log_dir

    def service_log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        """The supervisor's log (its end) and each service's, for a failure's message."""
        parts = [f"--- supervisor log ---\n{self.log[-5000:]}"]
        if self.log_dir.is_dir():
            for path in sorted(self.log_dir.glob("*.log")):
                parts.append(f"--- {path.name} ---\n{self.service_log(path.stem)[-3000:]}")
        return "\n".join(parts)

    def step(self, step_id: str) -> Any:
        assert step_id in self.out["steps"], f"the steps did not record {step_id!r}\n{self.logs()}"
        return self.out["steps"][step_id]

    __getitem__ = step

    def ok(self, step_id: str) -> dict[str, Any]:
        res = self.step(step_id)
        assert res.get("rc") == 0, f"{step_id}: {res}\n{self.logs()}"
        return res

    def json(self, step_id: str) -> Any:
        return json.loads(self.ok(step_id)["out"])

    def waited(self, step_id: str) -> Any:
        res = self.step(step_id)
        assert res["ok"], f"{step_id}: {json.dumps(res, indent=1)[-6000:]}"
        return res["value"]


def drive(tmp_path: Path, config: dict[str, Any] | str, steps: list[dict[str, Any]], *, inside: str,
          namespaces: list[str] | None, cwd: Path | str = ROOT, timeout: float = 180, **extra: Any) -> Run:
    """Run the supervisor on `config` and do `steps`, inside new namespaces.

    `namespaces` is the ``unshare`` argv (see `unshare`), or None to run the
    driver here, without namespaces.  `extra` goes into the spec for the
    `inside` code.  Fails the test, with the logs, when the driver fails,
    the supervisor sends no READY=1 or a step raises.
    """
    config_file, log, spec_file = (tmp_path / n for n in ("c.toml", "supervisor.log", "spec.json"))
    log_dir = tmp_path / "logs"
    config_file.write_text(config if isinstance(config, str) else tomli_w.dumps(config))
    spec_file.write_text(json.dumps({"root": str(ROOT), "python": sys.executable, "config": str(config_file),
                                     "log": str(log), "log_dir": str(log_dir), "cwd": str(cwd), "steps": steps,
                                     "inside": inside, **extra}))
    proc = subprocess.run([*(namespaces or []), sys.executable, str(DRIVER), str(spec_file)],
                          capture_output=True, text=True, timeout=timeout, check=False)
    run = Run({}, log.read_text(errors="replace") if log.exists() else "", log_dir)
    assert proc.returncode == 0 and proc.stdout.strip(), (
        f"driver failed (rc {proc.returncode}): {proc.stderr[-3000:]}\n{run.logs()}")
    run.out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert run.out["ready"], f"the supervisor never sent READY=1\n{run.logs()}"
    assert "error" not in run.out, f"{run.out['error']}\n{run.logs()}"
    return run
