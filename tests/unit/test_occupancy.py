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
    """One request on two stages, a known schedule: per 2.5 s step, 0.25 s to stage 0,
    0.5 s of compute there, 0.25 s to stage 1, 1 s of compute there, 0.5 s back. Each stage
    idles while the other computes and while the micro-batch travels."""
    clock = FakeClock()
    recorder = recorder_holding(clock, 1)
    for _ in range(4):
        tokens = [recorder.forward_started("w0", 0, 1), recorder.forward_started("w1", 1, 1)]
        clock.now += 2.5
        recorder.forward_finished("w0", tokens[0], computed=(0.25, 0.75))
        recorder.forward_finished("w1", tokens[1], computed=(1.0, 2.0))
    snap = recorder.snap()
    assert snap["w0"].bubble_ratio == pytest.approx(0.8)  # 0.5 s busy of every 2.5 s
    assert snap["w1"].bubble_ratio == pytest.approx(0.6)  # 1 s busy of every 2.5 s
    assert snap["w0"].bubble_ratio_max == pytest.approx(0.8)  # nothing in flight now
    assert snap["w0"].window_seconds == pytest.approx(10.0)
    assert snap["w0"].forwards == 4
    assert snap["w0"].microbatches_in_flight == 0


def run_schedule(
    recorder: OccupancyRecorder,
    clock: FakeClock,
    micro_batches: list[tuple[float, float, list[tuple[float, float]]]],
    until: float,
) -> None:
    """Feed a schedule in time order: each micro-batch is (sent, back, the two stages'
    compute windows), in seconds after the clock's time now; events after ``until`` do
    not happen."""
    origin = clock.now
    events: list[tuple[float, int, int]] = []  # time, 0 = send / 1 = back, micro-batch
    for k, (sent, back, _) in enumerate(micro_batches):
        events += [(sent, 0, k), (back, 1, k)]
    tokens: dict[int, list[int]] = {}
    for at, kind, k in sorted(events):
        if at > until:
            break
        clock.now = origin + at
        sent, _, windows = micro_batches[k]
        if kind == 0:
            tokens[k] = [recorder.forward_started(f"w{i}", i, 1) for i in range(2)]
        else:
            for i, (a, b) in enumerate(windows):
                recorder.forward_finished(f"w{i}", tokens[k][i], computed=(a - sent, b - sent))
    clock.now = origin + until


def test_recorder_two_micro_batches_keep_both_stages_busy() -> None:
    """Two micro-batches in flight on two stages, a known schedule: micro-batch k leaves at
    1.1 k s, computes 1 s on stage 0 from 0.1 s after, 1 s on stage 1 from 1.2 s after,
    and is back 2.3 s after. Both stages compute 1 s of every 1.1 s."""
    schedule = [
        (1.1 * k, 1.1 * k + 2.3, [(1.1 * k + 0.1, 1.1 * k + 1.1), (1.1 * k + 1.2, 1.1 * k + 2.2)])
        for k in range(8)
    ]
    clock = FakeClock()
    recorder = recorder_holding(clock, 8)
    run_schedule(recorder, clock, schedule, until=10.0)
    snap = recorder.snap()
    # 8 s busy of the 10 s window on each stage; the outstanding calls overlap all along.
    assert snap["w0"].bubble_ratio == pytest.approx(0.2)
    assert snap["w1"].bubble_ratio == pytest.approx(0.2)
    assert snap["w1"].bubble_ratio_max == pytest.approx(0.2)
    assert snap["w0"].microbatches_in_flight == 0


def test_recorder_counts_a_micro_batch_in_flight_busy_and_its_max_idle() -> None:
    schedule = [
        (1.1 * k, 1.1 * k + 2.3, [(1.1 * k + 0.1, 1.1 * k + 1.1), (1.1 * k + 1.2, 1.1 * k + 2.2)])
        for k in range(8)
    ]
    clock = FakeClock()
    recorder = recorder_holding(clock, 8)
    run_schedule(recorder, clock, schedule, until=9.5)  # micro-batch 7 (sent at 7.7) is out
    snap = recorder.snap()["w0"]
    assert snap.microbatches_in_flight == 1
    # Known busy: micro-batches 0..6, 7 s. Micro-batch 7 is busy from 7.7 s on in the
    # bubble (the stage has not said when it computed it yet), idle in the max.
    assert snap.bubble_ratio == pytest.approx((9.5 - 7.0 - 1.8) / 9.5)
    assert snap.bubble_ratio_max == pytest.approx((9.5 - 7.0) / 9.5)


def test_recorder_clips_a_window_to_the_outstanding_time_and_counts_unknown_busy() -> None:
    clock = FakeClock()
    recorder = recorder_holding(clock, 1)
    token = recorder.forward_started("w0", 0, 1)
    clock.now += 2.0
    recorder.forward_finished("w0", token, computed=(1.5, 3.0))  # past the answer: clipped
    token = recorder.forward_started("w0", 0, 1)
    clock.now += 2.0
    recorder.forward_finished("w0", token)  # an error: no window, busy while outstanding
    clock.now += 1.0
    snap = recorder.snap()["w0"]
    assert snap.bubble_ratio == pytest.approx((5.0 - 0.5 - 2.0) / 5.0)


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
