"""One rule's alerts, one per label set: inactive -> pending -> firing -> resolved.

The state machine is Prometheus's (``rules/alerting.go``): a label set that appears in the
result is pending, and firing once it has been active for the rule's ``for``; a pending alert
that leaves the result is dropped; a firing one that leaves the result keeps firing for
``keep_firing_for`` (counted from the first evaluation it was missing), then is resolved and
kept as resolved for ``resolved_retention`` so notifiers can report it. Time is an argument
(unix seconds), so every transition can be tested on a fake clock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from mlx_relay.monitoring.alerting.rules import AlertRule
from mlx_relay.monitoring.alerting.samples import NAME, LabelSet, Sample
from mlx_relay.monitoring.alerting.templates import expand

DEFAULT_RESOLVED_RETENTION = 900.0


class AlertState(enum.StrEnum):
    INACTIVE = "inactive"
    PENDING = "pending"
    FIRING = "firing"


@dataclass
class Alert:
    """One label set of one rule. ``resolved_at`` is set (and state inactive) once resolved."""

    rule: str
    labels: dict[str, str]
    annotations: dict[str, str]
    state: AlertState
    value: float
    active_at: float
    fired_at: float | None = None
    resolved_at: float | None = None
    keep_firing_since: float | None = None
    last_sent_at: float | None = None

    @property
    def severity(self) -> str:
        return self.labels.get("severity", "")

    @property
    def label_set(self) -> LabelSet:
        return tuple(sorted(self.labels.items()))


@dataclass(frozen=True)
class Transition:
    """An alert changing state at one evaluation."""

    alert: Alert
    from_state: AlertState
    to_state: AlertState
    at: float


@dataclass
class RuleState:
    """The alerts of one rule, keyed by their label set."""

    rule: AlertRule
    resolved_retention: float = DEFAULT_RESOLVED_RETENTION
    active: dict[LabelSet, Alert] = field(default_factory=dict)

    def evaluate(self, result: list[Sample], now: float) -> list[Transition]:
        """Apply one evaluation's result vector at ``now``; returns the transitions."""
        rule = self.rule
        transitions: list[Transition] = []
        seen: set[LabelSet] = set()
        for sample in result:
            labels = {k: v for k, v in sample.labels if k != NAME}
            template_labels = dict(labels)
            labels.update(rule.labels)
            labels["alertname"] = rule.name
            annotations = {
                key: expand(text, template_labels, sample.value)
                for key, text in rule.annotations.items()
            }
            key = tuple(sorted(labels.items()))
            seen.add(key)
            alert = self.active.get(key)
            if alert is not None and alert.state != AlertState.INACTIVE:
                alert.value = sample.value
                alert.annotations = annotations
                alert.keep_firing_since = None
                continue
            self.active[key] = Alert(
                rule=rule.name,
                labels=labels,
                annotations=annotations,
                state=AlertState.PENDING,
                value=sample.value,
                active_at=now,
            )
            transitions.append(
                Transition(self.active[key], AlertState.INACTIVE, AlertState.PENDING, now)
            )
        for key, alert in list(self.active.items()):
            if key not in seen:
                transitions.extend(self._missing(key, alert, now))
            elif alert.state == AlertState.PENDING and now - alert.active_at >= rule.for_seconds:
                alert.state = AlertState.FIRING
                alert.fired_at = now
                transitions.append(Transition(alert, AlertState.PENDING, AlertState.FIRING, now))
        return transitions

    def _missing(self, key: LabelSet, alert: Alert, now: float) -> list[Transition]:
        if alert.state == AlertState.PENDING:
            del self.active[key]
            return [Transition(alert, AlertState.PENDING, AlertState.INACTIVE, now)]
        if alert.state == AlertState.FIRING:
            if self.rule.keep_firing_for_seconds > 0:
                if alert.keep_firing_since is None:
                    alert.keep_firing_since = now
                if now - alert.keep_firing_since < self.rule.keep_firing_for_seconds:
                    return []
            alert.state = AlertState.INACTIVE
            alert.resolved_at = now
            return [Transition(alert, AlertState.FIRING, AlertState.INACTIVE, now)]
        if alert.resolved_at is not None and now - alert.resolved_at > self.resolved_retention:
            del self.active[key]
        return []

    def alerts(self) -> list[Alert]:
        return list(self.active.values())
