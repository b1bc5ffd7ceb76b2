"""`status` replies built once per change, served as the same bytes to every poller.

Each service's SVC object (`_service_record.snapshot`) is encoded once and
kept until that service changes; the full `status` result is those pieces
joined, kept until any service changes (or one is added or removed).  The
engine calls `changed` from the service's actor after every message it
handles (every write of a service's fields happens there), and on every
published state change, synchronously: by the time a request that changed a
service is answered, the cache no longer holds the old view.

What changes continuously is not in the cache: a single service's
`recent-log` and `details` are read at each request, and its live figures
(`processes`: count, CPU, memory) come from `Sampler`, read at most once per
`STATS_INTERVAL` per service (and again after a state change), in a worker
thread (that takes no signal: `_threads`) for `stats`.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import trio

from herd.protocol import SUMMARY_SECTIONS, summary_section

from . import _threads
from ._service_record import live_fields, process_stats, snapshot

if TYPE_CHECKING:
    from .service import Service

__all__ = ["Encoded", "StatusCache", "STATS_INTERVAL", "dumps"]

#: Live figures (process count, CPU, memory) are read at most this often per service (seconds).
STATS_INTERVAL: Final = 1.0
#: Services encoded between two chances for other tasks to run, in a build from scratch.
SLICE: Final = 200


def dumps(obj: Any) -> bytes:
    """Compact JSON as the protocol writes it (see `herd.protocol.encode`), no newline.

    Raises:
        ValueError: `obj` holds a NaN or an infinity.
    """
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8", "backslashreplace")


@dataclass(frozen=True, slots=True)
class Encoded:
    """An action's result already encoded as JSON: sent as these bytes."""

    data: bytes


class StatusCache:
    """Encoded SVC objects per service, and the full `status` and `summary` results."""

    def __init__(self, services: dict[str, Service]) -> None:
        self._services = services  # the engine's own dict: services added or removed show
        self._entries: dict[str, bytes] = {}
        self._sections: dict[str, str] = {}  # name → its `summary` section, kept with its entry
        self._full: bytes | None = None
        self._summary: bytes | None = None
        self._generation = 0  # bumped at every change: a build that saw one is not kept
        self.sampler = Sampler()
        self._sampling = trio.Lock()
        self.builds = 0  # SVC objects encoded so far (for tests and the bench)

    def changed(self, name: str) -> None:
        """`name` changed (or was added or removed): encode it again when next asked."""
        self._entries.pop(name, None)
        self._full = self._summary = None
        self._generation += 1

    def state_changed(self, name: str) -> None:
        """A state change: the live figures are read again too."""
        self.changed(name)
        self.sampler.forget(name)

    def entry(self, service: Service) -> bytes:
        data = self._entries.get(service.name)
        if data is None:
            svc = snapshot(service)
            data = self._entries[service.name] = dumps(svc)
            self._sections[service.name] = summary_section(svc)
            self.builds += 1
        return data

    async def _each(self) -> AsyncIterator[Service]:
        """Every service by name, letting other tasks run every `SLICE` of them:
        at thousands of services, a build from scratch (a mass start changes
        them all) must not hold a `ping` up for its whole length."""
        for i, name in enumerate(sorted(self._services)):
            if i and i % SLICE == 0:
                await trio.lowlevel.checkpoint()
            service = self._services.get(name)
            if service is not None:  # (removed meanwhile)
                yield service

    async def full(self) -> Encoded:
        """``{"services": [SVC, ...]}``, sorted by name."""
        if self._full is not None:
            return Encoded(self._full)
        generation = self._generation
        pieces = [self.entry(service) async for service in self._each()]
        data = b'{"services":[' + b",".join(pieces) + b"]}"
        if generation == self._generation:
            self._full = data
        return Encoded(data)

    async def summary(self) -> Encoded:
        """``{SECTION: [NAME, ...], ...}`` (`herd.protocol.SUMMARY_SECTIONS`, each
        sorted): what ``herd status`` prints, without the rest of each SVC."""
        if self._summary is not None:
            return Encoded(self._summary)
        generation = self._generation
        sections: dict[str, list[str]] = {key: [] for key in SUMMARY_SECTIONS}
        async for service in self._each():
            self.entry(service)
            sections[self._sections[service.name]].append(service.name)
        data = dumps(sections)
        if generation == self._generation:
            self._summary = data
        return Encoded(data)

    def one(self, service: Service, log_lines: int) -> Encoded:
        """``{"services": [SVC]}`` for one service, with its recent log and live figures."""
        base = self.entry(service)
        if log_lines:
            live = live_fields(service, log_lines, self.sampler.processes(service))
            if live:
                base = base[:-1] + b"," + dumps(live)[1:]
        return Encoded(b'{"services":[' + base + b"]}")

    async def stats(self) -> Encoded:
        """Every service's live figures: ``{"time": T, "interval": S, "services": {NAME: {...}}}``."""
        services = [self._services[n] for n in sorted(self._services)]
        async with self._sampling:  # one reader at a time: the next one finds its figures fresh
            figures = await _threads.run_sync(self.sampler.sample_all, services)
        return Encoded(dumps({"time": time.time(), "interval": STATS_INTERVAL, "services": figures}))


class Sampler:
    """Live figures of each service's processes, read at most once per `STATS_INTERVAL`."""

    def __init__(self) -> None:
        self._samples: dict[str, tuple[float, dict[str, Any]]] = {}

    def forget(self, name: str) -> None:
        self._samples.pop(name, None)

    def processes(self, service: Service) -> dict[str, Any]:
        now = time.monotonic()
        got = self._samples.get(service.name)
        if got is not None and now - got[0] < STATS_INTERVAL:
            return got[1]
        figures = process_stats(service)
        self._samples[service.name] = (now, figures)
        return figures

    def sample_all(self, services: list[Service]) -> dict[str, dict[str, Any]]:
        """(In a worker thread: the reads only touch the cgroup files.)"""
        return {s.name: self.processes(s) for s in services}

