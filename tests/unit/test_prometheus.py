"""The Prometheus collector: every family of docs/monitoring-api.md, with its type, labels
and buckets, from a real MetricsCollector driven on a fake clock."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from mlx_relay import __version__
from mlx_relay.monitoring.metrics import MetricsCollector
from mlx_relay.monitoring.prometheus import RelayCollector, prometheus_format
from mlx_relay.monitoring.snapshot import (
    CheckResultSnap,
    DeviceMetrics,
    HealthSummary,
)
from mlx_relay.monitoring.windows import (
    NETWORK_RTT_BUCKETS,
    STAGE_FORWARD_BUCKETS,
    TTFT_BUCKETS,
)

WALL = 1_700_000_000.0
MEMORY_TOTAL = 16 * 1024**3

# docs/monitoring-api.md's families, as the text parser names them (counters without _total).
EXPECTED_FAMILIES = {
    "mlxrelay_num_requests_running": ("gauge", {"model_name"}),
    "mlxrelay_num_requests_waiting": ("gauge", {"model_name"}),
    "mlxrelay_prompt_tokens": ("counter", {"model_name"}),
    "mlxrelay_generation_tokens": ("counter", {"model_name"}),
    "mlxrelay_request_success": ("counter", {"model_name", "finished_reason"}),
    "mlxrelay_request_failure": ("counter", {"model_name", "error_type"}),
    "mlxrelay_time_to_first_token_seconds": ("histogram", {"model_name"}),
    "mlxrelay_inter_token_latency_seconds": ("histogram", {"model_name"}),
    "mlxrelay_request_time_per_output_token_seconds": ("histogram", {"model_name"}),
    "mlxrelay_e2e_request_latency_seconds": ("histogram", {"model_name"}),
    "mlxrelay_request_queue_time_seconds": ("histogram", {"model_name"}),
    "mlxrelay_request_prefill_time_seconds": ("histogram", {"model_name"}),
    "mlxrelay_request_decode_time_seconds": ("histogram", {"model_name"}),
    "mlxrelay_recovery_seconds": ("histogram", {"model_name"}),
    "mlxrelay_request_prompt_tokens": ("histogram", {"model_name"}),
    "mlxrelay_request_generation_tokens": ("histogram", {"model_name"}),
    "mlxrelay_model_info": (
        "gauge",
        {"model_name", "quantization", "num_layers", "num_stages"},
    ),
    "mlxrelay_stage_forward_duration_seconds": ("histogram", {"device", "stage", "phase"}),
    "mlxrelay_stage_batch_size": ("histogram", {"device", "stage"}),
    "mlxrelay_stage_busy_seconds": ("counter", {"device", "stage"}),
    "mlxrelay_stage_steps": ("counter", {"device", "stage", "phase"}),
    "mlxrelay_stage_kv_sessions": ("gauge", {"device", "stage"}),
    "mlxrelay_stage_microbatches_in_flight": ("gauge", {"device", "stage"}),
    "mlxrelay_stage_bubble_ratio": ("gauge", {"device", "stage"}),
    "mlxrelay_stage_info": (
        "gauge",
        {"device", "stage", "layer_start", "layer_end", "backend", "compute", "blas", "threads"},
    ),
    "mlxrelay_device_cpu_utilization_ratio": ("gauge", {"device"}),
    "mlxrelay_device_memory_used_bytes": ("gauge", {"device"}),
    "mlxrelay_device_memory_available_bytes": ("gauge", {"device"}),
    "mlxrelay_device_memory_total_bytes": ("gauge", {"device"}),
    "mlxrelay_device_process_resident_memory_bytes": ("gauge", {"device"}),
    "mlxrelay_device_disk_used_ratio": ("gauge", {"device"}),
    "mlxrelay_device_network_receive_bytes": ("counter", {"device"}),
    "mlxrelay_device_network_transmit_bytes": ("counter", {"device"}),
    "mlxrelay_device_mlx_memory_active_bytes": ("gauge", {"device"}),
    "mlxrelay_device_mlx_memory_peak_bytes": ("gauge", {"device"}),
    "mlxrelay_device_mlx_memory_cache_bytes": ("gauge", {"device"}),
    "mlxrelay_device_gpu_utilization_ratio": ("gauge", {"device"}),
    "mlxrelay_device_gpu_memory_used_bytes": ("gauge", {"device"}),
    "mlxrelay_device_info": ("gauge", {"device", "role", "platform", "chip", "mlx_version"}),
    "mlxrelay_network_rtt_seconds": ("histogram", {"device", "peer"}),
    "mlxrelay_network_rpc_overhead_seconds": ("histogram", {"device", "peer"}),
    "mlxrelay_network_requests": ("counter", {"device", "peer", "outcome"}),
    "mlxrelay_network_transmit_bytes": ("counter", {"device", "peer"}),
    "mlxrelay_network_receive_bytes": ("counter", {"device", "peer"}),
    "mlxrelay_network_transfer_duration_seconds": ("histogram", {"device", "peer"}),
    "mlxrelay_health_status": ("gauge", {"device", "check", "status"}),
    "mlxrelay_device_up": ("gauge", {"device"}),
    "mlxrelay_device_last_seen_timestamp_seconds": ("gauge", {"device"}),
    "mlxrelay_worker_restarts": ("counter", {"device"}),
    "mlxrelay_build_info": ("gauge", {"version", "mlx_version"}),
    "grpc_client_handled": (
        "counter",
        {"grpc_type", "grpc_service", "grpc_method", "grpc_code", "peer"},
    ),
    "grpc_client_handling_seconds": (
        "histogram",
        {"grpc_type", "grpc_service", "grpc_method", "peer"},
    ),
}


# The recorded devices have no GPU reading: these families exist without samples.
UNMEASURED_HERE = {"mlxrelay_device_gpu_utilization_ratio", "mlxrelay_device_gpu_memory_used_bytes"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return WALL + self.now


def device_sample(at: float) -> DeviceMetrics:
    return DeviceMetrics(
        platform="Linux-x86_64",
        chip="Test CPU",
        mlx_version="0.32.0",
        mlx_device="cpu",
        sampled_at=at,
        cpu_count=2,
        cpu_utilization_ratio=0.25,
        memory_total_bytes=MEMORY_TOTAL,
        memory_available_bytes=MEMORY_TOTAL - 4 * 1024**3,
        memory_used_bytes=4 * 1024**3,
        memory_used_ratio=0.25,
        process_resident_memory_bytes=300 * 1024**2,
        process_cpu_seconds_total=1.5,
        process_threads=8,
        disk_path="/",
        disk_used_ratio=0.5,
        disk_free_bytes=10**11,
        network_receive_bytes_total=1000,
        network_transmit_bytes_total=2000,
        mlx_memory_active_bytes=1024,
        mlx_memory_peak_bytes=2048,
        mlx_memory_cache_bytes=0,
        gpu_unavailable_reason="no NVIDIA GPU and not macOS",
    )


@pytest.fixture
def recorded() -> Iterator[tuple[MetricsCollector, FakeClock]]:
    """A coordinator collector with one worker's snapshot and a known history of events."""
    clock = FakeClock()
    coordinator = MetricsCollector(
        "coordinator", 1.0, role="coordinator", clock=clock, wall_clock=clock.wall
    )
    worker = MetricsCollector("worker-0", 1.0, role="worker", clock=clock, wall_clock=clock.wall)
    coordinator.set_model_info("tiny-llama", "none", 4, 2)

    trace = coordinator.track_request(prompt_tokens=7)
    clock.now = 0.03
    trace.token()  # TTFT 0.03 s
    clock.now = 0.08
    trace.token()  # inter-token 0.05 s
    clock.now = 0.10
    trace.token()
    trace.finish("length")
    coordinator.track_request(prompt_tokens=2).fail("WorkerUnavailable", "worker-1 is down")

    worker.update_device_status(
        "worker-0",
        assigned_layers=[0, 1],
        stage=0,
        role="worker",
        backend="cpu",
        compute="float32",
        blas="openblas",
        blas_threads=1,
    )
    worker.record_stage_forward(0, "prefill", 0.004, 7)
    worker.record_stage_forward(0, "decode", 0.001, 1)
    worker.record_stage_forward(0, "decode", 0.0015, 1)
    worker.record_stage_forward(0, "decode", 0.002, 5, batch_size=5)
    worker.set_kv_sessions(1)
    worker.record_device_sample(device_sample(clock.wall()))
    coordinator.set_worker_restarts("worker-0", 2)  # kept across the worker's own snapshot
    coordinator.update_remote_snapshot("worker-0", worker.export_metrics())
    coordinator.update_device_status("worker-1", role="worker", stage=1)
    coordinator.update_remote_snapshot("worker-1", None, error="connection refused")

    coordinator.record_ping("worker-0", 0.0015)
    coordinator.record_network_rtt("worker-0", 0.00004, method="tcp_info", ping_rtt_seconds=0.0015)
    coordinator.record_ping("worker-1", None, error="connection refused")
    coordinator.record_network_rtt("worker-1", None, error="connection refused")
    coordinator.record_rpc("worker-0", "Forward", 0.003, "OK", sent_bytes=100, received_bytes=250)
    coordinator.record_rpc("worker-0", "Forward", 0.5, "DEADLINE_EXCEEDED")
    coordinator.record_transfer("worker-0", 0.002)
    coordinator.set_requests_scheduled(3)
    coordinator.stage_forward_started("worker-0", 0, 3)  # still outstanding
    coordinator.record_device_sample(device_sample(clock.wall()))
    yield coordinator, clock


def health_summary() -> HealthSummary:
    return HealthSummary(
        device_id="coordinator",
        timestamp=WALL,
        overall_status="warning",
        checks={
            "system_resources": CheckResultSnap(
                name="system_resources", status="warning", message="memory 90%", interval_seconds=1
            ),
            "process_health": CheckResultSnap(
                name="process_health", status="healthy", interval_seconds=1
            ),
        },
        transitions=[],
    )


def scrape(collector: MetricsCollector) -> dict[str, tuple[str, list[Sample]]]:
    registry = CollectorRegistry()
    RelayCollector(collector.snapshot, health_summary, registry=registry)
    text = generate_latest(registry).decode()
    return {f.name: (f.type, f.samples) for f in text_string_to_metric_families(text)}


def value(samples: list[Sample], name: str, **labels: str) -> float:
    found = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def test_worker_restarts_only_for_supervised_workers(
    recorded: tuple[MetricsCollector, FakeClock],
) -> None:
    _, samples = scrape(recorded[0])["mlxrelay_worker_restarts"]
    assert [(s.name, s.labels, s.value) for s in samples] == [
        ("mlxrelay_worker_restarts_total", {"device": "worker-0"}, 2.0)
    ]
    assert recorded[0].snapshot().devices["worker-1"].restarts is None


def test_every_family_has_its_type_and_labels(
    recorded: tuple[MetricsCollector, FakeClock],
) -> None:
    families = scrape(recorded[0])
    assert set(EXPECTED_FAMILIES) <= set(families)
    for name, (kind, labels) in EXPECTED_FAMILIES.items():
        found_kind, samples = families[name]
        assert found_kind == kind, name
        if name not in UNMEASURED_HERE:
            assert samples, f"{name} has no sample"
        for sample in samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample)
    unexpected = {n for n in families if n.startswith("mlxrelay_")} - set(EXPECTED_FAMILIES)
    assert not unexpected


def test_stage_occupancy_gauges(recorded: tuple[MetricsCollector, FakeClock]) -> None:
    families = scrape(recorded[0])
    _, in_flight = families["mlxrelay_stage_microbatches_in_flight"]
    assert value(in_flight, "mlxrelay_stage_microbatches_in_flight", device="worker-0") == 1
    _, bubble = families["mlxrelay_stage_bubble_ratio"]
    # A Forward has been outstanding since the requests arrived: no idle time yet.
    assert value(bubble, "mlxrelay_stage_bubble_ratio", device="worker-0", stage="0") == 0


def test_histograms_use_the_catalogue_buckets_and_counts(
    recorded: tuple[MetricsCollector, FakeClock],
) -> None:
    families = scrape(recorded[0])
    _, ttft = families["mlxrelay_time_to_first_token_seconds"]
    buckets = {s.labels["le"]: s.value for s in ttft if s.name.endswith("_bucket")}
    assert [float(le) for le in buckets] == [*TTFT_BUCKETS, float("inf")]
    assert buckets["0.02"] == 0 and buckets["0.04"] == 1 and buckets["+Inf"] == 1
    assert value(ttft, "mlxrelay_time_to_first_token_seconds_sum") == pytest.approx(0.03)
    assert value(ttft, "mlxrelay_time_to_first_token_seconds_count") == 1

    _, itl = families["mlxrelay_inter_token_latency_seconds"]
    # Gaps 0.05 s and 0.02 s.
    assert value(itl, "mlxrelay_inter_token_latency_seconds_bucket", le="0.01") == 0
    assert value(itl, "mlxrelay_inter_token_latency_seconds_bucket", le="0.025") == 1
    assert value(itl, "mlxrelay_inter_token_latency_seconds_bucket", le="0.05") == 2
    assert value(itl, "mlxrelay_inter_token_latency_seconds_count") == 2

    _, e2e = families["mlxrelay_e2e_request_latency_seconds"]
    assert value(e2e, "mlxrelay_e2e_request_latency_seconds_sum") == pytest.approx(0.10)
    assert value(e2e, "mlxrelay_e2e_request_latency_seconds_bucket", le="0.3") == 1

    _, forward = families["mlxrelay_stage_forward_duration_seconds"]
    decode = [
        s
        for s in forward
        if s.name.endswith("_bucket") and s.labels["phase"] == "decode" and s.labels["le"] != "+Inf"
    ]
    assert [float(s.labels["le"]) for s in decode] == list(STAGE_FORWARD_BUCKETS)
    assert (
        value(forward, "mlxrelay_stage_forward_duration_seconds_bucket", phase="decode", le="0.001")
        == 1
    )
    assert value(forward, "mlxrelay_stage_forward_duration_seconds_count", phase="decode") == 3
    assert value(forward, "mlxrelay_stage_forward_duration_seconds_count", phase="prefill") == 1

    _, batch = families["mlxrelay_stage_batch_size"]
    assert value(batch, "mlxrelay_stage_batch_size_bucket", device="worker-0", le="1.0") == 3
    assert value(batch, "mlxrelay_stage_batch_size_bucket", device="worker-0", le="4.0") == 3
    assert value(batch, "mlxrelay_stage_batch_size_bucket", device="worker-0", le="8.0") == 4
    assert value(batch, "mlxrelay_stage_batch_size_sum", device="worker-0") == 8

    _, rtt = families["mlxrelay_network_rtt_seconds"]
    rtt_bounds = [
        float(s.labels["le"])
        for s in rtt
        if s.name.endswith("_bucket") and s.labels["peer"] == "worker-0"
    ]
    assert rtt_bounds == [*NETWORK_RTT_BUCKETS, float("inf")]
    assert value(rtt, "mlxrelay_network_rtt_seconds_count", peer="worker-0") == 1
    assert value(rtt, "mlxrelay_network_rtt_seconds_sum", peer="worker-0") == 0.00004
    assert value(rtt, "mlxrelay_network_rtt_seconds_count", peer="worker-1") == 0
    _, overhead = families["mlxrelay_network_rpc_overhead_seconds"]
    overhead_sum = value(overhead, "mlxrelay_network_rpc_overhead_seconds_sum", peer="worker-0")
    assert overhead_sum == pytest.approx(0.0015 - 0.00004)
    assert value(overhead, "mlxrelay_network_rpc_overhead_seconds_count", peer="worker-1") == 0


def test_counters_and_known_label_sets(recorded: tuple[MetricsCollector, FakeClock]) -> None:
    families = scrape(recorded[0])
    model = {"model_name": "tiny-llama"}
    assert (
        value(
            families["mlxrelay_generation_tokens"][1], "mlxrelay_generation_tokens_total", **model
        )
        == 3
    )
    assert value(families["mlxrelay_prompt_tokens"][1], "mlxrelay_prompt_tokens_total") == 9
    success = families["mlxrelay_request_success"][1]
    by_reason = {s.labels["finished_reason"]: s.value for s in success}
    assert by_reason == {"stop": 0, "length": 1, "abort": 0}
    failure = families["mlxrelay_request_failure"][1]
    assert {s.labels["error_type"]: s.value for s in failure} == {"WorkerUnavailable": 1}

    steps = families["mlxrelay_stage_steps"][1]
    assert (
        value(steps, "mlxrelay_stage_steps_total", device="worker-0", stage="0", phase="decode")
        == 3
    )
    busy = families["mlxrelay_stage_busy_seconds"][1]
    assert value(busy, "mlxrelay_stage_busy_seconds_total", device="worker-0") == pytest.approx(
        0.0085
    )
    info = families["mlxrelay_stage_info"][1]
    assert (
        value(info, "mlxrelay_stage_info", device="worker-0", layer_start="0", layer_end="2") == 1
    )
    engine = {"backend": "cpu", "compute": "float32", "blas": "openblas", "threads": "1"}
    assert value(info, "mlxrelay_stage_info", device="worker-0", **engine) == 1

    requests = families["mlxrelay_network_requests"][1]
    outcomes = {s.labels["outcome"]: s.value for s in requests if s.labels["peer"] == "worker-0"}
    assert outcomes == {"ok": 1, "error": 0, "timeout": 1}
    sent = families["mlxrelay_network_transmit_bytes"][1]
    assert value(sent, "mlxrelay_network_transmit_bytes_total", peer="worker-0") == 100
    handled = families["grpc_client_handled"][1]
    codes = {s.labels["grpc_code"]: s.value for s in handled}
    assert codes == {"OK": 1, "DEADLINE_EXCEEDED": 1}
    assert {s.labels["grpc_service"] for s in handled} == {"mlxrelay.v1.Worker"}
    assert value(families["mlxrelay_model_info"][1], "mlxrelay_model_info", num_layers="4") == 1
    build = families["mlxrelay_build_info"][1]
    assert value(build, "mlxrelay_build_info", version=__version__, mlx_version="0.32.0") == 1


def test_devices_health_and_unmeasured_quantities(
    recorded: tuple[MetricsCollector, FakeClock],
) -> None:
    families = scrape(recorded[0])
    total = families["mlxrelay_device_memory_total_bytes"][1]
    assert {s.labels["device"]: s.value for s in total} == {
        "coordinator": MEMORY_TOTAL,
        "worker-0": MEMORY_TOTAL,
    }
    # No GPU reading: no sample at all, never a made-up 0.
    assert families["mlxrelay_device_gpu_utilization_ratio"][1] == []
    assert families["mlxrelay_device_gpu_memory_used_bytes"][1] == []

    up = {s.labels["device"]: s.value for s in families["mlxrelay_device_up"][1]}
    assert up == {"coordinator": 1, "worker-0": 1, "worker-1": 0}

    status = families["mlxrelay_health_status"][1]
    by_check: dict[tuple[str, str], dict[str, float]] = {}
    for sample in status:
        key = (sample.labels["device"], sample.labels["check"])
        by_check.setdefault(key, {})[sample.labels["status"]] = sample.value
    for states in by_check.values():
        assert set(states) == {"healthy", "warning", "critical", "unknown"}
        assert sum(states.values()) == 1
    assert by_check[("coordinator", "system_resources")]["warning"] == 1
    assert by_check[("coordinator", "overall")]["warning"] == 1
    assert by_check[("worker-1", "overall")]["critical"] == 1


def test_registers_only_on_the_given_registry_and_reads_per_scrape() -> None:
    calls = []
    collector = MetricsCollector("coordinator", 1.0, role="coordinator")

    def source():  # type: ignore[no-untyped-def]
        calls.append(1)
        return collector.snapshot()

    registry = CollectorRegistry()
    RelayCollector(source, registry=registry)
    assert calls == []  # registering takes no snapshot
    generate_latest(registry)
    generate_latest(registry)
    assert len(calls) == 2
    assert REGISTRY.get_sample_value("mlxrelay_build_info", {"version": __version__}) is None
    # Before any model or request, the request families exist with zero values.
    families = {
        f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())
    }
    success = families["mlxrelay_request_success"].samples
    assert {s.labels["finished_reason"]: s.value for s in success} == {
        "stop": 0,
        "length": 0,
        "abort": 0,
    }
    assert families["mlxrelay_model_info"].samples == []


def test_prometheus_format_renders_an_exported_snapshot_like_a_scrape(
    recorded: tuple[MetricsCollector, FakeClock],
) -> None:
    collector = recorded[0]
    exported = collector.export_metrics()
    text = prometheus_format(exported, health_summary().model_dump(mode="json"))
    families = {f.name: f for f in text_string_to_metric_families(text)}
    scraped = scrape(collector)
    assert set(families) == set(scraped)
    tokens = exported["inference"]["generation_tokens_total"]
    assert tokens > 0
    assert (
        value(families["mlxrelay_generation_tokens"].samples, "mlxrelay_generation_tokens_total")
        == tokens
    )
    assert any(
        s.labels.get("check") == "process_health"
        for s in families["mlxrelay_health_status"].samples
    )
