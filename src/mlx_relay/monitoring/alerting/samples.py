"""Samples the rules evaluate: one instant of every series, plus a bounded ring of the past.

A series is identified by its label set, ``__name__`` included, as a sorted tuple of pairs.
The instant comes from the same metric families ``/metrics`` renders, so a rule sees exactly
what a Prometheus scraping us would see. Only the metric names a rule reads over a range
are kept in the ring, and only for as long as the longest range needs them.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from prometheus_client.metrics_core import Metric

LabelSet = tuple[tuple[str, str], ...]
Point = tuple[float, float]
NAME = "__name__"


def label_set(labels: Mapping[str, str]) -> LabelSet:
    return tuple(sorted(labels.items()))


@dataclass(frozen=True)
class Sample:
    """One element of an instant vector: labels (``__name__`` included, if kept) and value."""

    labels: LabelSet
    value: float

    def label(self, name: str) -> str:
        for key, value in self.labels:
            if key == name:
                return value
        return ""

    @property
    def label_dict(self) -> dict[str, str]:
        return dict(self.labels)


Instant = dict[str, dict[LabelSet, float]]
"""Metric name -> series label set (``__name__`` included) -> value."""


def instant_from_families(
    families: Iterable[Metric], wanted: frozenset[str] | None = None
) -> Instant:
    """The samples of ``families`` by exposition name (``_total``, ``_bucket``, ...); only
    those named in ``wanted`` unless it is None."""
    instant: Instant = {}
    for family in families:
        if wanted is not None and not any(name.startswith(family.name) for name in wanted):
            continue
        for sample in family.samples:
            if wanted is not None and sample.name not in wanted:
                continue
            labels = tuple(sorted((*sample.labels.items(), (NAME, sample.name))))
            instant.setdefault(sample.name, {})[labels] = float(sample.value)
    return instant


class SampleStore:
    """The latest instant, and the recent points of every series read over a range.

    Args:
        range_names: Metric names some rule reads with a range selector.
        max_range_seconds: The longest range any rule reads; older points are dropped.
        max_points: Hard bound on the points kept per series, whatever the interval.
    """

    def __init__(
        self, range_names: Iterable[str], max_range_seconds: float, *, max_points: int = 4096
    ) -> None:
        self.range_names = frozenset(range_names)
        self.max_range_seconds = max_range_seconds
        self.max_points = max_points
        self._times: deque[float] = deque(maxlen=max_points)
        self._series: dict[str, dict[LabelSet, deque[Point]]] = {}
        self.latest: Instant = {}
        self.latest_time = -math.inf

    def add(self, timestamp: float, instant: Instant) -> None:
        """Record the instant taken at ``timestamp`` (seconds, monotonic or wall, but one)."""
        if timestamp <= self.latest_time:
            # The clock stepped back: the kept points would lie in the future of every window.
            self._times.clear()
            self._series.clear()
        self.latest = instant
        self.latest_time = timestamp
        self._times.append(timestamp)
        for name in self.range_names:
            kept = self._series.setdefault(name, {})
            for labels, value in instant.get(name, {}).items():
                points = kept.get(labels)
                if points is None:
                    points = kept[labels] = deque(maxlen=self.max_points)
                points.append((timestamp, value))
        self._drop_before(timestamp - self.max_range_seconds)

    def _drop_before(self, horizon: float) -> None:
        while self._times and self._times[0] <= horizon:
            self._times.popleft()
        for kept in self._series.values():
            for labels, points in list(kept.items()):
                while points and points[0][0] <= horizon:
                    points.popleft()
                if not points:
                    del kept[labels]  # a series that went away

    def carry_over(self, other: SampleStore) -> None:
        """Take ``other``'s points for the names this store keeps (when the rules change)."""
        self._times = deque(other._times, maxlen=self.max_points)
        self.latest, self.latest_time = other.latest, other.latest_time
        for name in self.range_names & other.range_names:
            self._series[name] = {
                labels: deque(points, maxlen=self.max_points)
                for labels, points in other._series.get(name, {}).items()
            }
        self._drop_before(self.latest_time - self.max_range_seconds)

    def __len__(self) -> int:
        """How many instants lie within the longest range."""
        return len(self._times)

    def points(self) -> int:
        """How many (time, value) points are kept in all."""
        return sum(len(p) for kept in self._series.values() for p in kept.values())

    def window(self, name: str, start: float, end: float) -> dict[LabelSet, list[Point]]:
        """Each series of ``name`` with its (time, value) points in ``(start, end]``."""
        series: dict[LabelSet, list[Point]] = {}
        for labels, points in self._series.get(name, {}).items():
            # Newest first, stopping at the window's start: the cost is the window, not the ring.
            selected = []
            for point in reversed(points):
                if point[0] <= start:
                    break
                if point[0] <= end:
                    selected.append(point)
            if selected:
                selected.reverse()
                series[labels] = selected
        return series
