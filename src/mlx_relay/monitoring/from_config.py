"""A process's collector and health monitor, built from the config's ``monitoring`` section.

The coordinator, each worker and the standalone dashboard build theirs the same way.
"""

from __future__ import annotations

from mlx_relay.core.config import MonitoringConfig
from mlx_relay.monitoring.health import HealthMonitor
from mlx_relay.monitoring.metrics import MetricsCollector


def collector_from_config(
    device_id: str, role: str, settings: MonitoringConfig, *, model_name: str | None = None
) -> MetricsCollector:
    """A :class:`MetricsCollector` sampling every ``settings.collection_interval`` seconds."""
    return MetricsCollector(
        device_id,
        settings.collection_interval,
        role=role,
        retention_seconds=settings.retention_seconds,
        model_name=model_name,
    )


def health_monitor_from_config(
    device_id: str, settings: MonitoringConfig, collector: MetricsCollector
) -> HealthMonitor:
    """A :class:`HealthMonitor` with the configured thresholds, reading ``collector``."""
    return HealthMonitor(
        device_id,
        thresholds=settings.thresholds,
        metrics_collector=collector,
        check_interval=settings.health_check_interval,
    )
