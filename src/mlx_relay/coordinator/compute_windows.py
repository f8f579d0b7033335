"""When each stage of a relayed ``Forward`` computed, on the coordinator's clock.

Every stage reports, on its own clock, how long after getting its call its layers started
(``compute_offset_seconds``), how long they ran (``compute_seconds``) and how long it took to
answer (``handled_seconds``); a relaying stage adds how long after getting its own call it
called the next one (``called_offset_seconds``) and how long that call took (``rpc_seconds``).
Only durations travel, so the stages' clocks need not agree with the coordinator's.

A call's time less the callee's handling is the two network legs; a stage is taken to have
got its call halfway through them, so each window's start is off by at most half the legs of
the hops before it (docs/monitoring-api.md, "Stage occupancy").
"""

from __future__ import annotations

from collections.abc import Sequence

from mlx_relay.coordinator.tracing import stage_times
from mlx_relay.monitoring.traces.attribution import split_call
from mlx_relay.proto import relay_pb2

Window = tuple[float, float]


def compute_windows(
    timings: Sequence[relay_pb2.StageTiming], rpc_seconds: float
) -> list[Window | None]:
    """Each stage's compute as (start, end) seconds after the coordinator sent the call to
    the first stage, in pipeline order; None from the first stage that did not say when it
    got its call (an older worker) on. The placement is the traces' own
    (:func:`~mlx_relay.monitoring.traces.attribution.split_call`).

    Args:
        timings: the ``stages`` of the ``ForwardResponse``, in pipeline order.
        rpc_seconds: the coordinator's time for its call to the first stage.
    """
    windows: list[Window | None] = []
    splits = split_call(rpc_seconds, stage_times(timings))
    for index, (timing, split) in enumerate(zip(timings, splits, strict=True)):
        if timing.handled_seconds <= 0.0:
            windows.extend([None] * (len(timings) - index))
            break
        start = split.begin + timing.compute_offset_seconds - split.stage.chain_wait
        windows.append((start, start + timing.compute_seconds))
    return windows
