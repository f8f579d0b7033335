"""The ``alerting:`` section of the cluster configuration: thresholds of the stock rules,
webhook receivers, Alertmanager (docs/monitoring-api.md, "Alerting")."""

from __future__ import annotations

import re

from pydantic import Field, field_validator, model_validator

from mlx_relay.core.validation import ConfigSection, FieldProblem


def _http_url(value: str) -> str:
    if not re.fullmatch(r"https?://[^\s/]+\S*", value):
        raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
    return value


class AlertThresholds(ConfigSection):
    """What the stock alerting rules compare against (ratios in 0..1, times in seconds)."""

    stage_down_seconds: float = Field(default=10.0, ge=0)
    stage_unreachable_seconds: float = Field(default=30.0, ge=0)
    bottleneck_ratio: float = Field(default=3.0, gt=1)
    bottleneck_min_utilization: float = Field(default=0.5, ge=0, le=1)
    ttft_p95_seconds: float = Field(default=5.0, gt=0)
    error_rate_warning: float = Field(default=0.05, gt=0, le=1)
    error_rate_critical: float = Field(default=0.20, gt=0, le=1)
    waiting_seconds: float = Field(default=60.0, ge=0)
    memory_fire_ratio: float = Field(default=0.85, gt=0, le=1)
    memory_clear_ratio: float = Field(default=0.75, gt=0, le=1)
    kv_sessions_ratio: float = Field(default=0.9, gt=0, le=1)
    link_rtt_p99_seconds: float = Field(default=0.25, gt=0)
    stall_seconds: float = Field(default=30.0, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> AlertThresholds:
        if self.memory_clear_ratio > self.memory_fire_ratio:
            raise ValueError("memory_clear_ratio must not exceed memory_fire_ratio")
        if self.error_rate_warning > self.error_rate_critical:
            raise ValueError("error_rate_warning must not exceed error_rate_critical")
        return self


class ReceiverConfig(ConfigSection):
    """A webhook that receives Alertmanager-v4 JSON; timings as Alertmanager's route has them
    (seconds). A delivery is tried ``max_attempts`` times, waiting ``retry_backoff`` seconds,
    doubled each time; at most ``queue_size`` notifications wait, the oldest is dropped."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    url: str
    send_resolved: bool = True
    group_by: list[str] = Field(default_factory=lambda: ["alertname"])
    group_wait: float = Field(default=30.0, ge=0)
    group_interval: float = Field(default=300.0, gt=0)
    repeat_interval: float = Field(default=14400.0, gt=0)
    timeout: float = Field(default=10.0, gt=0)
    max_attempts: int = Field(default=3, ge=1, le=20)
    retry_backoff: float = Field(default=1.0, ge=0)
    queue_size: int = Field(default=64, ge=1, le=10000)

    _check_url = field_validator("url")(lambda cls, value: _http_url(value))


class AlertingConfig(ConfigSection):
    """Built-in alerting: rules evaluated every ``evaluation_interval`` seconds on the
    coordinator. ``rules_file`` replaces the stock rules (a Prometheus rule file)."""

    enabled: bool = True
    evaluation_interval: float = Field(default=10.0, gt=0, le=3600)
    rules_file: str | None = None
    thresholds: AlertThresholds = Field(default_factory=AlertThresholds)
    receivers: list[ReceiverConfig] = Field(default_factory=list)
    alertmanager_url: str | None = None
    resolved_retention: float = Field(default=900.0, gt=0)
    external_url: str | None = None

    @field_validator("alertmanager_url")
    @classmethod
    def _check_alertmanager_url(cls, value: str | None) -> str | None:
        return None if value is None else _http_url(value)

    @model_validator(mode="after")
    def _unique_receivers(self) -> AlertingConfig:
        names = [r.name for r in self.receivers]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise FieldProblem(f"alerting.receivers[{i}].name", f"duplicate {name!r}")
        return self
