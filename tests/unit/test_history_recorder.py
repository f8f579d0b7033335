"""What the history keeps: the request log records of traces, and the recorder's series."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mlx_relay.core.history_config import HistoryConfig
from mlx_relay.monitoring import MetricsCollector
from mlx_relay.monitoring.history import HistoryRecorder, HistoryStore, plan_query
from mlx_relay.monitoring.history.config import default_path, tiers_from_config
from mlx_relay.monitoring.history.series import SeriesCatalog, unit_of
from mlx_relay.monitoring.inference import RequestRecord
from mlx_relay.monitoring.prometheus import prometheus_format
from mlx_relay.monitoring.snapshot import DeviceMetrics
from tests.support.fakes import FakeClock, canned_device_metrics

WALL = 1_800_000_000.0


Clock = FakeClock


def device(at: float) -> DeviceMetrics:
    return canned_device_metrics(at)


def collector_at(clock: Clock, wall: Clock) -> MetricsCollector:
    return MetricsCollector("coordinator", 1.0, role="coordinator", clock=clock, wall_clock=wall)


def test_a_finished_trace_becomes_a_request_record_without_text() -> None:
    clock, wall = Clock(100.0), Clock(WALL)
    collector = collector_at(clock, wall)
    records: list[RequestRecord] = []
    collector.set_request_log(records.append)
    trace = collector.track_request(prompt_tokens=7, queued_at=99.5, request_id="abc")
    clock.now = 100.25
    trace.started()
    clock.now = 100.5
    trace.token()
    trace.stage_time("worker-0", 0.125)
    trace.stage_time("worker-1", 0.25)
    trace.stage_time("worker-0", 0.125)
    clock.now = 101.0
    trace.token(2)
    wall.now = WALL + 1.5
    trace.finish("length")
    [record] = records
    assert record == RequestRecord(
        request_id="abc",
        arrival=WALL + 1.5 - 1.5,
        status="ok",
        finish_reason="length",
        error_type=None,
        queue_seconds=0.75,
        ttft_seconds=1.0,
        e2e_seconds=1.5,
        prompt_tokens=7,
        generated_tokens=3,
        stage_seconds={"worker-0": 0.25, "worker-1": 0.25},
        network_seconds=0.0,
    )


def test_failed_and_aborted_requests_are_logged_with_their_status() -> None:
    clock, wall = Clock(10.0), Clock(WALL)
    collector = collector_at(clock, wall)
    records: list[RequestRecord] = []
    collector.set_request_log(records.append)
    collector.track_request(prompt_tokens=1, request_id="a").fail("WorkerUnavailable", "secret")
    collector.track_request(prompt_tokens=1, request_id="b").finish("abort")
    assert [(r.request_id, r.status, r.error_type, r.finish_reason) for r in records] == [
        ("a", "error", "WorkerUnavailable", None),
        ("b", "aborted", None, "abort"),
    ]
    assert records[0].ttft_seconds is None
    collector.set_request_log(None)
    collector.track_request(prompt_tokens=1).finish("stop")
    assert len(records) == 2


def test_a_failing_request_log_never_fails_the_request() -> None:
    collector = collector_at(Clock(1.0), Clock(WALL))

    def broken(record: RequestRecord) -> None:
        raise RuntimeError("disk full")

    collector.set_request_log(broken)
    collector.track_request(prompt_tokens=1).finish("stop")
    assert collector.snapshot().inference.success_total["stop"] == 1


def test_series_are_every_gauge_and_counter_of_the_exposition(tmp_path: Path) -> None:
    clock, wall = Clock(10.0), Clock(WALL)
    collector = collector_at(clock, wall)
    collector.record_device_sample(device(WALL))
    collector.track_request(prompt_tokens=3).finish("stop")
    text = prometheus_format(collector.snapshot())
    kinds = {}
    sampled = set()
    for line in text.splitlines():
        if line.startswith("# TYPE"):
            _, _, name, kind = line.split()
            kinds[name.removesuffix("_total")] = kind
        elif not line.startswith("#"):
            sampled.add(line.split("{")[0].split(" ")[0])
    from mlx_relay import __version__
    from mlx_relay.monitoring.prometheus_families import snapshot_families

    catalog = SeriesCatalog()
    samples = list(catalog.samples(snapshot_families(collector.snapshot(), None, __version__)))
    families = {spec.family for spec, _ in samples}
    kept = {n for n in sampled if kinds.get(n.removesuffix("_total")) in ("gauge", "counter")}
    kept |= {n for n in sampled if n.endswith(("_sum", "_count"))}
    assert len(kept) > 20
    assert kept == families
    values = {spec.key: v for spec, v in samples}
    assert values['mlxrelay_device_memory_used_bytes{device="coordinator"}'] == 600.0
    assert values['mlxrelay_request_success_total{model_name="",finished_reason="stop"}'] == 1.0
    assert unit_of("mlxrelay_device_memory_used_bytes") == "bytes"
    assert unit_of("mlxrelay_e2e_request_latency_seconds_sum") == "seconds"
    assert unit_of("mlxrelay_e2e_request_latency_seconds_count") == ""
    assert unit_of("mlxrelay_device_last_seen_timestamp_seconds") == "unix seconds"


async def test_the_recorder_writes_chart_lines_and_metrics(tmp_path: Path) -> None:
    clock, wall = Clock(10.0), Clock(WALL)
    collector = collector_at(clock, wall)
    tiers = tiers_from_config(HistoryConfig(), 1.0)
    store = HistoryStore(tmp_path / "h.sqlite", tiers, wall_clock=wall)
    store.start()
    recorder = HistoryRecorder(store, collector)
    try:
        await recorder.start()
        for i in range(5):
            wall.now = WALL + i
            clock.now = 10.0 + i
            collector.record_device_sample(device(wall.now))
            await asyncio.to_thread(recorder.record_once)
        collector.track_request(prompt_tokens=2, request_id="r").finish("stop")
        await recorder.stop()
        assert store.flush()
        keys = {spec.key for spec in store.catalogue()}
        assert {"chart.cpu_utilization_ratio", "mlxrelay_history_store_bytes"} <= keys
        plan = plan_query(tiers, WALL + 5, after=WALL, before=WALL + 5, points=4)
        [(_, cpu)] = store.query(["chart.cpu_utilization_ratio"], plan, "avg")
        assert cpu == [0.25] * 4
        rows, total = store.requests(
            after=0, before=WALL * 2, status=None, limit=5, offset=0, order="newest"
        )
        assert total == 1 and rows[0]["request_id"] == "r"
    finally:
        store.close()


def test_default_path_is_the_user_state_directory() -> None:
    assert default_path({"XDG_STATE_HOME": "/x"}) == Path("/x/mlx-relay/history.sqlite")
    home = default_path({})
    assert home.parts[-4:] == (".local", "state", "mlx-relay", "history.sqlite")


def test_an_unwritable_path_is_one_clear_error(tmp_path: Path) -> None:
    from mlx_relay.core.errors import RelayError

    blocker = tmp_path / "file"
    blocker.write_text("")
    store = HistoryStore(blocker / "h.sqlite", tiers_from_config(HistoryConfig(), 1.0))
    with pytest.raises(RelayError, match="cannot open the history store"):
        store.start()
