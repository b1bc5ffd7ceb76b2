"""Turn protocol results into the text ``herd`` prints.

Every function here is pure: it takes result dicts shaped as in
``docs/protocol.md`` (and ``now`` where times are shown) and returns a
string without a trailing newline.  The layout imitates GNU Shepherd's
``herd`` (0.10 wording, with the 1.0 extras).

Grep compatibility: Guix's Ganeti scripts decide that a daemon runs when
``herd status NAME`` prints ``Running``, and that it is disabled when it
prints ``disabled`` (both case-sensitive).  :func:`render_service` keeps
that true: ``Running`` appears only for a running service (``Running value
is PID.``) and ``disabled`` only for a disabled one.  Free text shown in
the block (command, status text, failures, log lines) is re-cased where
needed (``running``, ``Disabled``) so that it cannot break the rule.
"""

from __future__ import annotations

import time

from herd._json import dumps

# On `herd status`'s fast path: json and shlex (both import re) load where
# they are used; the abstract types are for annotations only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence
    from typing import Any

__all__ = [
    "Style",
    "relative_time",
    "format_time",
    "render_summary",
    "render_sections",
    "render_service",
    "render_services",
    "render_logline",
    "render_overflow",
    "render_log",
    "render_doc",
    "render_ping",
    "render_change",
    "render_value",
    "json_line",
]

SVC = "Mapping[str, Any]"

_BOLD = "\x1b[1m"
_WARN = "\x1b[1;35m"  # bold magenta
_ERROR = "\x1b[1;31m"  # bold red
_RESET = "\x1b[0m"


class Style:
    """ANSI highlighting as in Shepherd's ``colors.scm``; a no-op when ``color`` is false."""

    __slots__ = ("color",)

    def __init__(self, color: bool = False) -> None:
        self.color = color

    def _wrap(self, code: str, text: str) -> str:
        return f"{code}{text}{_RESET}" if self.color else text

    def bold(self, text: str) -> str:
        return self._wrap(_BOLD, text)

    def warn(self, text: str) -> str:
        return self._wrap(_WARN, text)

    def error(self, text: str) -> str:
        return self._wrap(_ERROR, text)


# --- times -----------------------------------------------------------------


def relative_time(seconds: float) -> str:
    """Shepherd's relative time: ``N seconds ago`` … ``N days ago`` (rounded)."""
    seconds = max(0.0, seconds)
    if seconds < 120:
        n = round(seconds)
        return "1 second ago" if n == 1 else f"{n} seconds ago"
    if seconds < 7200:
        return f"{round(seconds / 60)} minutes ago"
    if seconds < 48 * 3600:
        return f"{round(seconds / 3600)} hours ago"
    return f"{round(seconds / 86400)} days ago"


def format_time(when: float, now: float) -> str:
    """``<absolute> (<relative>)``: ``%X`` for today, ``%c`` otherwise (local time)."""
    local = time.localtime(when)
    today = time.localtime(now)[:3] == local[:3]
    absolute = time.strftime("%X" if today else "%c", local)
    return f"{absolute} ({relative_time(now - when)})"


def _stamp(when: Any) -> str:
    """A log timestamp, ``YYYY-MM-DD HH:MM:SS`` local time."""
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(when)))
    except (TypeError, ValueError, OverflowError, OSError):
        return "????-??-?? ??:??:??"


# --- the summary -----------------------------------------------------------


def _failures(svc: SVC) -> list[float]:
    return list(svc.get("startup-failures") or [])


#: (section key, header, bullet, header style) in Shepherd's order; the keys
#: are `herd.protocol.SUMMARY_SECTIONS`, the daemon's `summary` result.
_SECTIONS: tuple[tuple[str, str, str, str], ...] = (
    ("running", "Started:", "+", "bold"),
    ("starting", "Starting:", "^", "bold"),
    ("stopped", "Stopped:", "-", "bold"),
    ("stopping", "Stopping:", "v", "bold"),
    ("respawning", "Respawning:", "~", "warn"),
    ("one-shot", "One-shot:", "*", "bold"),
    ("disabled", "Disabled:", "x", "warn"),
    ("failed", "Failed to start:", "!", "error"),
)


def render_sections(sections: Mapping[str, Any], *, color: bool = False) -> str:
    """``herd status`` from a `summary` result (section key → names), each
    section only if non-empty, names sorted."""
    style = Style(color)
    out: list[str] = []
    for key, header, bullet, header_style in _SECTIONS:
        names = sections.get(key)
        if names and isinstance(names, list):
            out.append(getattr(style, header_style)(header))
            out.extend(f" {bullet} {name}" for name in sorted(str(n) for n in names))
    return "\n".join(out)


def render_summary(services: Iterable[SVC], *, color: bool = False) -> str:
    """``herd status`` from full SVC objects (a `status` result): the same
    sections; each service is in exactly one (`herd.protocol.summary_section`)."""
    from herd.protocol import summary_section

    sections: dict[str, list[str]] = {}
    for svc in services:
        sections.setdefault(summary_section(dict(svc)), []).append(str(svc.get("name", "?")))
    return render_sections(sections, color=color)


# --- one service -----------------------------------------------------------


def _tame(text: str, *, running: bool, disabled: bool) -> str:
    """Re-case ``Running``/``disabled`` in free text so greps stay truthful."""
    if not running:
        text = text.replace("Running", "running")
    if not disabled:
        text = text.replace("disabled", "Disabled")
    return text


#: What :func:`shlex.quote` leaves unquoted (``[\\w@%+=:,./-]``, ASCII).
_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_@%+=:,./-")


def _quote(arg: str) -> str:
    """:func:`shlex.quote` without importing :mod:`shlex` (and :mod:`re`)."""
    if not arg:
        return "''"
    if _SAFE.issuperset(arg):
        return arg
    return "'" + arg.replace("'", "'\"'\"'") + "'"


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else text + "."


def _scheme_list(names: Iterable[Any]) -> str:
    return "(" + " ".join(str(n) for n in names) + ")"


def render_logline(line: Mapping[str, Any], *, with_service: bool = True) -> str:
    """One LOGLINE: ``TIME SERVICE STREAM: text`` (``TIME STREAM: text`` without the service)."""
    prefix = _stamp(line.get("time"))
    if with_service:
        prefix += f" {line.get('service') or '-'}"
    return f"{prefix} {line.get('stream', 'stdout')}: {line.get('line', '')}"


def render_overflow(event: Mapping[str, Any]) -> str:
    """An ``overflow`` event: ``N log lines lost (client too slow)``."""
    what = {"log": "log lines", "state": "state events"}.get(str(event.get("stream")), "events")
    return f"{event.get('lost', '?')} {what} lost (client too slow)"


def render_service(svc: SVC, *, now: float | None = None, color: bool = False) -> str:
    """``herd status SERVICE``: the ``Status of NAME:`` block."""
    style = Style(color)
    now = time.time() if now is None else now
    name = str(svc.get("name", "?"))
    state = str(svc.get("state", "stopped"))
    running = state == "running"
    enabled = svc.get("enabled", True) is not False
    pid = svc.get("pid")
    since = svc.get("since")
    failures = _failures(svc)
    respawns = list(svc.get("respawns") or [])

    def tame(text: Any) -> str:
        return _tame(str(text), running=running, disabled=not enabled)

    def when(t: Any) -> str:
        return format_time(float(t), now)

    lines = [style.bold(f"Status of {name}:")]
    if running:
        lines.append(f"  It is running since {when(since)}." if since else "  It is running.")
        if pid is not None:
            lines.append(f"  Running value is {pid}.")
        elif not svc.get("timer"):  # a timer between runs has no running value
            lines.append("  Running value is #t.")
    elif state == "starting":
        lines.append("  It is starting.")
    elif state == "stopping":
        lines.append("  It is being stopped.")
    elif state == "stopped":
        stopped = style.warn("stopped")
        if svc.get("next-respawn") is not None:
            left = max(0.0, float(svc["next-respawn"]) - now)
            lines.append(f"  It is {stopped}; respawning in {left:.0f} s "
                         f"(backoff delay {float(svc.get('respawn-delay') or 0):g} s).")
        elif svc.get("one-shot"):
            lines.append(f"  It is {stopped} (one-shot).")
        elif failures:
            lines.append(f"  It is {stopped} ({style.error('failing')}).")
        elif since:
            lines.append(f"  It is {stopped} since {when(since)}.")
        else:
            lines.append(f"  It is {stopped}.")
    else:
        lines.append(f"  It is {tame(state)}.")
    if not running and pid is not None:
        lines.append(f"  Main PID: {pid}.")
    command = svc.get("command")
    if command:
        lines.append(f"  Command: {tame(' '.join(_quote(str(a)) for a in command))}")
    if svc.get("status-text"):
        lines.append(f"  Status: {tame(svc['status-text'])}")
    if enabled:
        lines.append("  It is enabled.")
    else:
        lines.append(f"  It is {style.error('disabled') if respawns else style.warn('disabled')}.")
        if svc.get("disabled-reason"):
            lines.append(f"  Reason: {_sentence(tame(svc['disabled-reason']))}")
    lines.append(f"  Provides {_scheme_list(svc.get('provides') or [name])}.")
    lines.append(f"  Requires {_scheme_list(svc.get('requires') or [])}.")
    if svc.get("timer"):
        lines.append(f"  It is a timer (schedule {tame(str(svc['timer'].get('schedule')))}).")
    elif svc.get("one-shot"):
        lines.append("  It is one-shot: it runs to completion when started, and is never respawned.")
    else:
        respawned = svc.get("respawn") and enabled
        lines.append("  Will be respawned." if respawned else "  Will not be respawned.")
    if svc.get("replacement-pending"):
        lines.append("  A new definition is pending; it applies at the next restart.")
    if respawns:
        lines.append(f"  Last respawned on {when(respawns[-1])}.")
    last_exit = svc.get("last-exit")
    if isinstance(last_exit, dict):
        at = f" at {when(last_exit['time'])}" if last_exit.get("time") else ""
        if last_exit.get("signal"):
            lines.append(f"  Last exit: signal {last_exit['signal']}{at}.")
        elif last_exit.get("code") is not None:
            lines.append(f"  Last exit: code {last_exit['code']}{at}.")
    if state == "stopped" and failures:
        lines.append(f"  Failed to start at {when(failures[-1])}.")
    if svc.get("last-failure"):
        lines.append(f"  Last failure: {_sentence(tame(svc['last-failure']))}")
    if isinstance(svc.get("health"), dict):
        lines.extend("  " + tame(line) for line in render_health(svc["health"], when))
    lines.extend("  " + line for line in render_processes(svc.get("processes")))
    if svc.get("log-file"):
        lines.append(f"  Log file: {tame(svc['log-file'])}")
    actions = svc.get("actions") or []
    if actions:
        lines.append(f"  Custom actions: {' '.join(str(a) for a in actions)}.")
    details = svc.get("details")
    if isinstance(details, dict) and details:
        lines.append("  Details:")
        lines.extend("    " + tame(line) for line in render_details(details))
    recent = svc.get("recent-log") or []
    if recent:
        lines.append("")
        lines.append("  Recent messages (use '-n' to view more or less):")
        lines.extend("    " + tame(render_logline(entry, with_service=False)) for entry in recent)
    return "\n".join(lines)


def render_health(health: Mapping[str, Any], when: Callable[[Any], str]) -> list[str]:
    """The health check's lines of ``herd status SERVICE``."""
    kind = health.get("type", "?")
    lines = [f"Health check: {kind}, every {health.get('interval', '?'):g} s."
             if isinstance(health.get("interval"), (int, float)) else f"Health check: {kind}."]
    if health.get("last-result"):
        at = f" at {when(health['last-check'])}" if health.get("last-check") else ""
        lines.append(f"Last check {health['last-result']}{at}: {_sentence(str(health.get('last-detail') or ''))}")
    if health.get("consecutive-failures"):
        n = health["consecutive-failures"]
        lines.append(f"Failed {n} time{'' if n == 1 else 's'} in a row.")
    if health.get("last-success"):
        lines.append(f"Last success: {when(health['last-success'])}.")
    return lines


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def render_processes(procs: Any) -> list[str]:
    """The live figures of a service's processes (one-service status)."""
    if not isinstance(procs, dict):
        return []
    if procs.get("containment") != "cgroup":
        return ["Processes are tracked by process group and tree (no cgroup)."]
    count = procs.get("processes")
    parts = [f"Processes: {count}"]
    if procs.get("cpu-usec") is not None:
        parts.append(f"CPU {procs['cpu-usec'] / 1e6:.2f} s")
    if procs.get("memory-bytes") is not None:
        parts.append(f"memory {_size(procs['memory-bytes'])}")
    out = [", ".join(parts) + f" (cgroup {procs.get('cgroup')})."]
    if procs.get("left-over"):
        out.append(f"Left-over processes: {procs['left-over']} (kill-mode \"process\" left them running).")
    return out


def render_details(details: dict[str, Any]) -> list[str]:
    """A service type's extra facts, one line each; lists of tables one line per item."""
    out: list[str] = []
    for key, value in details.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            out.append(f"{key}:")
            for item in value:
                head = item.get("name", "")
                rest = ", ".join(f"{k}={_scalar(v)}" for k, v in item.items() if k != "name")
                out.append(f"  {head}: {rest}" if head else f"  {rest}")
        elif isinstance(value, dict):
            out.append(f"{key}: " + ", ".join(f"{k}={_scalar(v)}" for k, v in value.items()))
        else:
            out.append(f"{key}: {_scalar(value)}")
    return out


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "-"
    if isinstance(value, list):
        return ", ".join(_scalar(v) for v in value) or "-"
    return str(value)


def render_services(services: Iterable[SVC], *, now: float | None = None, color: bool = False) -> str:
    """``herd detailed-status``: the block of every service, separated by blank lines."""
    now = time.time() if now is None else now
    return "\n\n".join(render_service(s, now=now, color=color) for s in services)


# --- other results ---------------------------------------------------------


def render_log(lines: Iterable[Mapping[str, Any]]) -> str:
    """``herd log``: one LOGLINE per line, oldest first."""
    return "\n".join(render_logline(line) for line in lines)


def render_doc(result: Mapping[str, Any]) -> str:
    """``herd doc SERVICE [action NAME]``."""
    doc = str(result.get("documentation") or "").rstrip()
    if "action" in result:
        return f"{result['action']}: {doc or 'no documentation'}"
    out = [doc or f"No documentation for service {result.get('service', '?')}."]
    actions = result.get("actions") or []
    if actions:
        out.append("")
        out.append("Actions:" if result.get("service") == "root" else "Custom actions:")
        for action in actions:
            if isinstance(action, dict):
                adoc = str(action.get("documentation") or "").strip()
                out.append(f"  {action.get('name')}: {adoc}" if adoc else f"  {action.get('name')}")
            else:
                out.append(f"  {action}")
    return "\n".join(out)


def render_ping(result: Mapping[str, Any]) -> str:
    """``herd ping``."""
    return f"supervisor {result.get('version', '?')} answers, PID {result.get('pid', '?')}."


def render_change(action: str, service: str, result: Any) -> str:
    """Fallback text for start/stop/restart/enable/disable when the daemon sent no messages."""
    if not isinstance(result, dict):
        return ""
    name = str(result.get("service") or service)
    out: list[str] = []
    stopped: Sequence[Any] = result.get("stopped") or []
    started: Sequence[Any] = result.get("started") or []
    if action in ("stop", "restart"):
        out.extend(f"Service {s} has been stopped." for s in stopped)
        if action == "stop" and not stopped:
            out.append(f"Service {name} is not running.")
    if action in ("start", "restart"):
        out.extend(f"Service {s} has been started." for s in started)
        if action == "start" and not started:
            out.append(f"Service {name} is already running.")
    if action in ("enable", "disable") and "enabled" in result:
        out.append(f"{'Enabled' if result['enabled'] else 'Disabled'} service {name}.")
    return "\n".join(out)


def render_value(result: Any) -> str:
    """A custom action's result when it sent no messages: text as is, JSON otherwise."""
    if result is None or result is True or result == {} or result == [] or result == "":
        return ""
    if isinstance(result, str):
        return result
    import json

    return json.dumps(result, indent=2, ensure_ascii=False)


def json_line(obj: Any) -> str:
    """One compact JSON line (``--json`` output)."""
    try:
        return dumps(obj)
    except ValueError:  # a NaN or an infinity: json writes them as NaN, Infinity
        import json

        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
