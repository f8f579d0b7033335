"""Tiers and downsampling: pure functions over ``(timestamp, value)`` samples.

The first tier keeps every sample. Each further tier keeps one :data:`Point` per
``interval`` seconds: the bucket's start and the count, sum, minimum and maximum of the
samples that fell into it. Points of the same bucket merge exactly (counts and sums add,
minima and maxima combine), so a bucket split across a restart reads the same as one.

A counter is stored as its values in the first tier; the rate between two consecutive
samples is computed on read (:func:`counter_rates`), a decrease counts as a reset (the
increase is the new value, as in Prometheus), and two samples further apart than
``max_gap`` seconds give no rate: that is a gap, not a line. The rollup tiers of a counter
keep count/sum/min/max of those rates.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

# (bucket start, count, sum, min, max)
Point = tuple[float, int, float, float, float]
Sample = tuple[float, float]


@dataclass(frozen=True)
class Tier:
    """One resolution: ``interval`` seconds per point (0 = every sample), kept ``retention``."""

    index: int
    interval: float
    retention: float

    @property
    def raw(self) -> bool:
        return self.index == 0


def build_tiers(
    raw_interval: float, rollups: Iterable[tuple[float, float]], retention: float
) -> list[Tier]:
    """Tier 0 at ``raw_interval`` kept ``retention`` s, then one tier per (interval, retention)."""
    tiers = [Tier(0, raw_interval, retention)]
    for interval, keep in rollups:
        tiers.append(Tier(len(tiers), interval, keep))
    return tiers


def bucket_start(timestamp: float, interval: float) -> float:
    """Start of the ``interval``-second bucket holding ``timestamp`` (aligned to the epoch)."""
    return math.floor(timestamp / interval) * interval


def downsample(samples: Iterable[Sample], interval: float) -> list[Point]:
    """One point per ``interval`` bucket that holds samples, in time order."""
    return merge_points(((t, 1, v, v, v) for t, v in samples), interval)


def merge_points(points: Iterable[Point], interval: float) -> list[Point]:
    """Points regrouped into ``interval`` buckets (a whole multiple of theirs), in time order."""
    buckets: dict[float, list[float]] = {}
    for start, count, total, low, high in points:
        key = bucket_start(start, interval)
        found = buckets.get(key)
        if found is None:
            buckets[key] = [count, total, low, high]
        else:
            found[0] += count
            found[1] += total
            found[2] = min(found[2], low)
            found[3] = max(found[3], high)
    return [(k, int(c), s, lo, hi) for k, (c, s, lo, hi) in sorted(buckets.items())]


def counter_rate(
    previous: Sample | None, timestamp: float, value: float, max_gap: float
) -> float | None:
    """Per-second increase from ``previous`` to this sample; None across a gap or backwards."""
    if previous is None:
        return None
    elapsed = timestamp - previous[0]
    if elapsed <= 0 or elapsed > max_gap:
        return None
    increase = value - previous[1] if value >= previous[1] else value
    return increase / elapsed


def counter_rates(samples: Iterable[Sample], max_gap: float) -> list[Sample]:
    """``(timestamp, rate)`` for each sample that has a close enough predecessor."""
    out: list[Sample] = []
    previous: Sample | None = None
    for t, v in samples:
        rate = counter_rate(previous, t, v, max_gap)
        if rate is not None:
            out.append((t, rate))
        previous = (t, v)
    return out


class Rollup:
    """The open bucket of one series in one rollup tier; feed samples in time order.

    :meth:`add` returns the previous bucket's point when a sample opens a new bucket;
    :meth:`peek` shows the open bucket so far and :meth:`close` returns it, e.g. at shutdown.
    """

    __slots__ = ("_count", "_end", "_high", "_interval", "_low", "_start", "_sum")

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._start: float | None = None
        self._end = -math.inf
        self._count = 0
        self._sum = 0.0
        self._low = 0.0
        self._high = 0.0

    def add(self, timestamp: float, value: float) -> Point | None:
        if self._start is not None and self._start <= timestamp < self._end:
            self._count += 1
            self._sum += value
            if value < self._low:
                self._low = value
            elif value > self._high:
                self._high = value
            return None
        if self._start is not None and timestamp < self._start:
            return None  # out of order: older than the open bucket; dropped
        closed = self.close()
        self._start = bucket_start(timestamp, self._interval)
        self._end = self._start + self._interval
        self._count, self._sum = 1, value
        self._low = self._high = value
        return closed

    def peek(self) -> Point | None:
        """The open bucket's point so far (it stays open)."""
        if self._start is None:
            return None
        return (self._start, self._count, self._sum, self._low, self._high)

    def close(self) -> Point | None:
        if self._start is None:
            return None
        point = (self._start, self._count, self._sum, self._low, self._high)
        self._start = None
        return point
