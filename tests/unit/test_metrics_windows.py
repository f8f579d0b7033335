"""Pure statistics: percentiles, histograms, rate windows and bucket constants."""

from __future__ import annotations

import random
import statistics

import pytest

from mlx_relay.monitoring.windows import (
    REQUEST_BUCKETS,
    STAGE_FORWARD_BUCKETS,
    TTFT_BUCKETS,
    Histogram,
    RateWindow,
    SampleWindow,
    percentile,
    summarize,
    token_count_buckets,
)


def test_percentile_by_hand() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 10.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 3.0
    # position (5 - 1) * 0.9 = 3.6 -> 4 + 0.6 * (10 - 4)
    assert percentile(values, 90) == pytest.approx(7.6)
    assert percentile(values, 100) == 10.0
    assert percentile([5.0], 99) == 5.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_percentile_matches_statistics_inclusive() -> None:
    rng = random.Random(7)
    values = sorted(rng.expovariate(3.0) for _ in range(777))
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    for q in (50, 90, 99):
        assert percentile(values, q) == pytest.approx(cuts[q - 1])


def test_summarize() -> None:
    s = summarize([0.3, 0.1, 0.2])
    assert (s.count, s.p50, s.max) == (3, 0.2, 0.3)
    assert s.mean == pytest.approx(0.2)
    assert s.p90 == pytest.approx(0.28)
    empty = summarize([])
    assert empty.count == 0 and empty.p50 is None and empty.mean is None


def test_histogram_le_semantics_and_cumulative_counts() -> None:
    h = Histogram([0.1, 0.5, 1.0])
    for v in (0.05, 0.1, 0.3, 1.0, 7.0):
        h.observe(v)
    snap = h.snap()
    assert snap.buckets == [0.1, 0.5, 1.0]
    # 0.1 falls in le=0.1; 1.0 in le=1.0; 7.0 only in +Inf (= count).
    assert snap.cumulative_counts == [2, 3, 4]
    assert snap.count == 5
    assert snap.sum == pytest.approx(8.45)
    with pytest.raises(ValueError):
        Histogram([1.0, 0.5])


def test_sample_window_is_bounded_and_expires_by_age() -> None:
    w = SampleWindow(size=4, max_age=10.0)
    for i in range(10):
        w.add(float(i), float(i))
    assert len(w) == 4
    assert w.values(9.0) == [6.0, 7.0, 8.0, 9.0]
    # At t=17 only samples taken at t >= 7 remain.
    assert w.values(17.0) == [7.0, 8.0, 9.0]
    assert w.summary(100.0).count == 0


def test_rate_window_counts_whole_buckets_and_drops_old_ones() -> None:
    r = RateWindow(horizon_seconds=60.0)
    r.add(100.2, 3)
    r.add(100.9, 2)
    r.add(105.5, 1)
    assert r.total(105.9, 10.0) == 6
    # At 109.99 the 10 s window is buckets 100..109: still all of it.
    assert r.total(109.99, 10.0) == 6
    # At 110.0 bucket 100 leaves the 10 s window.
    assert r.total(110.0, 10.0) == 1
    assert r.total(110.0, 60.0) == 6
    # Bucket 161 reuses bucket 100's slot: the 5 old events must not leak into the sum.
    r.add(161.0, 4)
    assert r.total(161.0, 60.0) == 4 + 1  # buckets 102..161 hold 105 and 161
    assert r.total(166.0, 60.0) == 4


def test_bucket_constants_follow_metrics_md() -> None:
    assert TTFT_BUCKETS[0] == 0.001 and TTFT_BUCKETS[-1] == 2560.0 and len(TTFT_BUCKETS) == 22
    assert (
        REQUEST_BUCKETS[0] == 0.3 and REQUEST_BUCKETS[-1] == 7680.0 and len(REQUEST_BUCKETS) == 21
    )
    assert STAGE_FORWARD_BUCKETS == (
        0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0
    )  # fmt: skip
    assert token_count_buckets(1000) == (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
    assert token_count_buckets(2048)[-1] == 5000
