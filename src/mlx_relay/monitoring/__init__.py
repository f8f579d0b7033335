"""The monitoring system: collectors, health checks, dashboard and Prometheus export.

Depends only on :mod:`mlx_relay.core`; the pipeline calls into it through a narrow
recording API.
"""

from mlx_relay.monitoring.health import HealthCheck, HealthMonitor
from mlx_relay.monitoring.health_rules import HealthStatus, PeerState
from mlx_relay.monitoring.inference import RequestTrace
from mlx_relay.monitoring.metrics import MetricsCollector
from mlx_relay.monitoring.snapshot import HealthSummary, Snapshot

__all__ = [
    "HealthCheck",
    "HealthMonitor",
    "HealthStatus",
    "HealthSummary",
    "MetricsCollector",
    "PeerState",
    "RequestTrace",
    "Snapshot",
]
