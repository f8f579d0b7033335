"""Built-in alerting: Prometheus-style rules over our own metric families, per-label-set
alert states, Alertmanager-v4 webhooks and an optional push to a real Alertmanager.

Reference: docs/monitoring-api.md (``GET /api/alerts``, the ``alerting:`` section).
"""

from mlx_relay.monitoring.alerting.engine import AlertEngine
from mlx_relay.monitoring.alerting.factory import build_alert_engine
from mlx_relay.monitoring.alerting.rules import AlertRule, configured_rules

__all__ = ["AlertEngine", "AlertRule", "build_alert_engine", "configured_rules"]
