"""MetricsCollector: values computed by hand from recorded inputs on a fake clock."""

from __future__ import annotations

import asyncio
import gc
import threading
import tracemalloc

import pytest

from mlx_relay.monitoring import MetricsCollector, Snapshot
from mlx_relay.monitoring.snapshot import DeviceMetrics
from tests.support.fakes import FakeClock, canned_device_metrics


class FixedSampler:
    """A device sampler that returns a canned sample with a rising timestamp."""

    def __init__(self) -> None:
        self.calls = 0

    def sample(self) -> DeviceMetrics:
        self.calls += 1
        return canned_device_metrics(float(self.calls))


def collector(clock: FakeClock, **kwargs: object) -> MetricsCollector:
    return MetricsCollector(
        "coord",
        role="coordinator",
        clock=clock,
        wall_clock=lambda: 1.7e9 + clock.now,
        device_sampler=FixedSampler(),
        **kwargs,  # type: ignore[arg-type]
    )


def three_requests(c: MetricsCollector, clock: FakeClock) -> None:
    """r1: 3 tokens, stop; r2: queued 3 s, fails; r3: 2 tokens in one call, length."""
    clock.at(1000.0)
    r1 = c.track_request(prompt_tokens=10)
    for t in (1000.5, 1001.0, 1001.5):
        clock.at(t)
        r1.token()
    clock.at(1002.0)
    r1.finish("stop")
    r2 = c.track_request(prompt_tokens=7, queued_at=999.0)
    clock.at(1002.5)
    r2.started()
    clock.at(1003.0)
    r2.token()
    clock.at(1003.5)
    r2.fail("WorkerUnavailable", "worker 'w1': connection refused")
    clock.at(1004.0)
    r3 = c.track_request(prompt_tokens=4)
    clock.at(1004.2)
    r3.token(2)
    clock.at(1005.0)
    r3.finish("length")


def test_totals_throughput_and_error_rate() -> None:
    clock = FakeClock()
    c = collector(clock)
    three_requests(c, clock)
    inf = c.snapshot().inference
    assert inf.requests_total == 3
    assert inf.requests_running == 0
    assert inf.success_total == {"stop": 1, "length": 1, "abort": 0}
    assert inf.failure_total == {"WorkerUnavailable": 1}
    assert inf.prompt_tokens_total == 21
    assert inf.generation_tokens_total == 6
    # 5 s of uptime: both windows divide by 5 s.
    for name in ("10s", "60s"):
        w = inf.windows[name]
        assert w.elapsed_seconds == 5.0
        assert w.requests_per_second == pytest.approx(3 / 5)
        assert w.tokens_per_second == pytest.approx(6 / 5)
        assert w.prompt_tokens_per_second == pytest.approx(21 / 5)
        assert w.error_rate == pytest.approx(1 / 3)
        assert w.error_rate_by_type == {"WorkerUnavailable": pytest.approx(1 / 3)}
    assert [(e.error_type, e.message) for e in inf.recent_errors] == [
        ("WorkerUnavailable", "worker 'w1': connection refused")
    ]
    assert inf.recent_errors[0].timestamp == 1.7e9 + 1003.5
    throughput = c.get_throughput()
    assert throughput["requests_per_second"] == pytest.approx(0.6)
    assert throughput["windows"]["60s"]["tokens_per_second"] == pytest.approx(1.2)


def test_window_expiry_drops_old_requests() -> None:
    clock = FakeClock()
    c = collector(clock)
    three_requests(c, clock)
    clock.at(1014.5)  # 10 s window = buckets 1005..1014: only r3's finish remains
    w10 = c.snapshot().inference.windows["10s"]
    assert w10.elapsed_seconds == 10.0
    assert w10.requests_per_second == pytest.approx(0.1)
    assert w10.tokens_per_second == 0.0  # r3's tokens came at 1004.2
    assert w10.error_rate == 0.0
    assert c.snapshot().inference.windows["60s"].requests_per_second == pytest.approx(3 / 14.5)
    clock.at(1070.0)
    w60 = c.snapshot().inference.windows["60s"]
    assert (w60.requests_per_second, w60.tokens_per_second, w60.error_rate) == (0.0, 0.0, None)
    assert c.snapshot().inference.requests_total == 3  # totals never expire


def test_latencies_by_hand() -> None:
    clock = FakeClock()
    c = collector(clock)
    three_requests(c, clock)
    lat = c.snapshot().inference.latency
    # e2e: r1 2.0, r3 1.0 (a failed request has no e2e sample).
    assert (lat["e2e"].count, lat["e2e"].p50, lat["e2e"].mean) == (2, 1.5, 1.5)
    assert lat["e2e"].p90 == pytest.approx(1.9)
    assert lat["e2e"].p99 == pytest.approx(1.99)
    # ttft from arrival: r1 0.5, r2 4.0 (queued at 999), r3 0.2.
    assert lat["ttft"].count == 3
    assert lat["ttft"].p50 == pytest.approx(0.5)
    assert lat["ttft"].p90 == pytest.approx(0.5 + 0.8 * 3.5)
    assert lat["ttft"].mean == pytest.approx(4.7 / 3)
    assert lat["ttft"].max == 4.0
    # queue: r1 0, r2 started at 1002.5 after arriving at 999, r3 0.
    assert lat["queue"].p50 == 0.0 and lat["queue"].max == pytest.approx(3.5)
    assert lat["prefill"].count == 3 and lat["prefill"].p50 == pytest.approx(0.5)
    assert lat["prefill"].mean == pytest.approx(1.2 / 3)
    # inter-token: r1's two gaps of 0.5 s.
    assert (lat["inter_token"].count, lat["inter_token"].mean) == (2, pytest.approx(0.5))
    # time per output token: r1 (2.0 - 0.5) / 2 = 0.75; r3 (1.0 - 0.2) / 1 = 0.8.
    assert lat["time_per_output_token"].count == 2
    assert lat["time_per_output_token"].mean == pytest.approx(0.775)
    # decode: r1 2.0 - 0.5 = 1.5, r3 1.0 - 0.2 = 0.8.
    assert lat["decode"].max == pytest.approx(1.5) and lat["decode"].p50 == pytest.approx(1.15)


def test_histograms_use_metrics_md_buckets() -> None:
    clock = FakeClock()
    c = collector(clock)
    three_requests(c, clock)
    hist = c.snapshot().inference.histograms
    e2e = hist["e2e_request_latency_seconds"]
    assert e2e.buckets[:6] == [0.3, 0.5, 0.8, 1.0, 1.5, 2.0]
    assert e2e.cumulative_counts[:6] == [0, 0, 0, 1, 1, 2]
    assert (e2e.count, e2e.sum) == (2, pytest.approx(3.0))
    ttft = hist["time_to_first_token_seconds"]
    assert ttft.buckets[0] == 0.001 and ttft.count == 3 and ttft.sum == pytest.approx(4.7)
    assert ttft.cumulative_counts[ttft.buckets.index(0.25)] == 1  # 0.2
    assert ttft.cumulative_counts[ttft.buckets.index(0.5)] == 2  # + 0.5
    assert ttft.cumulative_counts[ttft.buckets.index(5.0)] == 3  # + 4.0
    gen = hist["request_generation_tokens"]
    assert (gen.count, gen.sum) == (2, 5.0)
    assert gen.cumulative_counts[:3] == [0, 1, 2]  # le=1, le=2 (r3), le=5 (r1)
    assert hist["request_prompt_tokens"].sum == 14.0  # finished requests only
    assert set(hist) >= {
        "inter_token_latency_seconds",
        "request_time_per_output_token_seconds",
        "request_queue_time_seconds",
        "request_prefill_time_seconds",
        "request_decode_time_seconds",
    }


def test_trace_verdict_is_recorded_once_and_context_manager() -> None:
    clock = FakeClock()
    c = collector(clock)
    trace = c.track_request(prompt_tokens=1)
    trace.finish("stop")
    trace.finish("stop")
    trace.fail("X")
    trace.token()
    with pytest.raises(ValueError):
        c.track_request(prompt_tokens=1).finish("done")
    with pytest.raises(RuntimeError), c.track_request(prompt_tokens=1):
        raise RuntimeError("boom")
    inf = c.snapshot().inference
    # The request whose finish() raised is still running: the verdict was refused.
    assert inf.requests_running == 1
    assert inf.success_total["stop"] == 1
    assert inf.failure_total == {"RuntimeError": 1}
    assert inf.generation_tokens_total == 0


def test_stage_and_network_time_per_request() -> None:
    clock = FakeClock()
    c = collector(clock)
    trace = c.track_request(prompt_tokens=2)
    trace.stage_time("w0", 0.02)
    trace.stage_time("w1", 0.03)
    trace.network_time(0.004)
    trace.token()
    clock.at(1001.0)
    trace.finish("stop")
    lat = c.snapshot().inference.latency
    assert lat["stage"].p50 == pytest.approx(0.05)
    assert lat["network"].p50 == pytest.approx(0.004)


def test_stage_forward_metrics() -> None:
    clock = FakeClock()
    c = MetricsCollector("w1", clock=clock, device_sampler=FixedSampler())
    assert c.snapshot().stages == {}  # no stage until the worker records one
    for seconds in (0.01, 0.02, 0.03):
        c.record_stage_forward(1, "decode", seconds, 1)
    c.record_stage_forward(1, "prefill", 0.1, 12)
    c.set_kv_sessions(2)
    with pytest.raises(ValueError):
        c.record_stage_forward(1, "sample", 0.1, 1)
    clock.at(1005.0)
    snap = c.snapshot()
    stage = snap.stages["w1"]
    assert stage.stage == 1 and snap.devices["w1"].stage == 1
    assert stage.busy_seconds_total == pytest.approx(0.16)
    assert stage.steps_total == {"prefill": 1, "decode": 3}
    assert stage.tokens_total == {"prefill": 12, "decode": 3}
    assert stage.kv_sessions == 2
    assert stage.forward_seconds["decode"].p50 == pytest.approx(0.02)
    assert stage.utilization_ratio_10s == pytest.approx(0.16 / 5)
    decode = stage.forward_duration_seconds["decode"]
    assert decode.buckets[0] == 0.0005
    assert decode.cumulative_counts[decode.buckets.index(0.01)] == 1
    assert decode.cumulative_counts[decode.buckets.index(0.02)] == 2
    assert decode.cumulative_counts[decode.buckets.index(0.05)] == 3


def test_network_links_and_rpc() -> None:
    clock = FakeClock()
    c = collector(clock)
    c.add_peer("w0")
    c.record_ping("w1", 0.001)
    c.record_ping("w1", 0.003)
    c.record_ping("w1", None, timeout=True)
    c.record_ping("w1", None, error="connection refused")
    c.record_network_rtt("w1", 0.0002, method="tcp_info", ping_rtt_seconds=0.003)
    c.record_network_rtt("w1", 0.0001, method="tcp_info", ping_rtt_seconds=None)
    c.record_network_rtt("w0", None, error="connection refused")
    c.record_rpc("w1", "Forward", 0.02, "OK", sent_bytes=1000, received_bytes=40)
    c.record_rpc("w1", "Forward", 0.5, "UNAVAILABLE", sent_bytes=1000)
    c.record_rpc("w1", "Forward", 2.0, "DEADLINE_EXCEEDED")
    c.record_transfer("w1", 0.004)
    net = c.snapshot().network
    w0, w1 = net.links
    assert (w0.peer, w0.ping_total, w0.rtt_last_seconds) == (
        "w0",
        {"ok": 0, "error": 0, "timeout": 0},
        None,
    )
    assert w0.rtt_unavailable_reason == "connection refused"
    assert w1.device == "coord"
    # The Ping RPC's own round trips...
    assert w1.ping_rtt_last_seconds == 0.003
    assert (w1.ping_rtt.count, w1.ping_rtt.p50) == (2, pytest.approx(0.002))
    # ...apart from the network's, and the overhead only where a ping came in the same poll.
    assert (w1.rtt_last_seconds, w1.rtt_method, w1.rtt_unavailable_reason) == (
        0.0001,
        "tcp_info",
        None,
    )
    assert (w1.rtt.count, w1.rtt.p50) == (2, pytest.approx(0.00015))
    assert w1.rtt_histogram.count == 2
    assert w1.rpc_overhead_last_seconds == pytest.approx(0.0028)
    assert w1.rpc_overhead.count == 1
    assert w1.rpc_overhead_histogram is not None and w1.rpc_overhead_histogram.count == 1
    assert w1.ping_total == {"ok": 2, "error": 1, "timeout": 1}
    assert w1.requests_total == {"ok": 1, "error": 1, "timeout": 1}
    assert (w1.transmit_bytes_total, w1.receive_bytes_total) == (2000, 40)
    assert w1.last_error == "Forward: DEADLINE_EXCEEDED"
    assert w1.last_error_timestamp == 1.7e9 + 1000.0
    assert w1.transfer_duration_seconds.count == 1 and w1.transfer.p50 == 0.004
    (rpc,) = net.rpc
    assert (rpc.peer, rpc.method) == ("w1", "Forward")
    assert rpc.handled_total == {"OK": 1, "UNAVAILABLE": 1, "DEADLINE_EXCEEDED": 1}
    assert rpc.handling_seconds.sum == pytest.approx(2.52)


def test_device_status_and_model_info() -> None:
    clock = FakeClock()
    c = collector(clock)
    c.set_model_info("SmolLM2-135M-Instruct", "q4_1", 30, 2)
    c.update_device_status("w0", model_loaded=True, assigned_layers=[0, 1, 2], is_healthy=True,
                           role="worker", stage=0)  # fmt: skip
    with pytest.raises(TypeError):
        c.update_device_status("w0", color="red")
    snap = c.snapshot()
    assert snap.model is not None and snap.model.num_stages == 2
    w0 = snap.devices["w0"]
    assert (w0.layer_start, w0.layer_end, w0.assigned_layers) == (0, 3, [0, 1, 2])
    assert (w0.model_loaded, w0.is_healthy, w0.stage, w0.role) == (True, True, 0, "worker")
    assert w0.last_seen_timestamp == 1.7e9 + 1000.0
    assert snap.devices["coord"].role == "coordinator"


def test_remote_snapshot_fills_the_cluster_view() -> None:
    clock = FakeClock()
    worker = MetricsCollector("w1", clock=clock, device_sampler=FixedSampler())
    worker.record_device_sample(FixedSampler().sample())
    worker.record_stage_forward(1, "decode", 0.04, 1)
    worker.update_device_status("w1", model_loaded=True, assigned_layers=[2, 3], stage=1)
    worker.record_ping("w2", 0.002)
    coord = collector(clock)
    coord.update_remote_snapshot("w1", worker.export_metrics())
    clock.at(1010.0)
    snap = coord.snapshot()
    w1 = snap.devices["w1"]
    assert (w1.up, w1.model_loaded, w1.layer_start, w1.layer_end, w1.stage) == (True, True, 2, 4, 1)
    assert w1.metrics is not None and w1.metrics.memory_used_ratio == 0.6
    assert w1.last_seen_timestamp == 1.7e9 + 1000.0
    assert snap.stages["w1"].steps_total["decode"] == 1
    assert [(link.device, link.peer) for link in snap.network.links] == [("w1", "w2")]
    coord.update_remote_snapshot("w1", None, error="connection refused")
    w1 = coord.snapshot().devices["w1"]
    assert (w1.up, w1.last_error) == (False, "connection refused")
    assert w1.last_seen_timestamp == 1.7e9 + 1000.0  # kept from the last good poll
    assert w1.metrics is not None
    coord.update_remote_snapshot("w1", {"nonsense": True})
    last_error = coord.snapshot().devices["w1"].last_error
    assert last_error is not None and last_error.startswith("invalid status snapshot")


def test_export_round_trips_through_the_schema() -> None:
    clock = FakeClock()
    c = collector(clock)
    three_requests(c, clock)
    c.record_device_sample(FixedSampler().sample())
    data = c.export_metrics()
    assert Snapshot.model_validate(data) == c.snapshot().model_copy(
        update={"timestamp": data["timestamp"]}
    )
    assert data["device"]["gpu_utilization_ratio"] is None
    assert data["history"][0]["requests_per_second"] == pytest.approx(3 / 5)
    assert c.get_device_metrics()["cpu_utilization_ratio"] == 0.25
    assert c.get_inference_metrics()["requests_total"] == 3


def test_concurrent_recording_from_threads_keeps_exact_totals() -> None:
    c = MetricsCollector("coord", device_sampler=FixedSampler())

    def work() -> None:
        for _ in range(2000):
            trace = c.track_request(prompt_tokens=3)
            trace.token()
            trace.token()
            trace.finish("stop")
            c.record_rpc("w1", "Forward", 0.001, "OK", sent_bytes=1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = c.snapshot()
    assert snap.inference.success_total["stop"] == 8000
    assert snap.inference.generation_tokens_total == 16000
    assert snap.inference.requests_running == 0
    assert snap.network.links[0].transmit_bytes_total == 8000


def record_many(
    c: MetricsCollector, clock: FakeClock, n: int, start: int, peers: int, error_types: int
) -> None:
    for i in range(start, start + n):
        clock.now += 0.01
        trace = c.track_request(prompt_tokens=5)
        trace.token()
        trace.token()
        if i % 10:
            trace.finish("stop")
        else:
            trace.fail(f"Error{i % error_types}", "x" * 500)
        c.record_ping(f"peer{i % peers}", 0.001)
        c.record_rpc("w1", f"Method{i % 50}", 0.001, f"CODE{i % 40}")


def test_memory_stays_bounded() -> None:
    # Structural bound at test scale; bench/monitoring_overhead.py checks 1,000,000 requests.
    # Tracing starts before the warm-up so that replaced ring entries cancel out.
    tracemalloc.start()
    try:
        clock = FakeClock()
        c = collector(clock, retention_seconds=1e9)
        record_many(c, clock, 4000, 0, peers=10, error_types=3)  # fills every ring
        c.snapshot()
        gc.collect()
        before = tracemalloc.take_snapshot()
        record_many(c, clock, 30000, 4000, peers=10, error_types=3)
        c.snapshot()
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    growth = sum(
        s.size_diff
        for s in after.compare_to(before, "filename")
        if "mlx_relay" in s.traceback[0].filename
    )
    assert growth < 16 * 1024, f"collector grew by {growth} bytes over 30,000 requests"
    assert c.snapshot().inference.latency["inter_token"].count == 1024


def test_labels_and_rings_are_capped() -> None:
    clock = FakeClock()
    c = collector(clock, retention_seconds=1e9)
    record_many(c, clock, 3000, 0, peers=100, error_types=1000)
    snap = c.snapshot()
    assert len(snap.inference.failure_total) == 33  # 32 error types + "other"
    assert sum(snap.inference.failure_total.values()) == 300
    assert len(snap.network.links) == 65  # 64 peers + "other"
    assert len(snap.network.rpc) == 16 + 1  # 16 methods of "w1" + "other"
    fresh = collector(clock)
    for code in range(40):
        fresh.record_rpc("w1", "Forward", 0.001, f"CODE{code}")
    (forward,) = fresh.snapshot().network.rpc
    assert len(forward.handled_total) == 20 + 1  # 20 codes + "other"
    assert forward.handled_total["other"] == 20
    assert len(snap.inference.recent_errors) == 20
    assert all(len(e.message) == 200 for e in snap.inference.recent_errors)


async def test_running_collector_samples_and_stops_cleanly() -> None:
    sampler = FixedSampler()
    c = MetricsCollector("w0", collection_interval=0.05, device_sampler=sampler)
    await c.start()
    assert c.snapshot().device is not None  # start() takes the first sample itself
    for _ in range(500):
        if len(c.snapshot().history) >= 4:
            break
        await asyncio.sleep(0.01)
    history = c.snapshot().history
    assert len(history) >= 4
    stamps = [p.timestamp for p in history]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    await c.stop()
    assert not c.running
    # Stopped means no sampling task is left at all, and every round that ran was recorded:
    # one sample, one history point.
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
    assert sampler.calls == len(c.snapshot().history)


async def test_history_ring_is_bounded() -> None:
    c = MetricsCollector("w0", collection_interval=2.0, retention_seconds=10.0)
    sample = FixedSampler()
    for _ in range(20):
        c.record_device_sample(sample.sample())
    assert len(c.snapshot().history) == 5
