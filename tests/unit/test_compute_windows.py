"""Each stage's compute window on the coordinator's clock, from the durations a relayed
Forward's answer carries."""

from __future__ import annotations

import pytest

from mlx_relay.coordinator.compute_windows import compute_windows
from mlx_relay.proto import relay_pb2 as pb


def test_windows_of_a_relayed_call_on_two_stages() -> None:
    """A known schedule, seconds after the coordinator's send: the call takes 10 s; stage 0
    gets it at 1 (its handling is 8 s, so the legs are 2 s, 1 each way), computes from 1.5
    to 4.5, calls stage 1 at 4.5; that call takes 4 s, stage 1 handles it in 3 (got at 5),
    computes from 5.25 to 7.25."""
    timings = [
        pb.StageTiming(
            device_id="w0", compute_seconds=3.0, compute_offset_seconds=0.5, handled_seconds=8.0
        ),
        pb.StageTiming(
            device_id="w1",
            compute_seconds=2.0,
            compute_offset_seconds=0.25,
            handled_seconds=3.0,
            rpc_seconds=4.0,
            called_offset_seconds=3.5,
        ),
    ]
    windows = compute_windows(timings, rpc_seconds=10.0)
    assert windows[0] == pytest.approx((1.5, 4.5))
    assert windows[1] == pytest.approx((5.25, 7.25))


def test_a_stage_that_handled_longer_than_the_call_got_it_at_the_send() -> None:
    timings = [pb.StageTiming(device_id="w0", compute_seconds=1.0, handled_seconds=2.5)]
    assert compute_windows(timings, rpc_seconds=2.0) == [pytest.approx((0.0, 1.0))]


def test_no_window_from_a_stage_that_does_not_report_one_and_after_it() -> None:
    timings = [
        pb.StageTiming(device_id="w0", compute_seconds=1.0, handled_seconds=3.0),
        pb.StageTiming(device_id="w1", compute_seconds=1.0, rpc_seconds=1.5),
        pb.StageTiming(device_id="w2", compute_seconds=1.0, handled_seconds=1.0),
    ]
    windows = compute_windows(timings, rpc_seconds=4.0)
    assert windows[0] == pytest.approx((0.5, 1.5))
    assert windows[1:] == [None, None]
