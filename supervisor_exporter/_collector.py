"""At each scrape: ask the status socket, hand the families to prometheus_client."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from herd import _metrics
from herd._client import Connection, HerdError, exchange

__all__ = ["SupervisorCollector"]

#: How long one scrape may wait for the supervisor (seconds).
TIMEOUT = 10.0


class SupervisorCollector(Collector):
    """The supervisor's metrics, read from its socket at each `collect`."""

    def __init__(self, socket: str) -> None:
        self.socket = socket

    def _results(self) -> list[Any] | None:
        try:
            with Connection.open(self.socket, timeout=TIMEOUT) as conn:
                conn.settimeout(TIMEOUT)
                replies = list(exchange(conn, [{"id": i + 1, **r} for i, r in enumerate(_metrics.REQUESTS)]))
        except (HerdError, OSError):
            return None
        if not all(r.get("ok") is True for r in replies):
            return None
        return [r["result"] for r in replies]

    def collect(self) -> Iterator[Metric]:
        results = self._results()
        up = GaugeMetricFamily("supervisor_up", "1 when the supervisor answered this scrape.")
        up.add_metric([], 1 if results is not None else 0)
        yield up
        if results is None:
            return
        for fam in _metrics.gather(*results):
            kind = CounterMetricFamily if fam.type == "counter" else GaugeMetricFamily
            metric = kind(fam.name, fam.help, labels=list(fam.labels))
            for labels, value in fam.samples:
                metric.add_metric(list(labels), value)
            yield metric
