"""Pushing alerts to a real Alertmanager's ``/api/v2/alerts``, the way Prometheus does.

A firing alert is (re)sent when it starts firing and then every ``resend_delay``; its
``endsAt`` lies a few evaluations ahead so Alertmanager resolves it by itself if we stop
sending. A resolved alert is sent once more with its real ``endsAt``. Routing, grouping,
silencing and deduplication then happen in Alertmanager.
"""

from __future__ import annotations

from typing import Any

from mlx_relay.monitoring.alerting.state import Alert, AlertState
from mlx_relay.monitoring.alerting.webhook import generator_url, rfc3339

DEFAULT_RESEND_DELAY = 60.0
API_PATH = "/api/v2/alerts"


def alertmanager_api_url(base_url: str) -> str:
    return base_url.rstrip("/") + API_PATH


def needs_sending(alert: Alert, now: float, resend_delay: float) -> bool:
    """Prometheus's rule: never pending ones; resolved ones once; firing ones periodically."""
    if alert.state == AlertState.PENDING:
        return False
    if alert.last_sent_at is None:
        return True
    if alert.resolved_at is not None and alert.resolved_at > alert.last_sent_at:
        return True
    if alert.state != AlertState.FIRING:
        return False
    return alert.last_sent_at + resend_delay <= now


def alertmanager_batch(
    alerts: list[Alert],
    now: float,
    *,
    evaluation_interval: float,
    external_url: str = "",
    resend_delay: float = DEFAULT_RESEND_DELAY,
) -> list[dict[str, Any]]:
    """The postable alerts due at ``now``; marks each one as sent."""
    valid_for = 4 * max(resend_delay, evaluation_interval)
    batch: list[dict[str, Any]] = []
    for alert in alerts:
        if not needs_sending(alert, now, resend_delay):
            continue
        ends_at = alert.resolved_at if alert.resolved_at is not None else now + valid_for
        batch.append(
            {
                "labels": dict(alert.labels),
                "annotations": dict(alert.annotations),
                "startsAt": rfc3339(alert.active_at),
                "endsAt": rfc3339(ends_at),
                "generatorURL": generator_url(external_url, alert),
            }
        )
        alert.last_sent_at = now
    return batch
