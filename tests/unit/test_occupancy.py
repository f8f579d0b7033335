"""The bubble and the micro-batch counts, on a fake clock."""

from __future__ import annotations

import threading

import pytest

from mlx_relay.monitoring.occupancy import (
    OccupancyRecorder,
    bubble_seconds,
    intersection,
    merged,
)
from tests.support.fakes import FakeClock


def recorder_holding(clock: FakeClock, requests: int) -> OccupancyRecorder:
    """A recorder with a 10 s window whose step loop holds ``requests`` from now on."""
    recorder = OccupancyRecorder(threading.Lock(), clock, window_seconds=10.0)
    recorder.set_requests_held(requests)
    return recorder


def test_merged_clips_sorts_and_joins_overlaps() -> None:
    assert merged([(5, 7), (1, 3), (2, 4), (9, 20), (-5, -1)], 0, 10) == [(1, 4), (5, 7), (9, 10)]


def test_intersection_of_interval_lists() -> None:
    assert intersection([(0, 4), (6, 10)], [(2, 7), (9, 12)]) == [(2, 4), (6, 7), (9, 10)]


@pytest.mark.parametrize(
    ("held", "outstanding", "expected"),
    [
        ([], [(0, 10)], 0.0),  # no request held: never a bubble
        ([(0, 10)], [], 10.0),  # requests held, nothing sent: all bubble
        ([(0, 10)], [(0, 4), (6, 10)], 2.0),  # the gap between two Forwards
        ([(0, 10)], [(0, 6), (2, 8)], 2.0),  # overlapping Forwards count once
        ([(2, 5)], [(4, 9)], 2.0),  # idle only while held
        ([(-5, 3), (7, 20)], [], 6.0),  # clipped to the window [0, 10]
    ],
)
def test_bubble_seconds(
    held: list[tuple[float, float]], outstanding: list[tuple[float, float]], expected: float
) -> None:
    assert bubble_seconds(held, outstanding, 0.0, 10.0) == pytest.approx(expected)


def test_recorder_two_stages_one_request_alternating() -> None:
    """One request on two stages: each stage idles while the other computes."""
    clock = FakeClock()
    recorder = recorder_holding(clock, 1)
    for _ in range(5):  # 5 steps of 1 s per stage: stage 0, then stage 1
        token = recorder.forward_started("w0", 0, 1)
        clock.now += 1.0
        recorder.forward_finished("w0", token, compute_seconds=0.5)
        token = recorder.forward_started("w1", 1, 1)
        clock.now += 1.0
        recorder.forward_finished("w1", token, compute_seconds=1.0)
    snap = recorder.snap()
    assert snap["w0"].bubble_ratio == pytest.approx(0.5)
    assert snap["w1"].bubble_ratio == pytest.approx(0.5)
    # Stage 0 computed half of each outstanding second: its idle share may be up to 0.75.
    assert snap["w0"].bubble_ratio_max == pytest.approx(0.75)
    assert snap["w1"].bubble_ratio_max == pytest.approx(0.5)
    assert snap["w0"].window_seconds == pytest.approx(10.0)
    assert snap["w0"].forwards == 5
    assert snap["w0"].microbatches_in_flight == 0


def test_recorder_counts_in_flight_and_batch_sizes() -> None:
    clock = FakeClock()
    recorder = recorder_holding(clock, 12)
    first = recorder.forward_started("w0", 0, 8)
    clock.now += 1.0
    recorder.forward_started("w0", 0, 4)
    clock.now += 1.0
    snap = recorder.snap()["w0"]
    assert snap.microbatches_in_flight == 2
    assert snap.batch_size_last == 4
    assert snap.batch_size_mean == pytest.approx(6.0)
    assert snap.bubble_ratio == 0.0  # a Forward was outstanding all along
    recorder.forward_finished("w0", first)
    assert recorder.snap()["w0"].microbatches_in_flight == 1


def test_recorder_window_forgets_old_activity() -> None:
    clock = FakeClock()
    recorder = recorder_holding(clock, 1)
    token = recorder.forward_started("w0", 0, 3)
    clock.now += 2.0
    recorder.forward_finished("w0", token)
    recorder.set_requests_held(0)  # idle, but nothing waits: no bubble from here on
    clock.now += 30.0
    token = recorder.forward_started("w0", 0, 1)  # prunes the old Forward
    recorder.forward_finished("w0", token)
    snap = recorder.snap()["w0"]
    assert snap.bubble_ratio == 0.0
    assert snap.batch_size_mean == pytest.approx(1.0)
    assert snap.forwards == 1
