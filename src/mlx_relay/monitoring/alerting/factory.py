"""Builds the alert engine of a process from its configuration and monitoring services."""

from __future__ import annotations

from mlx_relay import __version__
from mlx_relay.core.config import ClusterConfig
from mlx_relay.monitoring.alerting.engine import AlertEngine
from mlx_relay.monitoring.alerting.rules import AlertRule, configured_rules
from mlx_relay.monitoring.alerting.samples import Instant, instant_from_families
from mlx_relay.monitoring.health import HealthMonitor
from mlx_relay.monitoring.metrics import MetricsCollector
from mlx_relay.monitoring.prometheus_families import snapshot_families


def build_alert_engine(
    config: ClusterConfig,
    collector: MetricsCollector,
    health: HealthMonitor | None,
    *,
    rules: list[AlertRule] | None = None,
) -> AlertEngine:
    """An (unstarted) engine over the same families ``/metrics`` serves; ``rules`` default
    to :func:`configured_rules`.

    Raises:
        ConfigError: The rules file or a rule is invalid.
    """

    def sample_source(wanted: frozenset[str] | None) -> Instant:
        summary = health.summary() if health is not None else None
        families = snapshot_families(collector.snapshot(), summary, __version__)
        return instant_from_families(families, wanted)

    if rules is None:
        rules = configured_rules(config.alerting, config.inference)
    return AlertEngine(rules, sample_source, config=config.alerting)
