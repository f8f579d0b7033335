"""The PromQL subset against hand-computed values, and the constructs it refuses."""

from __future__ import annotations

import math

import pytest

from mlx_relay.monitoring.alerting.promql import (
    EvalContext,
    InvalidExpression,
    UnsupportedExpression,
    compile_expression,
    evaluate,
)
from mlx_relay.monitoring.alerting.promql_math import bucket_quantile, extrapolated_rate
from mlx_relay.monitoring.alerting.samples import Instant, SampleStore, label_set


def series(name: str, **labels: str) -> tuple[tuple[str, str], ...]:
    return label_set({"__name__": name, **labels})


def instant(**families: dict[tuple[tuple[str, str], ...], float]) -> Instant:
    return dict(families)


def run(text: str, store: SampleStore, now: float) -> dict[tuple[tuple[str, str], ...], float]:
    return {s.labels: s.value for s in evaluate(compile_expression(text), EvalContext(now, store))}


@pytest.fixture
def gauges() -> SampleStore:
    store = SampleStore((), 0)
    store.add(
        100.0,
        instant(
            mem={
                series("mem", device="a", kind="x"): 90.0,
                series("mem", device="b", kind="x"): 60.0,
                series("mem", device="c", kind="y"): 80.0,
            },
            total={
                series("total", device="a"): 100.0,
                series("total", device="b"): 200.0,
            },
            flag={series("flag", device="a"): 1.0},
        ),
    )
    return store


def test_selector_matchers_and_comparison_filter(gauges: SampleStore) -> None:
    assert run('mem{kind="x"}', gauges, 100) == {
        series("mem", device="a", kind="x"): 90.0,
        series("mem", device="b", kind="x"): 60.0,
    }
    assert run('mem{device!="a", kind=~"x|y"} > 70', gauges, 100) == {
        series("mem", device="c", kind="y"): 80.0
    }
    assert run('mem{device!~"a|b"}', gauges, 100) == {series("mem", device="c", kind="y"): 80.0}
    # A filter keeps the vector's own value and name; `bool` gives 0/1 and drops the name.
    assert run("70 < mem", gauges, 100) == {
        series("mem", device="a", kind="x"): 90.0,
        series("mem", device="c", kind="y"): 80.0,
    }
    assert run('mem{kind="x"} > bool 70', gauges, 100) == {
        label_set({"device": "a", "kind": "x"}): 1.0,
        label_set({"device": "b", "kind": "x"}): 0.0,
    }


def test_vector_arithmetic_matches_on_labels(gauges: SampleStore) -> None:
    # one-to-one on(device): only the on labels stay
    assert run("mem / on(device) total", gauges, 100) == {
        label_set({"device": "a"}): 0.9,
        label_set({"device": "b"}): 0.3,
    }
    assert run("mem / ignoring(kind) total * 100", gauges, 100) == {
        label_set({"device": "a"}): 90.0,
        label_set({"device": "b"}): 30.0,
    }
    assert run("-total + 1", gauges, 100) == {
        label_set({"device": "a"}): -99.0,
        label_set({"device": "b"}): -199.0,
    }


def test_set_operators(gauges: SampleStore) -> None:
    a = series("mem", device="a", kind="x")
    b = series("mem", device="b", kind="x")
    c = series("mem", device="c", kind="y")
    assert run("mem and on(device) flag", gauges, 100) == {a: 90.0}
    assert run("mem unless on(device) flag", gauges, 100) == {b: 60.0, c: 80.0}
    assert run("mem > 85 or on(device) mem < 70", gauges, 100) == {a: 90.0, b: 60.0}
    # `or` adds right-hand series whose labels the left side does not have
    assert run("flag or on(device) total", gauges, 100) == {
        series("flag", device="a"): 1.0,
        series("total", device="b"): 200.0,
    }


def test_aggregations(gauges: SampleStore) -> None:
    assert run("sum(mem)", gauges, 100) == {(): 230.0}
    assert run("sum by (kind) (mem)", gauges, 100) == {
        label_set({"kind": "x"}): 150.0,
        label_set({"kind": "y"}): 80.0,
    }
    assert run("avg by (kind) (mem)", gauges, 100)[label_set({"kind": "x"})] == 75.0
    assert run("max without (device) (mem)", gauges, 100) == {
        label_set({"kind": "x"}): 90.0,
        label_set({"kind": "y"}): 80.0,
    }
    assert run("min(mem)", gauges, 100) == {(): 60.0}
    assert run("count(mem > 70)", gauges, 100) == {(): 2.0}


def test_absent_and_scalar(gauges: SampleStore) -> None:
    assert run('absent(nothing{device="z", kind=~"q"})', gauges, 100) == {
        label_set({"device": "z"}): 1.0
    }
    assert run("absent(mem)", gauges, 100) == {}
    assert run("mem > 0.5 * scalar(max(total))", gauges, 100) == {}
    assert run("mem > 0.25 * scalar(max(total))", gauges, 100) == {
        series("mem", device="a", kind="x"): 90.0,
        series("mem", device="b", kind="x"): 60.0,
        series("mem", device="c", kind="y"): 80.0,
    }
    assert math.isnan(run("scalar(mem)", gauges, 100)[()])


def counter_store(points: list[tuple[float, float]], max_range: float = 60) -> SampleStore:
    store = SampleStore(["c_total"], max_range)
    for timestamp, value in points:
        store.add(timestamp, {"c_total": {series("c_total", device="a"): value}})
    return store


def test_rate_and_increase_extrapolate_like_prometheus() -> None:
    # Samples every 10 s at t=10..60 going 20..120; window (0, 60].
    store = counter_store([(float(t), 2.0 * t) for t in range(10, 61, 10)])
    # increase: 100 observed over 50 s; extrapolated to the start by one step (10 s, which is
    # also where the counter would have been 0): 100 * 60 / 50 = 120; rate = 120 / 60 = 2.
    assert run("increase(c_total[1m])", store, 60) == {label_set({"device": "a"}): 120.0}
    assert run("rate(c_total[1m])", store, 60) == {label_set({"device": "a"}): 2.0}


def test_rate_handles_a_counter_reset_and_caps_at_zero() -> None:
    # 50, 60, reset to 5, 15 at t = 20, 30, 40, 50; window (0, 60].
    points = [(20.0, 50.0), (30.0, 60.0), (40.0, 5.0), (50.0, 15.0)]
    # raw increase: 15 - 50 + 60 (reset) = 25 over 30 s; average step 10 s, threshold 11 s;
    # to_start = 20 >= 11 -> 5; to_zero = 30 * 50 / 25 = 60 (no cap); to_end = 10 -> 10.
    # factor = (30 + 5 + 10) / 30 = 1.5 -> 37.5
    assert extrapolated_rate(points, 0.0, 60.0, per_second=False) == pytest.approx(37.5)
    # The zero cap: 1 -> 11 over 10 s with 10 s to the start: to_zero = 10 * 1/10 = 1.
    assert extrapolated_rate([(10.0, 1.0), (20.0, 11.0)], 0.0, 20.0, per_second=False) == (
        pytest.approx(10.0 * (10 + 1 + 0) / 10)
    )
    assert extrapolated_rate([(10.0, 1.0)], 0.0, 20.0, per_second=True) is None


def test_over_time_functions() -> None:
    store = counter_store([(10.0, 4.0), (20.0, 8.0), (30.0, 3.0), (40.0, 9.0)])
    labels = label_set({"device": "a"})
    assert run("avg_over_time(c_total[30s])", store, 40) == {labels: (8 + 3 + 9) / 3}
    assert run("max_over_time(c_total[1m])", store, 40) == {labels: 9.0}
    assert run("min_over_time(c_total[1m])", store, 40) == {labels: 3.0}


def test_histogram_quantile_interpolates_inside_the_bucket() -> None:
    # 10 observations: 2 <= 0.1, 8 <= 0.5, 10 <= 1; p50 -> rank 5 in (0.1, 0.5]:
    # 0.1 + 0.4 * (5 - 2) / 6 = 0.3
    buckets = [(0.1, 2.0), (0.5, 8.0), (1.0, 10.0), (math.inf, 10.0)]
    assert bucket_quantile(0.5, buckets) == pytest.approx(0.3)
    # rank 9.5 in (0.5, 1]: 0.5 + 0.5 * 1.5 / 2 = 0.875
    assert bucket_quantile(0.95, buckets) == pytest.approx(0.875)
    # in the +Inf bucket: the highest finite bound
    assert bucket_quantile(0.99, [(0.1, 1.0), (math.inf, 10.0)]) == 0.1
    assert math.isnan(bucket_quantile(0.5, [(0.1, 0.0), (math.inf, 0.0)]))
    assert math.isnan(bucket_quantile(0.5, [(0.1, 1.0), (0.2, 2.0)]))  # no +Inf bucket


def test_histogram_quantile_over_a_rate_of_buckets() -> None:
    name = "lat_bucket"
    store = SampleStore([name], 60)
    for t, counts in ((10.0, (0, 0, 0)), (20.0, (2, 8, 10))):
        store.add(
            t,
            {
                name: {
                    series(name, stage="0", le=le): float(c)
                    for le, c in zip(("0.1", "0.5", "+Inf"), counts, strict=True)
                }
            },
        )
    result = run(f"histogram_quantile(0.5, sum by (stage, le) (rate({name}[1m])))", store, 20)
    # rates are proportional to 2, 8, 10: the same p50 as the counts, 0.1 + 0.4 * 3/6 = 0.3
    assert result == {label_set({"stage": "0"}): pytest.approx(0.3)}


@pytest.mark.parametrize(
    ("text", "construct"),
    [
        ("topk(3, mem)", "topk"),
        ("quantile(0.9, mem)", "quantile"),
        ("mem offset 5m", "offset"),
        ("rate(c_total[5m:1m])", "rate() of a subquery"),
        ("label_replace(mem, 'a', 'b', 'c', 'd')", "label_replace()"),
        ("mem / on(device) group_left(kind) total", "group_left/group_right"),
        ("mem ^ 2", "^"),
        ("predict_linear(mem[5m], 60)", "predict_linear()"),
        ("mem[5m]", "range selector outside a range function"),
    ],
)
def test_unsupported_constructs_are_refused_by_name(text: str, construct: str) -> None:
    with pytest.raises(UnsupportedExpression) as excinfo:
        compile_expression(text)
    assert excinfo.value.construct == construct
    assert construct in str(excinfo.value)


def test_invalid_syntax_is_refused() -> None:
    with pytest.raises(InvalidExpression, match="invalid PromQL"):
        compile_expression("sum(mem")


def test_a_clock_step_back_empties_the_ring() -> None:
    store = counter_store([(100.0, 1.0), (110.0, 2.0)])
    store.add(50.0, {"c_total": {series("c_total", device="a"): 3.0}})
    assert len(store) == 1 and store.points() == 1
    assert run("increase(c_total[1m])", store, 50) == {}


def test_the_store_keeps_only_range_names_within_the_longest_range() -> None:
    store = SampleStore(["c_total"], 30)
    for t in range(0, 100, 10):
        store.add(float(t), {"c_total": {series("c_total"): 1.0}, "g": {series("g"): 2.0}})
    # (90 - 30, 90] holds 70, 80, 90; only c_total is kept over time
    assert len(store) == 3 and store.points() == 3
    assert store.window("g", 0, 90) == {}
    assert store.window("c_total", 75, 90) == {series("c_total"): [(80.0, 1.0), (90.0, 1.0)]}
    assert store.latest["g"] == {series("g"): 2.0}


def test_a_series_that_goes_away_is_forgotten() -> None:
    store = SampleStore(["c_total"], 30)
    store.add(0.0, {"c_total": {series("c_total", d="gone"): 1.0}})
    for t in (10.0, 20.0, 30.0, 40.0):
        store.add(t, {"c_total": {series("c_total", d="kept"): t}})
    assert list(store.window("c_total", 0, 40)) == [series("c_total", d="kept")]
    assert store.points() == 3
