"""The alerting families of ``/metrics``: ``mlxrelay_alerts`` and the notification counters."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from mlx_relay.monitoring.alerting.delivery import OUTCOMES
from mlx_relay.monitoring.alerting.engine import AlertEngine
from mlx_relay.monitoring.alerting.state import AlertState

PREFIX = "mlxrelay_"
ALERT_STATES = (AlertState.PENDING, AlertState.FIRING)


def alert_families(engine: AlertEngine) -> Iterator[Metric]:
    """Alert counts by (alertname, severity, state), 0 for every rule's known states."""
    alerts = GaugeMetricFamily(
        PREFIX + "alerts",
        "Active alerts of each rule by state (pending, firing), like Prometheus's ALERTS.",
        labels=["alertname", "severity", "state"],
    )
    counts: dict[tuple[str, str, str], int] = {}
    for rule in engine.rules:
        for state in ALERT_STATES:
            counts[(rule.name, rule.labels.get("severity", ""), state.value)] = 0
    for alert in engine.alerts():
        if alert.state in ALERT_STATES:
            key = (alert.rule, alert.severity, alert.state.value)
            counts[key] = counts.get(key, 0) + 1
    for labels, count in sorted(counts.items()):
        alerts.add_metric(list(labels), count)
    yield alerts
    notifications = CounterMetricFamily(
        PREFIX + "alert_notifications",
        "Alert notifications by receiver and outcome (sent, failed, dropped).",
        labels=["receiver", "outcome"],
    )
    for queue in engine.queues:
        for outcome in OUTCOMES:
            notifications.add_metric([queue.name, outcome], queue.counts[outcome])
    yield notifications


class AlertsCollector(Collector):
    """Adds :func:`alert_families` to a registry's scrape."""

    def __init__(self, engine: AlertEngine, *, registry: CollectorRegistry | None = None) -> None:
        self._engine = engine
        if registry is not None:
            registry.register(self)

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield from alert_families(self._engine)
