"""Reloading the configuration: the new file, applied as a diff.

What the new file drops is stopped (dependents first) and removed; what it
adds is added and started (if it starts on its own); what it changes is
replaced, at once if stopped, else at its next start.  An invalid file
changes nothing.  `Engine.reload` serializes reloads (and a re-exec holds
them off); the file is read and parsed in a worker thread.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import trio

from herd.protocol import ProtocolError

from . import _threads
from ._config_file import read_config_file
from ._hostcheck import log_findings
from ._messages import say
from .config import Config, load_config
from .schema import ConfigErrors

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["apply", "load"]

log = structlog.get_logger("supervisor.engine")


async def apply(engine: Engine, path: Path | None, requester: int | None) -> dict[str, Any]:
    """Apply the file at `path` (None: the one in force) as a diff: stop and
    remove what it drops, add and start what it adds, replace what it changes.
    The caller holds the engine's reload lock.

    Raises:
        ProtocolError: as `Engine.reload`.
    """
    path = path or engine.config.path
    if path is None:
        raise ProtocolError("bad-arguments", "no configuration file to reload; name one")
    try:
        config = await _threads.run_sync(load, path, engine.overrides, requester)
    except ProtocolError as exc:
        log.warning("reload refused", config=str(path), requester=requester, error=exc.message)
        raise
    except ConfigErrors as exc:
        log.warning("reload refused", config=str(path), errors=[str(e) for e in exc.errors])
        raise ProtocolError("config-error", "\n".join(str(e) for e in exc.errors)) from None
    log_findings(config, log)
    new = {spec.name: spec for spec in config.services}
    clash = sorted(n for n in new if n in engine.transients.running)
    if clash:
        raise ProtocolError("config-error", "\n".join(
            f"services.{n}: a transient service (herd spawn) runs under this name; stop it first"
            for n in clash))
    added = sorted(n for n in new if n not in engine.services)
    removed = [n for n in reversed(engine.graph.order()) if n not in new]
    changed = sorted(n for n in new if n in engine.services
                     and new[n] != (engine.services[n].pending_spec or engine.services[n].spec))
    for name in removed:  # dependents first; nothing in the new graph requires them
        service = engine.services[name]
        outcome = await service.stop()
        if outcome.initiated:
            say(f"Service {name} has been stopped.")
    engine.graph = config.graph
    engine.config = config
    for name in removed:
        engine.remove_service(name)
        say(f"Service {name} has been removed.")
    for name in added:
        await engine.add_service(new[name])
        say(f"Service {name} has been added.")
    for name in changed:
        outcome = await engine.services[name].replace(new[name])
        say(f"Service {name} has been updated." if outcome.initiated
            else f"Service {name} will be replaced at its next restart.")
    log.info("configuration reloaded", config=str(path), added=added, removed=removed, changed=changed)
    failures: list[str] = []

    async def start_new(name: str) -> None:
        try:
            await engine.start(name, operator=False)
        except ProtocolError as exc:
            failures.append(exc.message)

    async with trio.open_nursery() as nursery:
        for name in added:
            spec = new[name]
            if spec.auto_start and spec.activation != "lazy":
                nursery.start_soon(start_new, name)
    for message in failures:
        say(message)
    if not (added or removed or changed):
        say(f"Reloaded {path}: nothing changed.")
    else:
        say(f"Reloaded {path}: {len(added)} added, {len(removed)} removed, {len(changed)} changed.")
    return {"config": str(path), "added": added, "removed": removed, "changed": changed,
            "pending": sorted(n for n in changed if engine.services[n].pending_spec is not None)}


def load(path: Path, overrides: dict[str, Any], requester: int | None) -> Config:
    """In a worker thread: read the file safely, then parse it.

    Raises:
        ProtocolError: see `read_config_file`.
        ConfigErrors: the configuration is invalid.
    """
    return load_config(path, overrides=overrides, data=read_config_file(path, requester=requester))
