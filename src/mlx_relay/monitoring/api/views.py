"""Response models of the monitoring API and the pure functions that build them.

Every view is cut from the one :class:`Snapshot` (plus the health summary), so the REST API,
the WebSocket and ``/metrics`` always agree. Units as in the snapshot: seconds, bytes, ratios
in 0..1, unix-second timestamps. No prompt or completion text appears anywhere.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from mlx_relay.monitoring.alerting.views import AlertsView
from mlx_relay.monitoring.device_state import device_health_state
from mlx_relay.monitoring.health_rules import HealthStatus, worst_status
from mlx_relay.monitoring.snapshot import (
    CheckResultSnap,
    DeviceStatus,
    HealthSummary,
    HealthTransition,
    HistoryPoint,
    LatencySummary,
    LinkMetrics,
    ModelInfoSnap,
    RecentError,
    Snapshot,
    StageMetrics,
    StageOccupancy,
    ThroughputWindow,
)

_STATES = frozenset(s.value for s in HealthStatus)


class DeviceHealth(BaseModel):
    """One device's health as the coordinator sees it."""

    device_id: str = Field(description="Device id from the cluster configuration.")
    role: str | None = Field(None, description="'coordinator' or 'worker'.")
    stage: int | None = Field(None, description="Pipeline stage of a worker.")
    status: str = Field(description="healthy|warning|critical|unknown; critical when down.")
    health_status: str | None = Field(None, description="The device's own overall verdict.")
    up: bool | None = Field(None, description="Answered the last status poll.")
    last_seen_timestamp: float | None = Field(None, description="Unix seconds.")
    last_error: str | None = Field(None, description="Last poll or RPC error.")


class ClusterHealth(BaseModel):
    """``GET /api/health``: this process's checks plus each device's status."""

    device_id: str = Field(description="The process serving this API.")
    timestamp: float = Field(description="Unix seconds.")
    overall_status: str = Field(
        description="Worst of local_status and every device's status (down counts critical)."
    )
    local_status: str = Field(description="Worst of this process's own checks.")
    checks: dict[str, CheckResultSnap] = Field(description="This process's checks by name.")
    transitions: list[HealthTransition] = Field(description="Recent check changes, newest last.")
    devices: list[DeviceHealth] = Field(description="Every known device, in pipeline order.")


class DevicesResponse(BaseModel):
    """``GET /api/devices``: the cluster view in pipeline order, and the links between."""

    timestamp: float = Field(description="Snapshot time, unix seconds.")
    devices: list[DeviceStatus] = Field(
        description="Coordinator first, then workers by stage; resources in `metrics`."
    )
    links: list[LinkMetrics] = Field(description="Links from this device: RTT, bytes, errors.")


class ThroughputResponse(BaseModel):
    """``GET /api/throughput``: rates now and their recent history."""

    timestamp: float = Field(description="Snapshot time, unix seconds.")
    requests_per_second: float = Field(description="Finished requests per second, last 10 s.")
    tokens_per_second: float = Field(description="Generated tokens per second, last 10 s.")
    prompt_tokens_per_second: float = Field(description="Prompt tokens per second, last 10 s.")
    windows: dict[str, ThroughputWindow] = Field(description="Rates keyed '10s' and '60s'.")
    requests_total: int = Field(description="Requests admitted since start.")
    generation_tokens_total: int = Field(description="Tokens generated since start.")
    history: list[HistoryPoint] = Field(description="One point per collection, oldest first.")


class StageSummary(BaseModel):
    """One stage's compute, without histogram buckets."""

    device_id: str = Field(description="Worker holding the stage.")
    stage: int | None = Field(None, description="Stage index, 0 = first.")
    busy_seconds_total: float = Field(description="Total forward compute time, seconds.")
    utilization_ratio_10s: float | None = Field(None, description="Busy share, last 10 s, 0..1.")
    steps_total: dict[str, int] = Field(description="Forward calls by phase.")
    tokens_total: dict[str, int] = Field(description="Tokens processed by phase.")
    forward_seconds: dict[str, LatencySummary] = Field(
        description="Recent forward time by phase, seconds."
    )
    kv_sessions: int = Field(description="Live KV-cache sessions.")
    is_bottleneck: bool = Field(description="The stage with the most compute time.")
    batch_size_mean: float | None = Field(
        None, description="Requests per Forward over the last 10 s (coordinator's view)."
    )
    batch_size_last: int | None = Field(None, description="Requests in the latest Forward.")
    microbatches_in_flight: int | None = Field(
        None, description="Forward calls outstanding on the stage now."
    )
    bubble_ratio: float | None = Field(
        None,
        description="Share of the last 10 s the stage computed nothing while requests were held.",
    )


class StatsResponse(BaseModel):
    """``GET /api/stats``: request totals, latency percentiles, errors and stage compute."""

    timestamp: float = Field(description="Snapshot time, unix seconds.")
    uptime_seconds: float = Field(description="Seconds since the collector was created.")
    model: ModelInfoSnap | None = Field(default=None, description="Served model, once known.")
    requests_total: int = Field(description="Requests admitted since start.")
    requests_running: int = Field(description="Requests admitted and not yet finished.")
    requests_waiting: int = Field(description="Requests queued for admission.")
    requests_finished_total: int = Field(description="Succeeded plus failed requests.")
    success_total: dict[str, int] = Field(description="By finished_reason.")
    failure_total: dict[str, int] = Field(description="By error_type.")
    error_rate: float | None = Field(
        None, description="Failed / finished since start, 0..1; None before the first."
    )
    error_rates: dict[str, float | None] = Field(description="Error rate per window ('10s'...).")
    prompt_tokens_total: int = Field(description="Prompt tokens of admitted requests.")
    generation_tokens_total: int = Field(description="Tokens generated since start.")
    latency: dict[str, LatencySummary] = Field(
        description="Seconds, keyed e2e, ttft, inter_token, time_per_output_token, queue, "
        "prefill, decode, stage, network."
    )
    stages: list[StageSummary] = Field(description="In pipeline order.")
    bottleneck_device: str | None = Field(None, description="Stage with the most compute.")
    recent_errors: list[RecentError] = Field(description="Newest last; no request text.")


class LiveUpdate(BaseModel):
    """One WebSocket message: the full snapshot and the cluster health."""

    type: Literal["snapshot", "update"] = Field(
        description="'snapshot' on connect, 'update' on each collection interval."
    )
    sequence: int = Field(description="Broadcast tick; a gap means this client missed updates.")
    snapshot: Snapshot
    health: ClusterHealth
    alerts: AlertsView | None = Field(default=None, description="As GET /api/alerts returns.")


def worst(states: list[str]) -> str:
    """The most severe of some health states, ranked as the health monitor ranks them."""
    return worst_status(HealthStatus(s) if s in _STATES else HealthStatus.UNKNOWN for s in states)


def ordered_devices(snapshot: Snapshot) -> list[DeviceStatus]:
    """The cluster view in pipeline order: coordinator (or dashboard), then workers by stage."""
    devices = dict(snapshot.devices)
    if snapshot.device_id not in devices:
        devices[snapshot.device_id] = DeviceStatus(
            device_id=snapshot.device_id,
            role=snapshot.role,
            up=True,
            last_seen_timestamp=snapshot.timestamp,
            metrics=snapshot.device,
        )

    def key(device: DeviceStatus) -> tuple[int, int, str]:
        if device.role == "coordinator":
            return (0, 0, device.device_id)
        if device.stage is not None:
            return (2, device.stage, device.device_id)
        # A standalone dashboard sits where a coordinator would; unplaced workers go last.
        return (3 if device.role == "worker" else 1, 0, device.device_id)

    return sorted(devices.values(), key=key)


def cluster_health(snapshot: Snapshot, local: HealthSummary) -> ClusterHealth:
    devices = [
        DeviceHealth(
            device_id=d.device_id,
            role=d.role,
            stage=d.stage,
            status=local.overall_status
            if d.device_id == local.device_id
            else device_health_state(d, snapshot.device_id),
            health_status=d.health_status,
            up=True if d.device_id == snapshot.device_id else d.up,
            last_seen_timestamp=d.last_seen_timestamp,
            last_error=d.last_error,
        )
        for d in ordered_devices(snapshot)
    ]
    return ClusterHealth(
        device_id=local.device_id,
        timestamp=local.timestamp,
        overall_status=worst([local.overall_status, *(d.status for d in devices)]),
        local_status=local.overall_status,
        checks=local.checks,
        transitions=local.transitions,
        devices=devices,
    )


def devices_view(snapshot: Snapshot) -> DevicesResponse:
    return DevicesResponse(
        timestamp=snapshot.timestamp,
        devices=ordered_devices(snapshot),
        links=snapshot.network.links,
    )


def throughput_view(snapshot: Snapshot) -> ThroughputResponse:
    inference = snapshot.inference
    short = inference.windows.get("10s")
    return ThroughputResponse(
        timestamp=snapshot.timestamp,
        requests_per_second=short.requests_per_second if short else 0.0,
        tokens_per_second=short.tokens_per_second if short else 0.0,
        prompt_tokens_per_second=short.prompt_tokens_per_second if short else 0.0,
        windows=inference.windows,
        requests_total=inference.requests_total,
        generation_tokens_total=inference.generation_tokens_total,
        history=snapshot.history,
    )


def ordered_stages(snapshot: Snapshot) -> list[StageMetrics]:
    order = {d.device_id: i for i, d in enumerate(ordered_devices(snapshot))}

    def key(stage: StageMetrics) -> tuple[int, int, str]:
        index = stage.stage if stage.stage is not None else 1 << 30
        return (index, order.get(stage.device_id, 1 << 30), stage.device_id)

    return sorted(snapshot.stages.values(), key=key)


def stats_view(snapshot: Snapshot) -> StatsResponse:
    inference = snapshot.inference
    stages = ordered_stages(snapshot)
    busiest = max(stages, key=lambda s: s.busy_seconds_total, default=None)
    bottleneck = busiest.device_id if busiest and busiest.busy_seconds_total > 0 else None
    succeeded = sum(inference.success_total.values())
    failed = sum(inference.failure_total.values())
    finished = succeeded + failed
    return StatsResponse(
        timestamp=snapshot.timestamp,
        uptime_seconds=snapshot.uptime_seconds,
        model=snapshot.model,
        requests_total=inference.requests_total,
        requests_running=inference.requests_running,
        requests_waiting=inference.requests_waiting,
        requests_finished_total=finished,
        success_total=inference.success_total,
        failure_total=inference.failure_total,
        error_rate=failed / finished if finished else None,
        error_rates={name: w.error_rate for name, w in inference.windows.items()},
        prompt_tokens_total=inference.prompt_tokens_total,
        generation_tokens_total=inference.generation_tokens_total,
        latency=inference.latency,
        stages=[
            StageSummary(
                device_id=s.device_id,
                stage=s.stage,
                busy_seconds_total=s.busy_seconds_total,
                utilization_ratio_10s=s.utilization_ratio_10s,
                steps_total=s.steps_total,
                tokens_total=s.tokens_total,
                forward_seconds=s.forward_seconds,
                kv_sessions=s.kv_sessions,
                is_bottleneck=s.device_id == bottleneck,
                **_occupancy_fields(snapshot.occupancy.get(s.device_id)),
            )
            for s in stages
        ],
        bottleneck_device=bottleneck,
        recent_errors=inference.recent_errors,
    )


def _occupancy_fields(occupancy: StageOccupancy | None) -> dict[str, Any]:
    if occupancy is None:
        return {}
    return {
        "batch_size_mean": occupancy.batch_size_mean,
        "batch_size_last": occupancy.batch_size_last,
        "microbatches_in_flight": occupancy.microbatches_in_flight,
        "bubble_ratio": occupancy.bubble_ratio,
    }
