"""What the monitoring routes read: the collector, the health monitor and the registry."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client.registry import CollectorRegistry

from mlx_relay.monitoring.alerting.engine import AlertEngine
from mlx_relay.monitoring.alerting.views import AlertsView
from mlx_relay.monitoring.api.broadcast import SnapshotBroadcaster
from mlx_relay.monitoring.api.views import ClusterHealth, LiveUpdate, cluster_health
from mlx_relay.monitoring.health import HealthMonitor
from mlx_relay.monitoring.metrics import MetricsCollector
from mlx_relay.monitoring.snapshot import HealthSummary, Snapshot


@dataclass
class MonitoringContext:
    """The monitoring services one HTTP app serves.

    Args:
        collector: Source of the one snapshot.
        health: This process's health monitor; None reports no local checks.
        registry: The Prometheus registry ``/metrics`` renders.
        update_interval: Seconds between WebSocket updates; default: the collection interval.
        alerts: The alert engine, if alerting is on.
        max_websocket_clients: Live clients of ``/ws`` at once; None: no cap.
    """

    collector: MetricsCollector
    health: HealthMonitor | None
    registry: CollectorRegistry
    update_interval: float | None = None
    alerts: AlertEngine | None = None
    max_websocket_clients: int | None = None
    broadcaster: SnapshotBroadcaster = field(init=False)

    def __post_init__(self) -> None:
        interval = self.update_interval or self.collector.collection_interval
        self.broadcaster = SnapshotBroadcaster(
            self.live_update, interval, max_clients=self.max_websocket_clients
        )

    def snapshot(self) -> Snapshot:
        return self.collector.snapshot()

    def local_health(self) -> HealthSummary:
        if self.health is not None:
            return self.health.summary()
        snapshot_time = self.collector.snapshot().timestamp
        return HealthSummary(
            device_id=self.collector.device_id,
            timestamp=snapshot_time,
            overall_status="unknown",
            checks={},
            transitions=[],
        )

    def cluster_health(self, snapshot: Snapshot | None = None) -> ClusterHealth:
        return cluster_health(snapshot or self.snapshot(), self.local_health())

    def alerts_view(self) -> AlertsView:
        if self.alerts is not None:
            return self.alerts.view()
        return AlertsView(
            enabled=False,
            evaluation_interval_seconds=0.0,
            evaluated_at=None,
            firing=[],
            pending=[],
            resolved=[],
            rules=[],
            receivers=[],
        )

    def live_update(self, kind: str, sequence: int) -> str:
        """One WebSocket message as JSON text (built once per tick for every client)."""
        snapshot = self.snapshot()
        update = LiveUpdate.model_construct(
            type=kind,
            sequence=sequence,
            snapshot=snapshot,
            health=self.cluster_health(snapshot),
            alerts=self.alerts_view(),
        )
        return update.model_dump_json()
