"""HistoryRecorder: every collection interval, the collector's snapshot into the store.

It samples what ``/metrics`` exposes (every gauge and counter family, histograms through
their ``_sum`` and ``_count``, the store's own ``mlxrelay_history_*`` families) and the
dashboard's chart lines, and attaches the store as the collector's request log. Building the
samples runs in a worker thread, so the event loop never waits for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from mlx_relay import __version__
from mlx_relay.core.tasks import cancel_and_wait
from mlx_relay.monitoring.history.exposition import store_families
from mlx_relay.monitoring.history.series import SeriesCatalog, SeriesSpec, chart_samples
from mlx_relay.monitoring.history.store import HistoryStore
from mlx_relay.monitoring.metrics import MetricsCollector
from mlx_relay.monitoring.prometheus_families import snapshot_families
from mlx_relay.monitoring.snapshot import HealthSummary

logger = logging.getLogger(__name__)


class HistoryRecorder:
    """Feeds one collector (and its health summary) into a :class:`HistoryStore`.

    Args:
        store: A started store.
        collector: The coordinator's collector.
        health_source: Returns this process's health summary, if any.
        interval: Seconds between samples; default: the collector's collection interval.
    """

    def __init__(
        self,
        store: HistoryStore,
        collector: MetricsCollector,
        health_source: Callable[[], HealthSummary | None] | None = None,
        *,
        interval: float | None = None,
    ) -> None:
        self.store = store
        self.collector = collector
        self.interval = interval or collector.collection_interval
        self._health_source = health_source
        self._catalog = SeriesCatalog()
        self._last_chart = 0.0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Attach the request log and start sampling in the background."""
        if self._task is not None:
            return
        self.collector.set_request_log(self.store.record_request)
        self._task = asyncio.create_task(self._run(), name="history-recorder")

    async def stop(self) -> None:
        """Take a last sample, stop sampling and detach the request log (the store stays
        open: its owner closes it, after the last requests have finished)."""
        task, self._task = self._task, None
        await cancel_and_wait(task)
        if task is not None:
            await asyncio.to_thread(self.record_once)
            self.collector.set_request_log(None)

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.record_once)
            except Exception:
                # One bad sample must not end the history; the next interval tries again.
                logger.warning("history sample failed", exc_info=True)
            await asyncio.sleep(self.interval)

    def record_once(self) -> int:
        """Record one sample of every series now; returns how many samples."""
        snapshot = self.collector.snapshot()
        health = self._health_source() if self._health_source is not None else None
        families = [*snapshot_families(snapshot, health, __version__), *store_families(self.store)]
        samples: list[tuple[SeriesSpec, float]] = list(self._catalog.samples(families))
        self.store.record(snapshot.timestamp, samples)
        count = len(samples)
        for point in snapshot.history:
            if point.timestamp > self._last_chart:
                chart = chart_samples(point)
                self.store.record(point.timestamp, chart)
                self._last_chart = point.timestamp
                count += len(chart)
        return count
