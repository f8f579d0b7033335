"""The store's own numbers as Prometheus families (``mlxrelay_history_*``)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

from mlx_relay.monitoring.history.store import HistoryStore

PREFIX = "mlxrelay_history_"


def store_families(store: HistoryStore) -> Iterator[Metric]:
    stats = store.stats()
    size = GaugeMetricFamily(
        PREFIX + "store_bytes", "Database pages in use by the history store (max_bytes caps it)."
    )
    size.add_metric([], stats.bytes)
    rows = GaugeMetricFamily(
        PREFIX + "rows", "Rows in the history store, by table.", labels=["table"]
    )
    rows.add_metric(["blocks"], stats.block_rows)
    rows.add_metric(["requests"], stats.request_rows)
    series = GaugeMetricFamily(PREFIX + "series", "Series kept in the history store.")
    series.add_metric([], stats.series)
    lag = GaugeMetricFamily(
        PREFIX + "write_lag_seconds",
        "Age of the oldest sample in the writer's last commit, from recording to commit.",
    )
    if stats.write_lag_seconds is not None:
        lag.add_metric([], stats.write_lag_seconds)
    written = CounterMetricFamily(
        PREFIX + "samples_written", "Samples the writer has packed since start."
    )
    written.add_metric([], stats.samples_written)
    dropped = CounterMetricFamily(
        PREFIX + "dropped", "Samples and requests dropped because the writer fell behind."
    )
    dropped.add_metric([], stats.dropped)
    failures = CounterMetricFamily(
        PREFIX + "write_failures", "Commits that failed (disk full, I/O error); each is a gap."
    )
    failures.add_metric([], stats.failed_commits)
    yield from (size, rows, series, lag, written, dropped, failures)


class HistoryCollector(Collector):
    """Adds :func:`store_families` to a registry's ``/metrics``."""

    def __init__(self, store: HistoryStore, *, registry: CollectorRegistry | None = None) -> None:
        self._store = store
        if registry is not None:
            registry.register(self)

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield from store_families(self._store)
