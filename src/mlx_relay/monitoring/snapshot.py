"""The one metrics snapshot: pydantic models shared by the JSON API and the Prometheus export.

``MetricsCollector.export_metrics()`` returns ``Snapshot.model_dump(mode="json")``; the REST
API uses these models as response models and the Prometheus collector reads them, so the two
views never disagree. Units follow docs/monitoring-api.md: seconds, bytes and ratios in 0..1
only. Timestamps are unix seconds (wall clock); durations are measured on a monotonic clock
inside one process. A quantity that cannot be measured here is ``None`` with a
``*_unavailable_reason``, never a made-up 0.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1

FINISHED_REASONS = ("stop", "length", "abort")
PHASES = ("prefill", "decode")
LINK_OUTCOMES = ("ok", "error", "timeout")
THROUGHPUT_WINDOWS = ("10s", "60s")


class _Snap(BaseModel):
    # "ignore" so a coordinator can read a worker snapshot written by a newer schema version.
    model_config = ConfigDict(extra="ignore")


class HistogramSnap(_Snap):
    """A cumulative histogram, as Prometheus exposes it."""

    buckets: list[float] = Field(
        description="Bucket upper bounds in the quantity's base unit, ascending; +Inf implied."
    )
    cumulative_counts: list[int] = Field(
        description="Observations <= each bound (same length as buckets); +Inf count is `count`."
    )
    sum: float = Field(description="Sum of all observations, in the quantity's base unit.")
    count: int = Field(description="Number of observations since start.")


class LatencySummary(_Snap):
    """Exact percentiles over the recent sample window (last N samples within retention)."""

    count: int = Field(description="Samples in the window (at most the window size).")
    mean: float | None = Field(
        default=None, description="Mean of the window, seconds; None if empty."
    )
    p50: float | None = Field(
        default=None, description="Median of the window, seconds; None if empty."
    )
    p90: float | None = Field(default=None, description="90th percentile, seconds; None if empty.")
    p99: float | None = Field(default=None, description="99th percentile, seconds; None if empty.")
    max: float | None = Field(default=None, description="Largest sample in the window, seconds.")


class ModelInfoSnap(_Snap):
    """The served model (mlxrelay_model_info)."""

    model_name: str = Field(description="Model name as served.")
    quantization: str = Field(description="Quantization, e.g. 'q4_1', '4bit', 'none'.")
    num_layers: int = Field(description="Transformer layers in the whole model.")
    num_stages: int = Field(description="Pipeline stages the layers are split across.")


class DeviceMetrics(_Snap):
    """One machine's resources, as seen by the process running on it."""

    platform: str = Field(description="Operating system and architecture, e.g. 'Darwin-arm64'.")
    chip: str | None = Field(default=None, description="CPU or SoC name, e.g. 'Apple M2 Pro'.")
    mlx_version: str | None = Field(default=None, description="Installed MLX version.")
    mlx_device: str | None = Field(
        default=None, description="MLX default device, e.g. 'gpu' or 'cpu'."
    )
    sampled_at: float = Field(
        description="When this sample was taken (the end of its CPU interval; the other "
        "reads follow within milliseconds), unix seconds."
    )

    cpu_count: int = Field(description="Logical CPU cores.")
    cpu_utilization_ratio: float | None = Field(
        default=None, description="Busy share of all cores since the previous sample, 0..1."
    )
    cpu_per_core_ratio: list[float] | None = Field(
        default=None, description="Busy share of each core since the previous sample, 0..1."
    )
    cpu_unavailable_reason: str | None = Field(
        default=None, description="Why CPU utilization is None (e.g. first sample has no interval)."
    )
    memory_total_bytes: int = Field(description="Physical memory, bytes.")
    memory_available_bytes: int = Field(description="Memory available without swapping, bytes.")
    memory_used_bytes: int = Field(description="Memory in use (total - available), bytes.")
    memory_used_ratio: float = Field(description="memory_used_bytes / memory_total_bytes, 0..1.")
    process_resident_memory_bytes: int = Field(description="This process's resident set, bytes.")
    process_cpu_seconds_total: float = Field(description="This process's user+system CPU, s.")
    process_threads: int = Field(description="Threads in this process.")
    process_open_fds: int | None = Field(
        default=None, description="Open file descriptors (POSIX only)."
    )
    disk_path: str = Field(description="Path whose filesystem disk_* describe.")
    disk_used_ratio: float = Field(description="Used share of that filesystem, 0..1.")
    disk_free_bytes: int = Field(description="Free bytes on that filesystem.")
    network_receive_bytes_total: int | None = Field(
        default=None, description="Bytes received on all interfaces since boot."
    )
    network_transmit_bytes_total: int | None = Field(
        default=None, description="Bytes sent on all interfaces since boot."
    )
    network_unavailable_reason: str | None = Field(
        default=None, description="Why network counters are None."
    )
    mlx_memory_active_bytes: int | None = Field(
        default=None, description="MLX active memory, bytes."
    )
    mlx_memory_peak_bytes: int | None = Field(default=None, description="MLX peak memory, bytes.")
    mlx_memory_cache_bytes: int | None = Field(default=None, description="MLX buffer cache, bytes.")
    mlx_unavailable_reason: str | None = Field(default=None, description="Why MLX memory is None.")
    gpu_name: str | None = Field(default=None, description="GPU name, where one was found.")
    gpu_source: str | None = Field(
        default=None, description="Where GPU numbers come from: nvml|ioreg."
    )
    gpu_utilization_ratio: float | None = Field(
        default=None, description="GPU busy share, 0..1 (NVML or macOS IOAccelerator statistics)."
    )
    gpu_memory_used_bytes: int | None = Field(default=None, description="GPU memory in use, bytes.")
    gpu_memory_total_bytes: int | None = Field(default=None, description="GPU memory size, bytes.")
    gpu_unavailable_reason: str | None = Field(default=None, description="Why GPU fields are None.")


class StageMetrics(_Snap):
    """One pipeline stage's compute, as its worker measures it."""

    device_id: str = Field(description="Worker holding the stage.")
    stage: int | None = Field(
        default=None, description="Stage index in pipeline order (0 = first)."
    )
    forward_duration_seconds: dict[str, HistogramSnap] = Field(
        description="Compute time of one forward call by phase (prefill|decode), seconds."
    )
    forward_seconds: dict[str, LatencySummary] = Field(
        description="Recent-window summary of forward time by phase, seconds."
    )
    batch_size: HistogramSnap | None = Field(
        default=None,
        description="Requests per forward call: a batched decode step counts all its requests.",
    )
    busy_seconds_total: float = Field(description="Total forward compute time, seconds.")
    steps_total: dict[str, int] = Field(description="Forward calls served, by phase.")
    tokens_total: dict[str, int] = Field(description="Tokens processed, by phase.")
    kv_sessions: int = Field(default=0, description="Live KV-cache sessions on the stage.")
    utilization_ratio_10s: float | None = Field(
        default=None, description="Busy seconds / wall seconds over the last 10 s, 0..1."
    )


class StageOccupancy(_Snap):
    """How busy the coordinator keeps one stage, from its own timestamps and the stage's
    compute windows (definitions in docs/monitoring-api.md, "Stage occupancy")."""

    device_id: str = Field(description="Worker holding the stage.")
    stage: int | None = Field(default=None, description="Stage index, 0 = first.")
    microbatches_in_flight: int = Field(
        description="Forward calls sent to the stage and not yet answered, now."
    )
    batch_size_last: int | None = Field(
        default=None, description="Requests in the latest Forward sent to the stage."
    )
    batch_size_mean: float | None = Field(
        default=None, description="Mean requests per Forward over the window; None if none."
    )
    forwards: int = Field(default=0, description="Forward calls sent in the window.")
    bubble_ratio: float = Field(
        description="Share of the window the step loop held requests and the stage did not "
        "compute, from the compute windows the stage reported, 0..1 (a Forward still "
        "outstanding counts as computing)."
    )
    bubble_ratio_max: float = Field(
        description="The same with the Forwards still outstanding counted as idle, 0..1."
    )
    window_seconds: float = Field(description="Length of the window, seconds (10 once warm).")


class DeviceStatus(_Snap):
    """One device in the cluster view (a worker shows itself; the coordinator shows all)."""

    device_id: str = Field(description="Device id from the cluster configuration.")
    role: str | None = Field(default=None, description="'coordinator' or 'worker'.")
    stage: int | None = Field(
        default=None, description="Stage index for a worker; metrics in `stages`."
    )
    layer_start: int | None = Field(default=None, description="First layer held (inclusive).")
    layer_end: int | None = Field(default=None, description="End of the layers held (exclusive).")
    assigned_layers: list[int] | None = Field(default=None, description="Layer indices held.")
    model_loaded: bool | None = Field(
        default=None, description="Whether the device's shard is loaded."
    )
    backend: str | None = Field(
        default=None, description="Where the stage computes: 'cpu', 'metal' or 'cuda'."
    )
    compute: str | None = Field(
        default=None, description="The stage's weights: 'quantized' or a dense dtype."
    )
    blas: str | None = Field(
        default=None,
        description=(
            "CPU BLAS in use: 'openblas+router' (the router's kernel for decode steps, "
            "OpenBLAS for the rest), "
            "'openblas', 'blis', 'bundled' or 'system'."
        ),
    )
    blas_threads: int | None = Field(
        default=None,
        description="BLAS threads of a step the worker computes alone (0: none loaded).",
    )
    is_healthy: bool | None = Field(default=None, description="Device's own health verdict.")
    health_status: str | None = Field(
        default=None, description="Overall health: healthy|warning|critical|unknown."
    )
    up: bool | None = Field(
        default=None, description="Reachable from the coordinator at the last poll."
    )
    last_seen_timestamp: float | None = Field(
        default=None, description="Last successful status poll or local update, unix seconds."
    )
    last_error: str | None = Field(default=None, description="Last poll or RPC error, if any.")
    restarts: int | None = Field(
        default=None,
        description="Times `mlx-relay up` restarted the process; None when not supervised.",
    )
    metrics: DeviceMetrics | None = Field(default=None, description="Latest resource sample.")


class ThroughputWindow(_Snap):
    """Rates over a sliding window of 1-second buckets."""

    window_seconds: float = Field(description="Nominal window length, seconds.")
    elapsed_seconds: float = Field(
        description="Seconds the rates are divided by: the window, or uptime when shorter."
    )
    requests_per_second: float = Field(description="Finished requests (ok or failed) per second.")
    tokens_per_second: float = Field(description="Generated tokens per second.")
    prompt_tokens_per_second: float = Field(description="Prompt tokens admitted per second.")
    error_rate: float | None = Field(
        default=None,
        description="Failed / finished requests in the window, 0..1; None if none finished.",
    )
    error_rate_by_type: dict[str, float] = Field(
        default_factory=dict, description="Failed of each error_type / finished, 0..1."
    )


class RecentError(_Snap):
    """A failed request, without any prompt or completion text."""

    timestamp: float = Field(description="When it failed, unix seconds.")
    error_type: str = Field(description="Error class, a bounded label.")
    message: str = Field(description="Short error message (truncated).")


class InferenceMetrics(_Snap):
    """Request-level metrics on the coordinator (vLLM-style)."""

    requests_running: int = Field(description="Requests admitted and not yet finished.")
    requests_waiting: int = Field(description="Requests queued for admission.")
    requests_total: int = Field(description="Requests admitted since start.")
    success_total: dict[str, int] = Field(description="Finished requests by finished_reason.")
    failure_total: dict[str, int] = Field(description="Failed requests by error_type.")
    prompt_tokens_total: int = Field(description="Prompt tokens of admitted requests.")
    generation_tokens_total: int = Field(description="Tokens generated.")
    windows: dict[str, ThroughputWindow] = Field(description="Rates keyed '10s' and '60s'.")
    latency: dict[str, LatencySummary] = Field(
        description="Recent-window summaries keyed e2e, ttft, inter_token, "
        "time_per_output_token, queue, prefill, decode, stage, network, recovery (a stream's "
        "pause from a stage failure to its next token); seconds."
    )
    histograms: dict[str, HistogramSnap] = Field(
        description="Histograms keyed by metric family name without the mlxrelay_ prefix."
    )
    recent_errors: list[RecentError] = Field(description="Last failures, newest last.")


class LinkMetrics(_Snap):
    """One directed network link from this device to a peer."""

    device: str = Field(description="This device's id.")
    peer: str = Field(description="Peer device id.")
    rtt_last_seconds: float | None = Field(
        default=None,
        description="Latest network round trip (TCP handshake, no process or RPC time), s.",
    )
    rtt: LatencySummary = Field(description="Recent network round trips, seconds.")
    rtt_histogram: HistogramSnap = Field(description="Network round trips (RTT buckets), s.")
    rtt_method: str | None = Field(
        default=None,
        description="How rtt is measured: tcp_info (the kernel's handshake RTT, Linux) or "
        "tcp_connect (connect() time, which adds this process's wake-up).",
    )
    rtt_unavailable_reason: str | None = Field(
        default=None, description="Why the latest network probe gave no round trip."
    )
    ping_rtt_last_seconds: float | None = Field(
        default=None, description="Latest Ping RPC round trip on the gRPC channel, seconds."
    )
    ping_rtt: LatencySummary = Field(
        default_factory=lambda: LatencySummary(count=0),
        description="Recent Ping RPC round trips (network + both processes + gRPC), seconds.",
    )
    rpc_overhead_last_seconds: float | None = Field(
        default=None, description="Latest Ping RPC round trip minus the network round trip, s."
    )
    rpc_overhead: LatencySummary = Field(
        default_factory=lambda: LatencySummary(count=0),
        description="Recent RPC overheads: what a call costs beyond the network, seconds.",
    )
    rpc_overhead_histogram: HistogramSnap | None = Field(
        default=None, description="RPC overheads (Network RPC buckets), seconds."
    )
    ping_total: dict[str, int] = Field(description="Pings by outcome ok|error|timeout.")
    requests_total: dict[str, int] = Field(description="RPCs by outcome ok|error|timeout.")
    transmit_bytes_total: int = Field(
        description="Serialized request bytes of every RPC sent to the peer."
    )
    receive_bytes_total: int = Field(
        description="Serialized response bytes of every RPC answered by the peer."
    )
    transfer_duration_seconds: HistogramSnap = Field(
        description="Forward RPC time minus the stage's compute time, seconds."
    )
    transfer: LatencySummary = Field(description="Recent transfer durations, seconds.")
    last_error: str | None = Field(default=None, description="Latest failure message on this link.")
    last_error_timestamp: float | None = Field(default=None, description="When, unix seconds.")
    last_ok_timestamp: float | None = Field(
        default=None, description="Latest success, unix seconds."
    )


class RpcMethodMetrics(_Snap):
    """Client-side gRPC calls to one peer's method (go-grpc-prometheus names)."""

    peer: str = Field(description="Peer device id.")
    method: str = Field(description="gRPC method name, e.g. 'Forward'.")
    handled_total: dict[str, int] = Field(description="Completed calls by gRPC status code name.")
    handling_seconds: HistogramSnap = Field(description="Call duration, seconds.")


class NetworkMetrics(_Snap):
    links: list[LinkMetrics] = Field(description="Links from this device, sorted by peer.")
    rpc: list[RpcMethodMetrics] = Field(description="Per (peer, method) RPC counts and times.")


class HistoryPoint(_Snap):
    """One point of the chart history, taken at each collection interval."""

    timestamp: float = Field(description="Unix seconds.")
    requests_per_second: float = Field(description="10 s window rate.")
    tokens_per_second: float = Field(description="Generated tokens/s, 10 s window.")
    e2e_p50_seconds: float | None = Field(default=None, description="End-to-end median, seconds.")
    e2e_p99_seconds: float | None = Field(default=None, description="End-to-end p99, seconds.")
    ttft_p50_seconds: float | None = Field(default=None, description="TTFT median, seconds.")
    cpu_utilization_ratio: float | None = Field(default=None, description="Machine CPU, 0..1.")
    memory_used_ratio: float | None = Field(default=None, description="Machine memory, 0..1.")
    gpu_utilization_ratio: float | None = Field(
        default=None, description="GPU, 0..1, where measured."
    )


class Snapshot(_Snap):
    """Everything one process knows, at one instant."""

    schema_version: int = Field(
        default=SCHEMA_VERSION, description="Bumped on incompatible changes."
    )
    device_id: str = Field(description="The process's own device id.")
    role: str = Field(description="'coordinator' or 'worker'.")
    timestamp: float = Field(description="When the snapshot was taken, unix seconds.")
    uptime_seconds: float = Field(description="Seconds since the collector was created.")
    collection_interval_seconds: float = Field(description="Device sampling interval, seconds.")
    model: ModelInfoSnap | None = Field(default=None, description="Served model, once known.")
    device: DeviceMetrics | None = Field(
        default=None, description="This machine; None until the first sample (start() takes one)."
    )
    devices: dict[str, DeviceStatus] = Field(description="Cluster view keyed by device id.")
    inference: InferenceMetrics
    stages: dict[str, StageMetrics] = Field(description="Pipeline stages keyed by device id.")
    occupancy: dict[str, StageOccupancy] = Field(
        default_factory=dict,
        description="The coordinator's view of each stage's batches and bubble, by device id "
        "(empty on a worker).",
    )
    network: NetworkMetrics
    history: list[HistoryPoint] = Field(description="Chart history, oldest first, bounded.")


class CheckResultSnap(_Snap):
    """The latest result of one health check."""

    name: str
    description: str = ""
    status: str = Field(description="healthy|warning|critical|unknown.")
    message: str = Field(default="", description="Human-readable verdict.")
    details: dict[str, Any] = Field(default_factory=dict, description="Check-specific data.")
    last_run_timestamp: float | None = Field(
        default=None, description="Last completion, unix seconds."
    )
    duration_seconds: float | None = Field(
        default=None, description="How long the last run took, s."
    )
    interval_seconds: float = Field(description="Seconds between runs.")


class HealthTransition(_Snap):
    """A check changing status."""

    timestamp: float = Field(description="Unix seconds.")
    check: str
    from_status: str
    to_status: str
    message: str = ""


class HealthSummary(_Snap):
    """What ``HealthMonitor.get_health_summary()`` returns (as a dict)."""

    device_id: str
    timestamp: float = Field(description="Unix seconds.")
    overall_status: str = Field(description="Worst status of all checks; unknown if none ran.")
    checks: dict[str, CheckResultSnap]
    transitions: list[HealthTransition] = Field(description="Recent changes, newest last.")
