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


def instant_from_families(families: Iterable[Metric]) -> Instant:
    """Every sample of ``families`` by exposition name (``_total``, ``_bucket``, ...)."""
    instant: Instant = {}
    for family in families:
        for sample in family.samples:
            labels = dict(sample.labels)
            labels[NAME] = sample.name
            instant.setdefault(sample.name, {})[label_set(labels)] = float(sample.value)
    return instant


class SampleStore:
    """The latest instant and a ring of past instants for the names read over a range.

    Args:
        range_names: Metric names some rule reads with a range selector.
        max_range_seconds: The longest range any rule reads; older instants are dropped.
        max_instants: Hard bound on the ring's length, whatever the evaluation interval.
    """

    def __init__(
        self, range_names: Iterable[str], max_range_seconds: float, *, max_instants: int = 4096
    ) -> None:
        self.range_names = frozenset(range_names)
        self.max_range_seconds = max_range_seconds
        self._ring: deque[tuple[float, Instant]] = deque(maxlen=max_instants)
        self.latest: Instant = {}
        self.latest_time = -math.inf

    def add(self, timestamp: float, instant: Instant) -> None:
        """Record the instant taken at ``timestamp`` (seconds, monotonic or wall, but one)."""
        self.latest = instant
        self.latest_time = timestamp
        kept = {name: instant[name] for name in self.range_names if name in instant}
        self._ring.append((timestamp, kept))
        horizon = timestamp - self.max_range_seconds
        while self._ring and self._ring[0][0] <= horizon:
            self._ring.popleft()

    def instants(self) -> list[tuple[float, Instant]]:
        """The ring, oldest first (to carry it over when the rules change)."""
        return list(self._ring)

    def __len__(self) -> int:
        return len(self._ring)

    def window(self, name: str, start: float, end: float) -> dict[LabelSet, list[Point]]:
        """Each series of ``name`` with its (time, value) points in ``(start, end]``."""
        series: dict[LabelSet, list[Point]] = {}
        for timestamp, instant in self._ring:
            if start < timestamp <= end:
                for labels, value in instant.get(name, {}).items():
                    series.setdefault(labels, []).append((timestamp, value))
        return series
