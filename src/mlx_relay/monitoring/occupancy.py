"""How busy the coordinator keeps each pipeline stage: micro-batches in flight, recent batch
sizes and the bubble, from the coordinator's timestamps and the stages' own compute windows.

Definitions (docs/monitoring-api.md, "Stage occupancy"):

- A ``Forward`` is *outstanding* on a stage from just before the coordinator sends it to just
  after its answer (or error) is back.
- The step loop *holds requests* while it has at least one request it has not finished,
  whether that request is in a micro-batch on some stage or waiting for its next step.
- A stage is *busy* while it computes a ``Forward``: the window each stage reports for its
  part of the call, placed on the coordinator's clock
  (:func:`~mlx_relay.coordinator.compute_windows.compute_windows`). An answer without a
  window (an error, a worker that does not report one) counts as busy while outstanding.
- A stage's *bubble* is the share of the last ``window`` seconds (fewer right after start)
  during which the loop held requests and the stage was not busy. A ``Forward`` still
  outstanding has not said yet when the stage computes it: ``bubble_ratio`` counts it busy
  until its answer, ``bubble_ratio_max`` idle, so the two differ by at most the time the
  micro-batches now in flight have been outstanding.
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
    held: Iterable[Interval], busy: Iterable[Interval], start: float, end: float
) -> float:
    """Seconds of ``[start, end]`` inside some ``held`` interval and no ``busy`` one."""
    held_union = merged(held, start, end)
    busy_union = merged(busy, start, end)
    return covered(held_union) - covered(intersection(held_union, busy_union))


@dataclass
class _StageSeries:
    stage: int | None
    open: dict[int, tuple[float, int]] = field(default_factory=dict)  # token -> start, rows
    busy: deque[Interval] = field(default_factory=lambda: deque(maxlen=_MAX_INTERVALS))
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

    def forward_finished(
        self, device_id: str, token: int, computed: Interval | None = None
    ) -> None:
        """The ``Forward`` is back (answer or error). ``computed`` is when the stage computed
        its part, in seconds after :meth:`forward_started` (clipped to the outstanding
        time); None counts the whole outstanding time as busy."""
        now = self._clock()
        with self._lock:
            series = self._stages.get(device_id)
            if series is None or token not in series.open:
                return
            started, _ = series.open.pop(token)
            if computed is None:
                series.busy.append((started, now))
            else:
                begin = min(now, started + max(0.0, computed[0]))
                series.busy.append((begin, min(now, max(begin, started + computed[1]))))
            horizon = now - self._window
            while series.busy and series.busy[0][1] < horizon:
                series.busy.popleft()
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
                busy = list(series.busy)
                outstanding = [(a, now) for a, _ in series.open.values()]
                bubble = bubble_seconds(held, busy + outstanding, start, now)
                bubble_max = bubble_seconds(held, busy, start, now)
                recent = [rows for t, rows in series.batches if t >= start]
                out[device_id] = StageOccupancy(
                    device_id=device_id,
                    stage=series.stage,
                    microbatches_in_flight=len(series.open),
                    batch_size_last=series.last_batch,
                    batch_size_mean=sum(recent) / len(recent) if recent else None,
                    forwards=len(recent),
                    bubble_ratio=bubble / span if span > 0 else 0.0,
                    bubble_ratio_max=bubble_max / span if span > 0 else 0.0,
                    window_seconds=span,
                )
            return out
