"""Pure parts of the history: block packing, downsampling, counter rates, query planning."""

from __future__ import annotations

import math

import pytest

from mlx_relay.monitoring.history import codec
from mlx_relay.monitoring.history.blocks import pack_points, pack_raw, unpack_points, unpack_raw
from mlx_relay.monitoring.history.query import (
    MAX_POINTS,
    QueryError,
    plan_query,
    regroup,
    resolve_time,
)
from mlx_relay.monitoring.history.tiers import (
    Rollup,
    bucket_start,
    build_tiers,
    counter_rate,
    counter_rates,
    downsample,
    merge_points,
)

DAY = 86400.0
TIERS = build_tiers(1.0, [(60.0, 30 * DAY), (3600.0, 365 * DAY)], DAY)
NOW = 1_800_000_000.0  # a multiple of 3600


# -- codec and blocks -------------------------------------------------------------------------


def test_codec_round_trips_every_column_type() -> None:
    columns = [
        ("q", [0, 1000, 2003, 3003, -5]),
        ("I", [1, 2, 3, 4, 5]),
        ("f", [0.5, 0.25, -1.0, 3.0, 0.0]),
        ("d", [0.1, 1e300, -2.5, math.pi, 7.0]),
    ]
    assert codec.decode(codec.encode(columns)) == [list(v) for _, v in columns]


def test_codec_rejects_corrupt_blocks() -> None:
    with pytest.raises(codec.CodecError):
        codec.decode(b"not a block")
    truncated = codec.encode([("d", [1.0, 2.0])])
    import zlib

    raw = zlib.decompress(truncated)[:-3]
    with pytest.raises(codec.CodecError, match="truncated"):
        codec.decode(zlib.compress(raw))


def test_raw_blocks_keep_counters_exact_and_gauges_to_float32() -> None:
    start = NOW
    counter = [(NOW + i, 1e12 + i * 12345.678) for i in range(100)]
    back = unpack_raw(start, pack_raw(start, counter, exact=True))
    assert [v for _, v in back] == [v for _, v in counter]
    assert [t for t, _ in back] == pytest.approx([t for t, _ in counter], abs=1e-3)
    gauge = [(NOW + i * 1.003, 0.1 * i) for i in range(100)]
    back = unpack_raw(start, pack_raw(start, gauge, exact=False))
    assert [v for _, v in back] == pytest.approx([v for _, v in gauge], rel=1e-7)


def test_raw_samples_of_a_regular_series_pack_into_a_few_bytes() -> None:
    samples = [(NOW + i, 0.25 + (i % 7) * 0.125) for i in range(240)]
    assert len(pack_raw(NOW, samples, exact=False)) / len(samples) < 2.0


def test_rollup_blocks_round_trip_exactly() -> None:
    points = [(NOW + 60 * i, i + 1, 0.1 * i, -0.5 * i, 3.0 * i) for i in range(50)]
    assert unpack_points(NOW, 60.0, pack_points(NOW, 60.0, points)) == points


# -- downsampling -----------------------------------------------------------------------------


def test_downsample_matches_hand_computed_count_sum_min_max() -> None:
    samples = [(NOW + 0, 1.0), (NOW + 10, 4.0), (NOW + 59, -2.0), (NOW + 60, 5.0), (NOW + 185, 7.5)]
    assert downsample(samples, 60.0) == [
        (NOW, 3, 3.0, -2.0, 4.0),
        (NOW + 60, 1, 5.0, 5.0, 5.0),
        (NOW + 180, 1, 7.5, 7.5, 7.5),
    ]


def test_merging_points_equals_downsampling_the_samples() -> None:
    samples = [(NOW + i * 7.0, float((i * 37) % 11) - 5.0) for i in range(2000)]
    minutes = downsample(samples, 60.0)
    assert merge_points(minutes, 3600.0) == downsample(samples, 3600.0)


def test_rollup_streams_the_same_points_as_downsample() -> None:
    samples = [(NOW + i * 13.0, float(i % 5)) for i in range(100)]
    rollup = Rollup(60.0)
    streamed = [p for t, v in samples if (p := rollup.add(t, v)) is not None]
    closed = rollup.close()
    assert closed is not None
    assert [*streamed, closed] == downsample(samples, 60.0)
    assert rollup.close() is None


def test_a_bucket_split_across_a_restart_merges_back() -> None:
    before = Rollup(60.0)
    before.add(NOW + 1, 2.0)
    before.add(NOW + 2, 8.0)
    first = before.close()
    after = Rollup(60.0)
    after.add(NOW + 40, 5.0)
    second = after.close()
    assert first is not None and second is not None
    assert merge_points([first, second], 60.0) == [(NOW, 3, 15.0, 2.0, 8.0)]


def test_bucket_start_is_aligned_to_the_epoch() -> None:
    assert bucket_start(NOW + 59.9, 60.0) == NOW
    assert bucket_start(NOW + 3599, 3600.0) == NOW


# -- counters ---------------------------------------------------------------------------------


def test_counter_rates_handle_resets_and_gaps() -> None:
    samples = [
        (NOW + 0, 100.0),
        (NOW + 2, 110.0),  # +10 in 2 s
        (NOW + 4, 4.0),  # reset: the new process counted 4
        (NOW + 6, 10.0),  # +6
        (NOW + 60, 70.0),  # 54 s later: a gap, no rate
        (NOW + 62, 72.0),
    ]
    assert counter_rates(samples, max_gap=6.0) == [
        (NOW + 2, 5.0),
        (NOW + 4, 2.0),
        (NOW + 6, 3.0),
        (NOW + 62, 1.0),
    ]
    assert counter_rate(None, NOW, 1.0, 6.0) is None
    assert counter_rate((NOW, 1.0), NOW, 2.0, 6.0) is None  # no time passed


# -- planning ---------------------------------------------------------------------------------


def test_relative_times_count_back_from_now() -> None:
    assert resolve_time(-3600, NOW) == NOW - 3600
    assert resolve_time(0, NOW) == NOW
    assert resolve_time(NOW - 5, NOW) == NOW - 5
    plan = plan_query(TIERS, NOW, after=-600, points=60)
    assert (plan.after, plan.before) == (NOW - 600, NOW)
    assert plan.step == 10.0


@pytest.mark.parametrize(
    ("after", "points", "tier", "expected_points"),
    [
        (-3600, 300, 0, 300),  # 12 s steps: raw samples
        (-DAY, 1440, 1, 1440),  # 1-minute steps: the minute tier
        (-DAY, 24, 2, 24),  # hourly steps: the hour tier
        (-7 * DAY, 500, 1, 500),  # ~20 min steps: minutes, the coarsest still fine enough
        (-60, 600, 0, 48),  # finer than the samples: as many points as there are samples
        (-2 * DAY, 2000, 1, 2000),  # raw would do, but raw keeps only a day
        (-200 * DAY, 100, 2, 100),  # past the minute tier's 30 days: hours
    ],
)
def test_the_tier_is_the_coarsest_that_still_yields_the_points(
    after: float, points: int, tier: int, expected_points: int
) -> None:
    plan = plan_query(TIERS, NOW, after=after, points=points)
    assert plan.tier.index == tier
    assert plan.points == expected_points


def test_default_points_are_the_raw_resolution_capped() -> None:
    assert plan_query(TIERS, NOW, after=-600).points == 480
    plan = plan_query(TIERS, NOW, after=-30 * DAY)
    assert plan.points <= MAX_POINTS
    assert plan.tier.index == 1


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"after": -10, "before": -20}, "after"),
        ({"after": NOW, "before": NOW}, "after"),
        ({"points": 0}, "points"),
        ({"points": MAX_POINTS + 1}, "points"),
        ({"after": -math.inf}, "after"),
        ({"before": math.inf}, "before"),
    ],
)
def test_bad_parameters_name_themselves(kwargs: dict[str, float], param: str) -> None:
    with pytest.raises(QueryError) as error:
        plan_query(TIERS, NOW, **kwargs)  # type: ignore[arg-type]
    assert error.value.param == param


def test_regroup_by_hand_with_gaps() -> None:
    plan = plan_query(TIERS, NOW, after=NOW - 40, before=NOW, points=4)
    stored = [
        (NOW - 40, 1, 2.0, 2.0, 2.0),
        (NOW - 35, 1, 4.0, 4.0, 4.0),
        # nothing in [NOW - 30, NOW - 20): a gap
        (NOW - 20, 2, 10.0, 1.0, 9.0),
        (NOW - 1, 1, 3.0, 3.0, 3.0),
        (NOW, 1, 99.0, 99.0, 99.0),  # at `before`: outside
    ]
    assert plan.timestamps() == [NOW - 40, NOW - 30, NOW - 20, NOW - 10]
    assert regroup(stored, plan, "avg") == [3.0, None, 10.0 / 2, 3.0]
    assert regroup(stored, plan, "sum") == [6.0, None, 10.0, 3.0]
    assert regroup(stored, plan, "min") == [2.0, None, 1.0, 3.0]
    assert regroup(stored, plan, "max") == [4.0, None, 9.0, 3.0]
    with pytest.raises(QueryError) as error:
        regroup(stored, plan, "median")
    assert error.value.param == "group"
