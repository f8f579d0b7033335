"""Grouping alerts into Alertmanager-v4 webhook notifications, with Alertmanager's timings.

Alerts with the same values of ``group_by`` form a group. A new group is notified after
``group_wait`` (sooner if an alert is already older than that), then looked at every
``group_interval``: it is notified when a firing alert joined since the last notification,
when all its alerts resolved, when an alert resolved and ``send_resolved`` is on, or when
``repeat_interval`` passed with alerts still firing. Resolved alerts leave the group once
notified. Time is an argument, so all of it runs on a fake clock in tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from mlx_relay.core.alerting_config import ReceiverConfig
from mlx_relay.monitoring.alerting.state import Alert, AlertState

ZERO_TIME = "0001-01-01T00:00:00Z"
ALL_LABELS = "..."


def rfc3339(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


def fingerprint(labels: dict[str, str]) -> str:
    """16 hex digits of an FNV-1a 64 hash over the sorted labels, as Alertmanager shows."""
    value = 0xCBF29CE484222325
    for name, label in sorted(labels.items()):
        for part in (name, label):
            for byte in part.encode() + b"\xff":
                value ^= byte
                value = (value * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{value:016x}"


def group_key(group_labels: dict[str, str]) -> str:
    """The group's key as Alertmanager writes it for its root route: ``{}:{alertname="X"}``."""
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(group_labels.items()))
    return "{}:{" + inner + "}"


def generator_url(external_url: str, alert: Alert) -> str:
    return f"{external_url.rstrip('/')}/api/alerts" if external_url else ""


def alert_json(alert: Alert, external_url: str) -> dict[str, Any]:
    """One entry of a v4 payload's ``alerts``."""
    firing = alert.state == AlertState.FIRING
    return {
        "status": "firing" if firing else "resolved",
        "labels": dict(alert.labels),
        "annotations": dict(alert.annotations),
        "startsAt": rfc3339(alert.active_at),
        "endsAt": ZERO_TIME if firing or alert.resolved_at is None else rfc3339(alert.resolved_at),
        "generatorURL": generator_url(external_url, alert),
        "fingerprint": fingerprint(alert.labels),
    }


def _common(maps: list[dict[str, str]]) -> dict[str, str]:
    if not maps:
        return {}
    common = dict(maps[0])
    for other in maps[1:]:
        common = {k: v for k, v in common.items() if other.get(k) == v}
    return common


def webhook_payload(
    receiver: str,
    group_key: str,
    group_labels: dict[str, str],
    alerts: list[Alert],
    external_url: str,
) -> dict[str, Any]:
    """An Alertmanager webhook body, version 4."""
    entries = [alert_json(a, external_url) for a in alerts]
    firing = any(e["status"] == "firing" for e in entries)
    return {
        "version": "4",
        "groupKey": group_key,
        "truncatedAlerts": 0,
        "status": "firing" if firing else "resolved",
        "receiver": receiver,
        "groupLabels": dict(group_labels),
        "commonLabels": _common([e["labels"] for e in entries]),
        "commonAnnotations": _common([e["annotations"] for e in entries]),
        "externalURL": external_url,
        "alerts": entries,
    }


@dataclass
class AlertGroup:
    """One aggregation group of one receiver."""

    key: str
    labels: dict[str, str]
    next_flush: float
    alerts: dict[str, Alert] = field(default_factory=dict)
    sent_firing: set[str] | None = None
    sent_resolved: set[str] = field(default_factory=set)
    last_sent_at: float | None = None
    flushed: bool = False


class WebhookGrouper:
    """The aggregation groups of one receiver.

    Args:
        receiver: Its grouping and timing settings.
        external_url: Where the alerts can be seen (``externalURL`` and ``generatorURL``).
    """

    def __init__(self, receiver: ReceiverConfig, external_url: str = "") -> None:
        self.receiver = receiver
        self.external_url = external_url
        self.groups: dict[str, AlertGroup] = {}

    def _group_labels(self, labels: dict[str, str]) -> dict[str, str]:
        if ALL_LABELS in self.receiver.group_by:
            return dict(labels)
        return {name: labels[name] for name in self.receiver.group_by if name in labels}

    def observe(self, alerts: list[Alert], now: float) -> None:
        """Take in the engine's firing and resolved alerts after an evaluation."""
        for alert in alerts:
            if alert.state == AlertState.PENDING:
                continue
            labels = self._group_labels(alert.labels)
            key = group_key(labels)
            fp = fingerprint(alert.labels)
            group = self.groups.get(key)
            if alert.state != AlertState.FIRING:
                # A resolved alert matters only to a group that knew it while it fired.
                if group is not None and fp in group.alerts:
                    group.alerts[fp] = alert
                continue
            if group is None:
                group = AlertGroup(key, labels, now + self.receiver.group_wait)
                self.groups[key] = group
            if not group.flushed and alert.active_at + self.receiver.group_wait < now:
                group.next_flush = min(group.next_flush, now)
            group.alerts[fp] = alert

    def flush(self, now: float) -> list[dict[str, Any]]:
        """The notifications due at ``now`` (each a v4 payload), updating the groups."""
        payloads: list[dict[str, Any]] = []
        for key, group in list(self.groups.items()):
            if group.next_flush > now:
                continue
            payload = self._flush_group(group, now)
            if payload is not None:
                payloads.append(payload)
            group.next_flush = now + self.receiver.group_interval
            group.flushed = True
            if not group.alerts:
                del self.groups[key]
        return payloads

    def _flush_group(self, group: AlertGroup, now: float) -> dict[str, Any] | None:
        firing = {fp for fp, a in group.alerts.items() if a.state == AlertState.FIRING}
        resolved = set(group.alerts) - firing
        payload = None
        if self._needs_update(group, firing, resolved, now):
            chosen = sorted(
                (
                    a
                    for fp, a in group.alerts.items()
                    if fp in firing or self.receiver.send_resolved
                ),
                key=lambda a: a.label_set,
            )
            if chosen:
                payload = webhook_payload(
                    self.receiver.name, group.key, group.labels, chosen, self.external_url
                )
            group.sent_firing = firing
            group.sent_resolved = resolved
            group.last_sent_at = now
        for fp in resolved:
            del group.alerts[fp]
        return payload

    def _needs_update(
        self, group: AlertGroup, firing: set[str], resolved: set[str], now: float
    ) -> bool:
        if group.sent_firing is None:
            return bool(firing)
        if not firing <= group.sent_firing:
            return True
        if not firing:
            return bool(group.sent_firing)
        if self.receiver.send_resolved and not resolved <= group.sent_resolved:
            return True
        assert group.last_sent_at is not None
        return group.last_sent_at + self.receiver.repeat_interval <= now
