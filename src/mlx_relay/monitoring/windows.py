"""Bounded statistics: histograms, recent-sample percentiles and time-bucketed rate windows.

Pure data structures with no locking and no clock of their own: callers pass ``now`` (monotonic
seconds) and hold their own lock. Every structure has a fixed size, so memory never grows with
uptime or with the number of observations.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable, Sequence

from mlx_relay.monitoring.snapshot import HistogramSnap, LatencySummary

# Bucket upper bounds from docs/monitoring-api.md (seconds unless noted).
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
INTER_TOKEN_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
STAGE_FORWARD_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
)  # fmt: skip
# Network round trips: a LAN or a veth answers in microseconds, a WAN in tens of ms.
NETWORK_RTT_BUCKETS = (
    0.00001, 0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02,
    0.05, 0.1, 0.2, 0.5, 1.0,
)  # fmt: skip
# Requests in one forward call on a stage (a batched decode step holds many).
STAGE_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
NETWORK_RPC_BUCKETS = (
    0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5,
    1.0, 2.0, 5.0, 10.0,
)  # fmt: skip


# A request's pause while a failed stage comes back: a restart takes seconds, the
# recovery window (network.recovery_timeout) is a minute by default.
RECOVERY_BUCKETS = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
    120.0, 300.0,
)  # fmt: skip


def token_count_buckets(max_tokens: int) -> tuple[float, ...]:
    """Token-count buckets 1, 2, 5, 10, 20, 50, ... up to the first bound >= ``max_tokens``."""
    bounds: list[float] = []
    decade = 1
    while True:
        for step in (1, 2, 5):
            bounds.append(float(step * decade))
            if step * decade >= max_tokens:
                return tuple(bounds)
        decade *= 10


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ascending values, interpolating linearly.

    Same definition as ``numpy.percentile``'s default and ``statistics.quantiles(...,
    method="inclusive")``: position ``(n - 1) * q / 100`` between the closest ranks.
    """
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    position = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    fraction = position - low
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * fraction


def summarize(values: Iterable[float]) -> LatencySummary:
    """Count, mean, p50, p90, p99 and max of some values (None when there are none)."""
    ordered = sorted(values)
    if not ordered:
        return LatencySummary(count=0)
    return LatencySummary(
        count=len(ordered),
        mean=math.fsum(ordered) / len(ordered),
        p50=percentile(ordered, 50),
        p90=percentile(ordered, 90),
        p99=percentile(ordered, 99),
        max=ordered[-1],
    )


class Histogram:
    """A Prometheus-style histogram with fixed upper bounds (``le`` semantics)."""

    __slots__ = ("_bounds", "_counts", "count", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        if list(bounds) != sorted(set(bounds)):
            raise ValueError("histogram bounds must be strictly ascending")
        self._bounds = tuple(float(b) for b in bounds)
        self._counts = [0] * (len(self._bounds) + 1)  # the last slot is +Inf
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left puts a value equal to a bound into that bound's bucket (value <= le).
        self._counts[bisect_left(self._bounds, value)] += 1
        self.count += 1
        self.sum += value

    def snap(self) -> HistogramSnap:
        cumulative: list[int] = []
        running = 0
        for count in self._counts[:-1]:
            running += count
            cumulative.append(running)
        return HistogramSnap(
            buckets=list(self._bounds), cumulative_counts=cumulative, sum=self.sum, count=self.count
        )


class SampleWindow:
    """The last ``size`` samples no older than ``max_age`` seconds: exact percentiles.

    A bounded exact reservoir: percentiles are those of the retained samples, so they can be
    checked by hand; older samples fall out by count (ring) and by age (at read time).
    """

    __slots__ = ("_max_age", "_samples")

    def __init__(self, size: int = 1024, max_age: float | None = None) -> None:
        if size < 1:
            raise ValueError("window size must be at least 1")
        self._samples: deque[tuple[float, float]] = deque(maxlen=size)
        self._max_age = max_age

    def add(self, now: float, value: float) -> None:
        self._samples.append((now, value))

    def __len__(self) -> int:
        return len(self._samples)

    def values(self, now: float) -> list[float]:
        if self._max_age is None:
            return [v for _, v in self._samples]
        oldest = now - self._max_age
        return [v for t, v in self._samples if t >= oldest]

    def summary(self, now: float) -> LatencySummary:
        return summarize(self.values(now))


class RateWindow:
    """A counter split into fixed time buckets in a ring, for rates over recent seconds.

    ``add`` is O(1); ``total`` reads at most ``slots`` buckets. An event counts toward the
    window ``[now - window, now]`` rounded to whole buckets: the current (partial) bucket and
    the ``window / bucket_seconds - 1`` before it.
    """

    __slots__ = ("_bucket_seconds", "_ids", "_values")

    def __init__(self, horizon_seconds: float = 60.0, bucket_seconds: float = 1.0) -> None:
        slots = math.ceil(horizon_seconds / bucket_seconds) + 1
        self._bucket_seconds = bucket_seconds
        self._ids = [-1] * slots
        self._values = [0.0] * slots

    def add(self, now: float, amount: float = 1.0) -> None:
        bucket = math.floor(now / self._bucket_seconds)
        slot = bucket % len(self._ids)
        if self._ids[slot] != bucket:
            self._ids[slot] = bucket
            self._values[slot] = 0.0
        self._values[slot] += amount

    def total(self, now: float, window_seconds: float) -> float:
        """Sum of the buckets inside the last ``window_seconds`` (current bucket included)."""
        newest = math.floor(now / self._bucket_seconds)
        span = min(len(self._ids), max(1, round(window_seconds / self._bucket_seconds)))
        oldest = newest - span + 1
        return sum(
            value
            for bucket, value in zip(self._ids, self._values, strict=True)
            if oldest <= bucket <= newest
        )
