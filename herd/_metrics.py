"""The services' figures as Prometheus metrics: `herd metrics` and the exporter.

`gather` turns the replies of ``ping``, ``status`` and ``stats`` into
metric families; `render` writes them in the Prometheus text exposition
format (version 0.0.4), for a node exporter's textfile collector.  The
exporter (``supervisor_exporter``) serves the same families through the
Prometheus client library.  Standard library only, and imported only by
`herd metrics` (never on `herd status`'s path).  The metrics are listed in
``docs/metrics.md``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final, TextIO

__all__ = ["Family", "REQUESTS", "gather", "render", "print_metrics"]

#: The requests whose results `gather` reads, in this order.
REQUESTS: Final = ({"action": "ping"}, {"action": "status"}, {"action": "stats"})

STATES: Final = ("stopped", "starting", "running", "stopping")


@dataclass
class Family:
    """One metric: its name (counters without ``_total``), type, help, samples."""

    name: str
    type: str  # "gauge" or "counter"
    help: str
    labels: tuple[str, ...] = ("service",)
    samples: list[tuple[tuple[str, ...], float]] = field(default_factory=list)

    def add(self, value: float | None, *labels: str) -> None:
        if value is not None:
            self.samples.append((labels, float(value)))


def gather(ping: dict[str, Any], status: dict[str, Any], stats: dict[str, Any]) -> list[Family]:
    """The metric families for these results (`REQUESTS`)."""
    info = Family("supervisor_info", "gauge", "The supervisor: its version and how it tracks processes.",
                  ("version", "containment"))
    info.add(1, str(ping.get("version", "")), str((ping.get("containment") or {}).get("mode", "")))
    started = Family("supervisor_start_time_seconds", "gauge", "When the supervisor started (Unix time).", ())
    started.add(ping.get("since"))
    f = {name: Family(name, kind, text, labels) for name, kind, text, labels in (
        ("supervisor_service_state", "gauge", "1 for the state the service is in, else 0.", ("service", "state")),
        ("supervisor_service_enabled", "gauge", "1 when the service is enabled.", ("service",)),
        ("supervisor_service_state_since_seconds", "gauge", "When the service entered its state (Unix time).",
         ("service",)),
        ("supervisor_service_time_in_state_seconds", "gauge", "How long the service has been in its state.",
         ("service",)),
        ("supervisor_service_recent_respawns", "gauge",
         "Respawns the supervisor remembers for the service (its last 20 at most).", ("service",)),
        ("supervisor_service_recent_startup_failures", "gauge",
         "Failed starts the supervisor remembers for the service (its last 20 at most).", ("service",)),
        ("supervisor_service_last_exit_code", "gauge", "Exit code of the service's last process (if it exited).",
         ("service",)),
        ("supervisor_service_last_exit_signal", "gauge",
         "1, labelled with the signal that killed the service's last process (if one did).", ("service", "signal")),
        ("supervisor_service_last_exit_time_seconds", "gauge", "When the service's last process ended (Unix time).",
         ("service",)),
        ("supervisor_service_processes", "gauge", "Processes in the service's cgroup.", ("service",)),
        ("supervisor_service_memory_bytes", "gauge", "Memory the service's processes use (cgroup memory.current).",
         ("service",)),
        ("supervisor_service_cpu_seconds", "counter", "CPU time the service's cgroup has used.", ("service",)),
    )}
    now = stats.get("time")
    figures = stats.get("services") or {}
    for svc in status.get("services") or []:
        name = str(svc.get("name"))
        for state in STATES:
            f["supervisor_service_state"].add(1 if svc.get("state") == state else 0, name, state)
        f["supervisor_service_enabled"].add(1 if svc.get("enabled") else 0, name)
        since = svc.get("since")
        f["supervisor_service_state_since_seconds"].add(since, name)
        if isinstance(since, (int, float)) and isinstance(now, (int, float)):
            f["supervisor_service_time_in_state_seconds"].add(max(0.0, now - since), name)
        f["supervisor_service_recent_respawns"].add(len(svc.get("respawns") or []), name)
        f["supervisor_service_recent_startup_failures"].add(len(svc.get("startup-failures") or []), name)
        last = svc.get("last-exit")
        if isinstance(last, dict):
            f["supervisor_service_last_exit_code"].add(last.get("code"), name)
            if last.get("signal"):
                f["supervisor_service_last_exit_signal"].add(1, name, str(last["signal"]))
            f["supervisor_service_last_exit_time_seconds"].add(last.get("time"), name)
        live = figures.get(name) or {}
        f["supervisor_service_processes"].add(live.get("processes"), name)
        f["supervisor_service_memory_bytes"].add(live.get("memory-bytes"), name)
        cpu = live.get("cpu-usec")
        f["supervisor_service_cpu_seconds"].add(cpu / 1e6 if isinstance(cpu, (int, float)) else None, name)
    return [info, started, *f.values()]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if value.is_integer() and abs(value) < 2 ** 53 else repr(value)


def render(families: list[Family]) -> str:
    """The Prometheus text format (0.0.4)."""
    out: list[str] = []
    for fam in families:
        name = fam.name + ("_total" if fam.type == "counter" else "")
        out.append(f"# HELP {name} {_escape(fam.help)}")
        out.append(f"# TYPE {name} {fam.type}")
        for labels, value in fam.samples:
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in zip(fam.labels, labels))
            out.append(f"{name}{{{text}}} {_number(value)}" if text else f"{name} {_number(value)}")
    return "\n".join(out) + "\n"


def print_metrics(replies: Iterable[dict[str, Any]], out: TextIO) -> int:
    """`herd metrics`: the replies to `REQUESTS`, printed as metrics; the exit status."""
    replies = list(replies)
    for reply in replies:
        if reply.get("ok") is not True:
            error = reply.get("error") if isinstance(reply.get("error"), dict) else {}
            print(f"herd: error: {error.get('message') or error.get('code')}", file=sys.stderr)
            from herd.protocol import exit_code_for

            return exit_code_for(str(error.get("code", "internal")))
    out.write(render(gather(*(reply["result"] for reply in replies))))
    return 0
