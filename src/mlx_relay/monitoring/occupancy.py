"""How busy the coordinator keeps each pipeline stage: micro-batches in flight, recent batch
sizes and the bubble, all from timestamps taken in the coordinator process.

Definitions (docs/monitoring-api.md, "Stage occupancy"):

- A ``Forward`` is *outstanding* on a stage from just before the coordinator sends it to just
  after its answer (or error) is back.
- The step loop *holds requests* while it has at least one request it has not finished,
  whether that request is in a micro-batch on some stage or waiting for its next step.
- A stage's *bubble* is the share of the last ``window`` seconds (fewer right after start)
  during which the loop held requests and no ``Forward`` was outstanding on that stage.

Timestamps are the coordinator's, so a ``Forward`` counts as outstanding while its bytes
travel and while the stage's gRPC layer handles it, when the stage computes nothing: the
true idle share is at least ``bubble_ratio`` and at most ``bubble_ratio_max``, which adds the
outstanding time not spent computing (RPC time minus the compute time the stage reports).
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from mlx_relay.monitoring.snapshot import StageOccupancy

OCCUPANCY_WINDOW_SECONDS = 10.0
_MAX_INTERVALS = 8192  # per series: far more than a 10 s window holds at any step rate

Interval = tuple[float, float]


def merged(intervals: Iterable[Interval], start: float, end: float) -> list[Interval]:
    """The union of ``intervals`` clipped to ``[start, end]``: sorted, disjoint, non-empty."""
    clipped = sorted((max(a, start), min(b, end)) for a, b in intervals)
    out: list[Interval] = []
    for a, b in clipped:
        if b <= a:
            continue
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def covered(intervals: Iterable[Interval]) -> float:
    """Total length of sorted, disjoint intervals."""
    return sum(b - a for a, b in intervals)


def intersection(left: list[Interval], right: list[Interval]) -> list[Interval]:
    """The overlap of two sorted, disjoint interval lists."""
    out: list[Interval] = []
    i = j = 0
    while i < len(left) and j < len(right):
        a = max(left[i][0], right[j][0])
        b = min(left[i][1], right[j][1])
        if a < b:
            out.append((a, b))
        if left[i][1] < right[j][1]:
            i += 1
        else:
            j += 1
    return out


def bubble_seconds(
    held: Iterable[Interval], outstanding: Iterable[Interval], start: float, end: float
) -> float:
    """Seconds of ``[start, end]`` inside some ``held`` interval and no ``outstanding`` one."""
    held_union = merged(held, start, end)
    busy = merged(outstanding, start, end)
    return covered(held_union) - covered(intersection(held_union, busy))


@dataclass
class _StageSeries:
    stage: int | None
    open: dict[int, tuple[float, int]] = field(default_factory=dict)  # token -> start, rows
    closed: deque[tuple[float, float, float]] = field(
        default_factory=lambda: deque(maxlen=_MAX_INTERVALS)
    )  # start, end, seconds of it the stage reported computing
    batches: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=_MAX_INTERVALS))
    last_batch: int | None = None


class OccupancyRecorder:
    """State behind the snapshot's ``occupancy``; owned by the collector, fed by the
    coordinator's step loop."""

    def __init__(
        self,
        lock: threading.Lock,
        clock: Callable[[], float],
        window_seconds: float = OCCUPANCY_WINDOW_SECONDS,
    ) -> None:
        self._lock = lock
        self._clock = clock
        self._window = window_seconds
        self._started_at = clock()
        self._stages: dict[str, _StageSeries] = {}
        self._held: deque[Interval] = deque(maxlen=_MAX_INTERVALS)
        self._held_since: float | None = None
        self._tokens = itertools.count()

    def forward_started(self, device_id: str, stage: int | None, batch_size: int) -> int:
        """A ``Forward`` of ``batch_size`` requests leaves for ``device_id``; returns the
        token to pass to :meth:`forward_finished`."""
        now = self._clock()
        with self._lock:
            series = self._stages.get(device_id)
            if series is None:
                series = self._stages[device_id] = _StageSeries(stage)
            series.stage = stage
            token = next(self._tokens)
            series.open[token] = (now, batch_size)
            series.batches.append((now, batch_size))
            series.last_batch = batch_size
            return token

    def forward_finished(self, device_id: str, token: int, compute_seconds: float = 0.0) -> None:
        """The ``Forward`` is back (answer or error); ``compute_seconds`` is what the stage
        reported computing."""
        now = self._clock()
        with self._lock:
            series = self._stages.get(device_id)
            if series is None or token not in series.open:
                return
            started, _ = series.open.pop(token)
            series.closed.append((started, now, max(0.0, compute_seconds)))
            horizon = now - self._window
            while series.closed and series.closed[0][1] < horizon:
                series.closed.popleft()
            while series.batches and series.batches[0][0] < horizon:
                series.batches.popleft()

    def set_requests_held(self, n: int) -> None:
        """How many unfinished requests the step loop holds now."""
        now = self._clock()
        with self._lock:
            if n > 0 and self._held_since is None:
                self._held_since = now
            elif n <= 0 and self._held_since is not None:
                self._held.append((self._held_since, now))
                self._held_since = None
                while self._held and self._held[0][1] < now - self._window:
                    self._held.popleft()

    def snap(self) -> dict[str, StageOccupancy]:
        now = self._clock()
        with self._lock:
            start = max(self._started_at, now - self._window)
            span = now - start
            held = list(self._held)
            if self._held_since is not None:
                held.append((self._held_since, now))
            out = {}
            for device_id, series in self._stages.items():
                outstanding = [(a, b) for a, b, _ in series.closed]
                outstanding.extend((a, now) for a, _ in series.open.values())
                bubble = bubble_seconds(held, outstanding, start, now)
                # Outstanding time the stage did not spend computing, clipped to the window.
                idle_in_rpc = sum(
                    min(max(0.0, min(b, now) - max(a, start)), max(0.0, b - a - c))
                    for a, b, c in series.closed
                )
                held_seconds = covered(merged(held, start, now))
                recent = [rows for t, rows in series.batches if t >= start]
                out[device_id] = StageOccupancy(
                    device_id=device_id,
                    stage=series.stage,
                    microbatches_in_flight=len(series.open),
                    batch_size_last=series.last_batch,
                    batch_size_mean=sum(recent) / len(recent) if recent else None,
                    forwards=len(recent),
                    bubble_ratio=bubble / span if span > 0 else 0.0,
                    bubble_ratio_max=min(held_seconds, bubble + idle_in_rpc) / span
                    if span > 0
                    else 0.0,
                    window_seconds=span,
                )
            return out
