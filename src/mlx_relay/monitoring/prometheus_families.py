"""Pure mapping of one :class:`Snapshot` (and health summary) to Prometheus metric families.

Names, types, labels and buckets follow docs/monitoring-api.md. Every family is emitted even
when it has no samples yet, and known label sets (finished reasons, phases, link outcomes,
health states) are emitted with 0 so that series exist from start-up. A quantity that was not
measured (``None`` in the snapshot) has no sample: never a made-up 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from mlx_relay.monitoring.device_state import device_health_state
from mlx_relay.monitoring.snapshot import (
    FINISHED_REASONS,
    LINK_OUTCOMES,
    PHASES,
    DeviceMetrics,
    HealthSummary,
    HistogramSnap,
    Snapshot,
)

PREFIX = "mlxrelay_"
HEALTH_STATES = ("healthy", "warning", "critical", "unknown")
OVERALL_CHECK = "overall"
GRPC_SERVICE = "mlxrelay.v1.Worker"

# Inference histograms: snapshot key (the family's name without prefix) -> help text.
INFERENCE_HISTOGRAMS = {
    "time_to_first_token_seconds": "Time from request arrival to its first generated token.",
    "inter_token_latency_seconds": "Time between two consecutive generated tokens.",
    "request_time_per_output_token_seconds": "Decode time divided by generated tokens - 1.",
    "e2e_request_latency_seconds": "Time from request arrival to its last token.",
    "request_queue_time_seconds": "Time a request waited before prefill began.",
    "request_prefill_time_seconds": "Time from the start of prefill to the first token.",
    "request_decode_time_seconds": "Time from the first token to the last.",
    "recovery_seconds": "Pause of a request's stream from a stage failure to its next token.",
    "request_prompt_tokens": "Prompt length of finished requests, in tokens.",
    "request_generation_tokens": "Generated length of finished requests, in tokens.",
}

# Device gauges: DeviceMetrics field -> (metric name without prefix, help).
DEVICE_GAUGES = {
    "cpu_utilization_ratio": ("device_cpu_utilization_ratio", "Busy share of all CPU cores."),
    "memory_used_bytes": ("device_memory_used_bytes", "Memory in use (total - available)."),
    "memory_available_bytes": (
        "device_memory_available_bytes",
        "Memory available without swapping.",
    ),
    "memory_total_bytes": ("device_memory_total_bytes", "Physical memory."),
    "process_resident_memory_bytes": (
        "device_process_resident_memory_bytes",
        "Resident set size of the mlx-relay process.",
    ),
    "disk_used_ratio": ("device_disk_used_ratio", "Used share of the data filesystem."),
    "mlx_memory_active_bytes": ("device_mlx_memory_active_bytes", "MLX active memory."),
    "mlx_memory_peak_bytes": ("device_mlx_memory_peak_bytes", "MLX peak memory."),
    "mlx_memory_cache_bytes": ("device_mlx_memory_cache_bytes", "MLX buffer cache."),
    "gpu_utilization_ratio": ("device_gpu_utilization_ratio", "GPU busy share, where measured."),
    "gpu_memory_used_bytes": ("device_gpu_memory_used_bytes", "GPU memory in use, where measured."),
}
DEVICE_COUNTERS = {
    "network_receive_bytes_total": (
        "device_network_receive_bytes",
        "Bytes received on all interfaces since boot.",
    ),
    "network_transmit_bytes_total": (
        "device_network_transmit_bytes",
        "Bytes sent on all interfaces since boot.",
    ),
}


def _histogram_buckets(snap: HistogramSnap) -> list[tuple[str, float]]:
    buckets: list[tuple[str, float]] = [
        (floatToGoString(bound), float(count))
        for bound, count in zip(snap.buckets, snap.cumulative_counts, strict=True)
    ]
    buckets.append(("+Inf", float(snap.count)))
    return buckets


def _add_histogram(family: HistogramMetricFamily, labels: list[str], snap: HistogramSnap) -> None:
    family.add_metric(labels, _histogram_buckets(snap), snap.sum)


def _stage_label(stage: int | None) -> str:
    return "" if stage is None else str(stage)


def device_metrics_by_id(snapshot: Snapshot) -> dict[str, DeviceMetrics]:
    """Each device's latest resource sample: the cluster view, plus this process's own."""
    found = {
        device_id: status.metrics
        for device_id, status in snapshot.devices.items()
        if status.metrics is not None
    }
    if snapshot.device is not None:
        found[snapshot.device_id] = snapshot.device
    return found


def inference_families(snapshot: Snapshot) -> Iterator[Metric]:
    inference = snapshot.inference
    model = snapshot.model.model_name if snapshot.model else ""
    labels = ["model_name"]
    for name, value, help_text in (
        ("num_requests_running", inference.requests_running, "Requests being generated."),
        ("num_requests_waiting", inference.requests_waiting, "Requests queued for admission."),
    ):
        gauge = GaugeMetricFamily(PREFIX + name, help_text, labels=labels)
        gauge.add_metric([model], value)
        yield gauge
    for name, value, help_text in (
        ("prompt_tokens", inference.prompt_tokens_total, "Prompt tokens of admitted requests."),
        ("generation_tokens", inference.generation_tokens_total, "Tokens generated."),
    ):
        counter = CounterMetricFamily(PREFIX + name, help_text, labels=labels)
        counter.add_metric([model], value)
        yield counter
    success = CounterMetricFamily(
        PREFIX + "request_success",
        "Finished requests by finished_reason.",
        labels=["model_name", "finished_reason"],
    )
    for reason in _known_then_rest(FINISHED_REASONS, inference.success_total):
        success.add_metric([model, reason], inference.success_total.get(reason, 0))
    yield success
    failure = CounterMetricFamily(
        PREFIX + "request_failure",
        "Failed requests by error_type.",
        labels=["model_name", "error_type"],
    )
    for error_type, count in sorted(inference.failure_total.items()):
        failure.add_metric([model, error_type], count)
    yield failure
    for key, help_text in INFERENCE_HISTOGRAMS.items():
        histogram = HistogramMetricFamily(PREFIX + key, help_text, labels=labels)
        snap = inference.histograms.get(key)
        if snap is not None:
            _add_histogram(histogram, [model], snap)
        yield histogram
    info = GaugeMetricFamily(
        PREFIX + "model_info",
        "The served model (value 1).",
        labels=["model_name", "quantization", "num_layers", "num_stages"],
    )
    if snapshot.model is not None:
        m = snapshot.model
        info.add_metric([m.model_name, m.quantization, str(m.num_layers), str(m.num_stages)], 1)
    yield info


def stage_families(snapshot: Snapshot) -> Iterator[Metric]:
    forward = HistogramMetricFamily(
        PREFIX + "stage_forward_duration_seconds",
        "Compute time of one forward call on a stage.",
        labels=["device", "stage", "phase"],
    )
    batch = HistogramMetricFamily(
        PREFIX + "stage_batch_size",
        "Requests computed in one forward call on a stage (a batched decode step).",
        labels=["device", "stage"],
    )
    busy = CounterMetricFamily(
        PREFIX + "stage_busy_seconds",
        "Forward compute time; rate() is the stage's utilisation.",
        labels=["device", "stage"],
    )
    steps = CounterMetricFamily(
        PREFIX + "stage_steps", "Forward calls served.", labels=["device", "stage", "phase"]
    )
    sessions = GaugeMetricFamily(
        PREFIX + "stage_kv_sessions", "Live KV-cache sessions.", labels=["device", "stage"]
    )
    info = GaugeMetricFamily(
        PREFIX + "stage_info",
        "Which layers live where and how the stage computes them (value 1; layer_end is "
        "exclusive; backend, compute, blas and threads are empty until the stage loaded).",
        labels=[
            "device",
            "stage",
            "layer_start",
            "layer_end",
            "backend",
            "compute",
            "blas",
            "threads",
        ],
    )
    for device_id, stage in sorted(snapshot.stages.items()):
        label = _stage_label(stage.stage)
        for phase in _known_then_rest(PHASES, stage.forward_duration_seconds):
            snap = stage.forward_duration_seconds.get(phase)
            if snap is not None:
                _add_histogram(forward, [device_id, label, phase], snap)
        for phase in _known_then_rest(PHASES, stage.steps_total):
            steps.add_metric([device_id, label, phase], stage.steps_total.get(phase, 0))
        if stage.batch_size is not None:
            _add_histogram(batch, [device_id, label], stage.batch_size)
        busy.add_metric([device_id, label], stage.busy_seconds_total)
        sessions.add_metric([device_id, label], stage.kv_sessions)
    for device_id, status in sorted(snapshot.devices.items()):
        if status.layer_start is not None and status.layer_end is not None:
            label = _stage_label(status.stage)
            threads = "" if status.blas_threads is None else str(status.blas_threads)
            engine = [status.backend or "", status.compute or "", status.blas or "", threads]
            layers = [str(status.layer_start), str(status.layer_end)]
            info.add_metric([device_id, label, *layers, *engine], 1)
    yield from (forward, batch, busy, steps, sessions, info)


def occupancy_families(snapshot: Snapshot) -> Iterator[Metric]:
    """The coordinator's view of each stage: micro-batches in flight and the bubble."""
    in_flight = GaugeMetricFamily(
        PREFIX + "stage_microbatches_in_flight",
        "Forward calls the coordinator sent to the stage and has no answer to yet.",
        labels=["device", "stage"],
    )
    bubble = GaugeMetricFamily(
        PREFIX + "stage_bubble_ratio",
        "Share of the last 10 s the coordinator held unfinished requests and had no Forward "
        "outstanding on the stage (lower bound of its idle share; see docs/monitoring-api.md).",
        labels=["device", "stage"],
    )
    for device_id, occupancy in sorted(snapshot.occupancy.items()):
        label = _stage_label(occupancy.stage)
        in_flight.add_metric([device_id, label], occupancy.microbatches_in_flight)
        bubble.add_metric([device_id, label], occupancy.bubble_ratio)
    yield in_flight
    yield bubble


def device_families(snapshot: Snapshot) -> Iterator[Metric]:
    samples = sorted(device_metrics_by_id(snapshot).items())
    for field, (name, help_text) in DEVICE_GAUGES.items():
        gauge = GaugeMetricFamily(PREFIX + name, help_text, labels=["device"])
        for device_id, metrics in samples:
            value = getattr(metrics, field)
            if value is not None:
                gauge.add_metric([device_id], value)
        yield gauge
    for field, (name, help_text) in DEVICE_COUNTERS.items():
        counter = CounterMetricFamily(PREFIX + name, help_text, labels=["device"])
        for device_id, metrics in samples:
            value = getattr(metrics, field)
            if value is not None:
                counter.add_metric([device_id], value)
        yield counter
    info = GaugeMetricFamily(
        PREFIX + "device_info",
        "Static facts about each device (value 1).",
        labels=["device", "role", "platform", "chip", "mlx_version"],
    )
    roles = {device_id: status.role for device_id, status in snapshot.devices.items()}
    roles.setdefault(snapshot.device_id, snapshot.role)
    for device_id, metrics in samples:
        info.add_metric(
            [
                device_id,
                roles.get(device_id) or "",
                metrics.platform,
                metrics.chip or "",
                metrics.mlx_version or "",
            ],
            1,
        )
    yield info


def network_families(snapshot: Snapshot) -> Iterator[Metric]:
    link_labels = ["device", "peer"]
    rtt = HistogramMetricFamily(
        PREFIX + "network_rtt_seconds",
        "Network round trip only (TCP handshake), no process wake-up or RPC handling in it.",
        labels=link_labels,
    )
    overhead = HistogramMetricFamily(
        PREFIX + "network_rpc_overhead_seconds",
        "Ping RPC round trip minus the network round trip: what a call costs beyond the wire.",
        labels=link_labels,
    )
    requests = CounterMetricFamily(
        PREFIX + "network_requests",
        "RPCs to the peer by outcome (ok, error, timeout).",
        labels=["device", "peer", "outcome"],
    )
    transmit = CounterMetricFamily(
        PREFIX + "network_transmit_bytes",
        "Serialized request bytes of every RPC sent to the peer.",
        labels=link_labels,
    )
    receive = CounterMetricFamily(
        PREFIX + "network_receive_bytes",
        "Serialized response bytes of every RPC answered by the peer.",
        labels=link_labels,
    )
    transfer = HistogramMetricFamily(
        PREFIX + "network_transfer_duration_seconds",
        "Forward RPC time minus the stage's reported compute time.",
        labels=link_labels,
    )
    for link in snapshot.network.links:
        labels = [link.device, link.peer]
        _add_histogram(rtt, labels, link.rtt_histogram)
        if link.rpc_overhead_histogram is not None:
            _add_histogram(overhead, labels, link.rpc_overhead_histogram)
        for outcome in _known_then_rest(LINK_OUTCOMES, link.requests_total):
            requests.add_metric([*labels, outcome], link.requests_total.get(outcome, 0))
        transmit.add_metric(labels, link.transmit_bytes_total)
        receive.add_metric(labels, link.receive_bytes_total)
        _add_histogram(transfer, labels, link.transfer_duration_seconds)
    yield from (rtt, overhead, requests, transmit, receive, transfer)
    yield from grpc_families(snapshot)


def grpc_families(snapshot: Snapshot) -> Iterator[Metric]:
    """Client-side RPC metrics under the go-grpc-prometheus names (plus a ``peer`` label)."""
    handled = CounterMetricFamily(
        "grpc_client_handled",
        "RPCs completed on the client, regardless of success or failure.",
        labels=["grpc_type", "grpc_service", "grpc_method", "grpc_code", "peer"],
    )
    handling = HistogramMetricFamily(
        "grpc_client_handling_seconds",
        "Response latency of RPCs until the client received the reply.",
        labels=["grpc_type", "grpc_service", "grpc_method", "peer"],
    )
    for rpc in snapshot.network.rpc:
        for code, count in sorted(rpc.handled_total.items()):
            handled.add_metric(["unary", GRPC_SERVICE, rpc.method, code, rpc.peer], count)
        _add_histogram(
            handling, ["unary", GRPC_SERVICE, rpc.method, rpc.peer], rpc.handling_seconds
        )
    yield from (handled, handling)


def health_families(
    snapshot: Snapshot, health: HealthSummary | None, version: str
) -> Iterator[Metric]:
    status = GaugeMetricFamily(
        PREFIX + "health_status",
        "1 for each check's current status (healthy, warning, critical, unknown).",
        labels=["device", "check", "status"],
    )
    own = snapshot.device_id
    overall: dict[str, str] = {
        device_id: device_health_state(device, own)
        for device_id, device in snapshot.devices.items()
        if device_id != own
    }
    if health is not None:
        overall[health.device_id] = health.overall_status
        for name, check in sorted(health.checks.items()):
            _add_state_set(status, [health.device_id, name], check.status)
    elif own in snapshot.devices:
        overall[own] = device_health_state(snapshot.devices[own], own)
    for device_id, state in sorted(overall.items()):
        _add_state_set(status, [device_id, OVERALL_CHECK], state)
    yield status

    up = GaugeMetricFamily(
        PREFIX + "device_up", "1 when the device answered the last status poll.", labels=["device"]
    )
    last_seen = GaugeMetricFamily(
        PREFIX + "device_last_seen_timestamp_seconds",
        "Last successful status poll, unix seconds.",
        labels=["device"],
    )
    restarts = CounterMetricFamily(
        PREFIX + "worker_restarts",
        "Times mlx-relay up restarted the worker's process (supervised workers only).",
        labels=["device"],
    )
    for device_id, device in sorted(snapshot.devices.items()):
        is_up = device_id == own or bool(device.up)
        up.add_metric([device_id], 1 if is_up else 0)
        if device.last_seen_timestamp is not None:
            last_seen.add_metric([device_id], device.last_seen_timestamp)
        if device.restarts is not None:
            restarts.add_metric([device_id], device.restarts)
    if own not in snapshot.devices:
        up.add_metric([own], 1)
    yield from (up, last_seen, restarts)

    build = GaugeMetricFamily(
        PREFIX + "build_info", "mlx-relay build (value 1).", labels=["version", "mlx_version"]
    )
    mlx_version = snapshot.device.mlx_version if snapshot.device else None
    build.add_metric([version, mlx_version or ""], 1)
    yield build


def snapshot_families(
    snapshot: Snapshot, health: HealthSummary | None, version: str
) -> Iterator[Metric]:
    """Every docs/monitoring-api.md family for one snapshot, in catalogue order."""
    yield from inference_families(snapshot)
    yield from stage_families(snapshot)
    yield from occupancy_families(snapshot)
    yield from device_families(snapshot)
    yield from network_families(snapshot)
    yield from health_families(snapshot, health, version)


def _add_state_set(family: GaugeMetricFamily, labels: list[str], current: str) -> None:
    for state in _known_then_rest(HEALTH_STATES, [current]):
        family.add_metric([*labels, state], 1 if state == current else 0)


def _known_then_rest(known: Iterable[str], present: Iterable[str]) -> list[str]:
    ordered = list(known)
    ordered.extend(sorted(set(present) - set(ordered)))
    return ordered
