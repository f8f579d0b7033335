"""HistoryStore on a real SQLite file: writing, reading back, eviction, restarts, requests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mlx_relay.monitoring.history import HistoryStore, QueryError, build_tiers, plan_query
from mlx_relay.monitoring.history.series import COUNTER, GAUGE, SeriesSpec
from mlx_relay.monitoring.inference import RequestRecord

DAY = 86400.0
NOW = 1_800_000_000.0
TIERS = build_tiers(1.0, [(60.0, 30 * DAY), (3600.0, 365 * DAY)], DAY)
GAUGE_SPEC = SeriesSpec('g{device="a"}', "g", (("device", "a"),), GAUGE, "ratio")
COUNTER_SPEC = SeriesSpec("c_total", "c_total", (), COUNTER, "")


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def open_store(path: Path, clock: Clock, **kwargs: object) -> HistoryStore:
    store = HistoryStore(path, TIERS, wall_clock=clock, flush_interval=3600, **kwargs)  # type: ignore[arg-type]
    store.start()
    return store


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[HistoryStore]:
    store = open_store(tmp_path / "history.sqlite", clock)
    yield store
    store.close()


def record_seconds(
    store: HistoryStore, start: float, values: list[float], spec: SeriesSpec
) -> None:
    for i, value in enumerate(values):
        store.record(start + i, [(spec, value)])


def test_raw_samples_read_back_at_their_times(store: HistoryStore) -> None:
    values = [0.5, 0.25, 0.75, 1.0, 0.125, 0.0]  # exact in float32
    record_seconds(store, NOW - 6, values, GAUGE_SPEC)
    assert store.flush()
    plan = plan_query(TIERS, NOW, after=NOW - 6, before=NOW, points=6)
    assert plan.tier.raw
    plan = type(plan)(plan.tier, NOW - 6, NOW, 6)  # one bucket per second
    [(spec, got)] = store.query([GAUGE_SPEC.key], plan, "avg")
    assert spec == GAUGE_SPEC
    assert got == values


def test_minute_points_are_count_sum_min_max_of_the_samples(tmp_path: Path, clock: Clock) -> None:
    store = open_store(tmp_path / "h.sqlite", clock)
    start = NOW - 180  # three whole minutes
    values = [float(i % 10) for i in range(180)]
    record_seconds(store, start, values, GAUGE_SPEC)
    store.close()  # closing writes the open (partial) buckets too
    store = open_store(tmp_path / "h.sqlite", clock)
    try:
        plan = plan_query(TIERS, NOW, after=start, before=NOW, points=3)
        assert plan.tier.index == 1
        by_group = {
            g: store.query([GAUGE_SPEC.key], plan, g)[0][1] for g in ("avg", "sum", "min", "max")
        }
        minute = values[:60]
        assert by_group["sum"] == [sum(minute)] * 3
        assert by_group["avg"] == [sum(minute) / 60] * 3
        assert by_group["min"] == [0.0] * 3
        assert by_group["max"] == [9.0] * 3
    finally:
        store.close()


def test_data_survives_a_restart_and_the_gap_stays_a_gap(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "h.sqlite"
    store = open_store(path, clock)
    record_seconds(store, NOW - 100, [1.0] * 30, GAUGE_SPEC)  # NOW-100 .. NOW-71
    store.close()
    store = open_store(path, clock)  # "restarted" 40 s later
    try:
        record_seconds(store, NOW - 30, [2.0] * 30, GAUGE_SPEC)
        store.flush()
        plan = plan_query(TIERS, NOW, after=NOW - 100, before=NOW, points=10)
        values = store.query([GAUGE_SPEC.key], plan, "avg")[0][1]
        assert values == [1.0, 1.0, 1.0, None, None, None, None, 2.0, 2.0, 2.0]
    finally:
        store.close()


def test_counters_read_as_rates_across_a_reset(store: HistoryStore) -> None:
    # +2/s, then the process restarts and counts from 0 again at +3/s.
    values = [100.0 + 2 * i for i in range(10)] + [3.0 * i for i in range(1, 11)]
    record_seconds(store, NOW - 20, values, COUNTER_SPEC)
    store.flush()
    plan = plan_query(TIERS, NOW, after=NOW - 20, before=NOW, points=4)
    rates = store.query([COUNTER_SPEC.key], plan, "avg")[0][1]
    # Buckets of 5 s; the first sample has no rate, so the first bucket has 4.
    assert rates == [2.0, 2.0, 3.0, 3.0]
    assert store.catalogue()[0].read_unit == "1/s"


def test_age_eviction_drops_each_tier_past_its_retention(tmp_path: Path, clock: Clock) -> None:
    store = open_store(tmp_path / "h.sqlite", clock, block_samples=60)
    try:
        old = NOW - DAY - 7200  # older than the raw tier keeps
        record_seconds(store, old, [1.0] * 600, GAUGE_SPEC)
        record_seconds(store, NOW - 600, [2.0] * 600, GAUGE_SPEC)
        store.flush()
        raw_old = plan_query(TIERS, NOW, after=old, before=old + 600, points=10)
        # Older than the raw tier's day: planned on the minute tier, which still has it.
        assert raw_old.tier.index == 1
        assert store.query([GAUGE_SPEC.key], raw_old, "avg")[0][1] == [1.0] * 10
        raw = type(raw_old)(TIERS[0], old, old + 600, 10)
        assert store.query([GAUGE_SPEC.key], raw, "avg")[0][1] == [None] * 10
        recent = plan_query(TIERS, NOW, after=-600, points=10)
        assert store.query([GAUGE_SPEC.key], recent, "avg")[0][1] == [2.0] * 10
        clock.now = NOW + 31 * DAY  # past the minute tier too
        store.record(clock.now, [(GAUGE_SPEC, 3.0)])
        store.flush()
        minutes = type(raw_old)(TIERS[1], old, old + 600, 10)
        assert store.query([GAUGE_SPEC.key], minutes, "avg")[0][1] == [None] * 10
        hours = plan_query(TIERS, clock.now, after=NOW - DAY - 7200, before=NOW, points=2)
        assert hours.tier.index == 2
        assert store.query([GAUGE_SPEC.key], hours, "max")[0][1] == [1.0, 2.0]
    finally:
        store.close()


def test_size_cap_evicts_the_oldest_first(tmp_path: Path, clock: Clock) -> None:
    cap = 256 * 1024
    store = open_store(tmp_path / "h.sqlite", clock, max_bytes=cap, block_samples=60)
    try:
        specs = [SeriesSpec(f"s{i}", f"s{i}", (), GAUGE, "") for i in range(20)]
        start = NOW - 6 * 3600
        for second in range(6 * 3600):
            # Noisy values compress badly: a few bytes each.
            store.record(
                start + second,
                [(s, ((second * 7919 + i) % 1000) / 7.0) for i, s in enumerate(specs)],
            )
            if second % 3600 == 3599:
                store.flush()
        store.flush()
        stats = store.stats()
        assert stats.bytes <= cap
        raw = plan_query(TIERS, NOW, after=start, before=NOW, points=6)
        raw = type(raw)(TIERS[0], start, NOW, 6)
        first_hour, *_, last_hour = store.query(["s0"], raw, "avg")[0][1]
        assert first_hour is None  # the oldest went first
        assert last_hour is not None  # the newest is kept
        assert (tmp_path / "h.sqlite").stat().st_size <= 2 * cap  # pages were given back
    finally:
        store.close()


def request(i: int, *, status: str = "ok", e2e: float = 1.0) -> RequestRecord:
    return RequestRecord(
        request_id=f"r{i}",
        arrival=NOW - 100 + i,
        status=status,
        finish_reason="stop" if status == "ok" else None,
        error_type="WorkerUnavailable" if status == "error" else None,
        queue_seconds=0.01,
        ttft_seconds=0.1,
        e2e_seconds=e2e,
        prompt_tokens=10 + i,
        generated_tokens=5,
        stage_seconds={"worker-0": 0.2, "worker-1": 0.3},
    )


def test_request_log_filters_orders_and_pages(store: HistoryStore) -> None:
    for i in range(10):
        store.record_request(request(i, status="error" if i % 3 == 0 else "ok", e2e=float(i % 4)))
    store.flush()
    page, total = store.requests(
        after=NOW - 200, before=NOW, status=None, limit=3, offset=0, order="newest"
    )
    assert total == 10
    assert [r["request_id"] for r in page] == ["r9", "r8", "r7"]
    assert page[0]["stage_seconds"] == {"worker-0": 0.2, "worker-1": 0.3}
    errors, total = store.requests(
        after=NOW - 200, before=NOW, status="error", limit=10, offset=0, order="oldest"
    )
    assert total == 4
    assert [r["request_id"] for r in errors] == ["r0", "r3", "r6", "r9"]
    slowest, _ = store.requests(
        after=NOW - 200, before=NOW, status=None, limit=2, offset=1, order="slowest"
    )
    assert [r["e2e_seconds"] for r in slowest] == [3.0, 2.0]


def test_unknown_series_is_a_query_error(store: HistoryStore) -> None:
    store.record(NOW, [(GAUGE_SPEC, 1.0)])
    store.flush()
    plan = plan_query(TIERS, NOW, after=-60)
    with pytest.raises(QueryError) as error:
        store.query(["nope"], plan, "avg")
    assert error.value.param == "series"


def test_stats_count_rows_and_bytes(store: HistoryStore) -> None:
    record_seconds(store, NOW - 10, [1.0] * 10, GAUGE_SPEC)
    store.record_request(request(1))
    store.flush()
    stats = store.stats()
    assert stats.series == 1
    assert stats.samples_written == 10
    assert stats.request_rows == 1
    assert stats.block_rows >= 1
    assert stats.bytes > 0
    assert stats.write_lag_seconds is not None and stats.write_lag_seconds >= 0


def test_a_failed_commit_loses_that_batch_only(
    store: HistoryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    from mlx_relay.monitoring.history.writer import BlockWriter

    record_seconds(store, NOW - 30, [1.0] * 10, GAUGE_SPEC)
    assert store.flush()
    real_write = BlockWriter.write
    calls = {"n": 0}

    def disk_full_once(self: BlockWriter) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            raise sqlite3.OperationalError("database or disk is full")
        return real_write(self)

    monkeypatch.setattr(BlockWriter, "write", disk_full_once)
    record_seconds(store, NOW - 20, [2.0] * 10, GAUGE_SPEC)
    assert store.flush()  # this commit fails
    record_seconds(store, NOW - 10, [3.0] * 10, GAUGE_SPEC)
    assert store.flush()
    assert store.stats().failed_commits == 1
    plan = plan_query(TIERS, NOW, after=NOW - 30, before=NOW, points=3)
    plan = type(plan)(TIERS[0], NOW - 30, NOW, 3)
    assert store.query([GAUGE_SPEC.key], plan, "avg")[0][1] == [1.0, None, 3.0]
