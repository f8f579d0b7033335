"""Response models of ``GET /api/alerts`` (also pushed over the WebSocket)."""

from __future__ import annotations

import math

from pydantic import BaseModel, Field

from mlx_relay.monitoring.alerting.state import Alert


class AlertInfo(BaseModel):
    """One alert instance: one label set of one rule."""

    alertname: str = Field(description="The rule's `alert` name.")
    state: str = Field(description="pending|firing|resolved.")
    severity: str = Field(description="The rule's severity label (info|warning|critical).")
    labels: dict[str, str] = Field(description="Series labels plus the rule's labels.")
    annotations: dict[str, str] = Field(description="summary/description, templates expanded.")
    value: float | None = Field(description="The expression's value at the last evaluation.")
    active_at: float = Field(description="When it became pending, unix seconds.")
    fired_at: float | None = Field(default=None, description="When it started firing.")
    resolved_at: float | None = Field(default=None, description="When it resolved.")


class RuleInfo(BaseModel):
    """One loaded rule."""

    alertname: str
    severity: str
    expr: str = Field(description="PromQL, thresholds filled in.")
    for_seconds: float
    keep_firing_for_seconds: float
    last_error: str | None = Field(default=None, description="Why the last evaluation failed.")


class DeliveryInfo(BaseModel):
    """One notification destination: a webhook receiver or the Alertmanager push."""

    receiver: str
    url: str
    sent: int = Field(description="Notifications delivered (2xx).")
    failed: int = Field(description="Notifications that failed every attempt.")
    dropped: int = Field(description="Notifications dropped because the queue was full.")
    queued: int = Field(description="Notifications waiting now.")
    last_error: str | None = None


class AlertsView(BaseModel):
    """``GET /api/alerts``: what is firing, what is pending, what resolved recently."""

    enabled: bool = Field(description="False when alerting is off in the configuration.")
    evaluation_interval_seconds: float
    evaluated_at: float | None = Field(description="Last evaluation, unix seconds.")
    firing: list[AlertInfo] = Field(description="Firing alerts, most severe first.")
    pending: list[AlertInfo] = Field(description="Active, waiting for their rule's `for`.")
    resolved: list[AlertInfo] = Field(description="Recently resolved, newest first (bounded).")
    rules: list[RuleInfo]
    receivers: list[DeliveryInfo]


SEVERITY_ORDER = {"critical": 0, "warning": 1, "info": 2}


def alert_info(alert: Alert, state: str) -> AlertInfo:
    return AlertInfo(
        alertname=alert.rule,
        state=state,
        severity=alert.severity,
        labels=dict(alert.labels),
        annotations=dict(alert.annotations),
        value=alert.value if math.isfinite(alert.value) else None,
        active_at=alert.active_at,
        fired_at=alert.fired_at,
        resolved_at=alert.resolved_at,
    )


def by_severity(alerts: list[AlertInfo]) -> list[AlertInfo]:
    return sorted(
        alerts, key=lambda a: (SEVERITY_ORDER.get(a.severity, 3), a.active_at, a.alertname)
    )
