"""Prometheus export: a custom collector that reads the one in-memory snapshot.

``collect()`` runs on the scrape, synchronously: it calls the snapshot source (a cheap,
lock-protected copy of the collector's state), never awaits and never makes an RPC. The
collector registers on the registry it is given, never on prometheus_client's global one.

Example::

    registry = CollectorRegistry()
    RelayCollector(collector.snapshot, health.summary, registry=registry)
    body = generate_latest(registry)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

from mlx_relay import __version__
from mlx_relay.monitoring.prometheus_families import snapshot_families
from mlx_relay.monitoring.snapshot import HealthSummary, Snapshot

logger = logging.getLogger(__name__)

SnapshotSource = Callable[[], Snapshot]
HealthSource = Callable[[], HealthSummary | None]

__all__ = [
    "CONTENT_TYPE_LATEST",
    "HealthSource",
    "RelayCollector",
    "SnapshotSource",
    "prometheus_format",
    "render_latest",
]


class RelayCollector(Collector):
    """Emits every docs/monitoring-api.md family from a snapshot.

    Args:
        snapshot_source: Returns the current :class:`Snapshot`; called once per scrape.
        health_source: Returns this process's :class:`HealthSummary` (or None); optional.
        registry: Registered on it when given (pass a fresh ``CollectorRegistry``).
        version: The ``version`` label of ``mlxrelay_build_info``.
    """

    def __init__(
        self,
        snapshot_source: SnapshotSource,
        health_source: HealthSource | None = None,
        *,
        registry: CollectorRegistry | None = None,
        version: str = __version__,
    ) -> None:
        self._snapshot_source = snapshot_source
        self._health_source = health_source
        self._version = version
        if registry is not None:
            registry.register(self)

    def describe(self) -> Iterable[Metric]:
        # Nothing to describe up front: registering must not take a snapshot.
        return []

    def collect(self) -> Iterator[Metric]:
        snapshot = self._snapshot_source()
        health = self._health_source() if self._health_source is not None else None
        yield from snapshot_families(snapshot, health, self._version)


def render_latest(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The text exposition of ``registry`` and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST


def prometheus_format(
    metrics: Mapping[str, Any] | Snapshot,
    health: Mapping[str, Any] | HealthSummary | None = None,
) -> str:
    """The Prometheus text exposition of one exported snapshot: what ``/metrics`` serves.

    For pushing to a Pushgateway, writing a node_exporter textfile, or tests::

        text = prometheus_format(metrics_collector.export_metrics())

    Args:
        metrics: ``MetricsCollector.export_metrics()`` (or its :class:`Snapshot`).
        health: ``HealthMonitor.get_health_summary()`` (or its :class:`HealthSummary`).
    """
    snapshot = metrics if isinstance(metrics, Snapshot) else Snapshot.model_validate(metrics)
    summary = (
        health
        if health is None or isinstance(health, HealthSummary)
        else HealthSummary.model_validate(health)
    )
    registry = CollectorRegistry()
    RelayCollector(lambda: snapshot, lambda: summary, registry=registry)
    return render_latest(registry)[0].decode()
