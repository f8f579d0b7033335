"""Planning a history query and regrouping stored points into the points asked: pure.

Times are unix seconds; zero or a negative number is relative to now (``-3600`` is an hour
ago). The tier is the coarsest one whose points are still at least as fine as the points
asked, moved coarser while the range starts before the tier's retention. Output points are
fixed buckets ``[after + i * step, after + (i + 1) * step)``; a bucket without any stored
sample is ``None``: a gap, never interpolated.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mlx_relay.monitoring.history.tiers import Point, Tier

MAX_POINTS = 11_000
GROUPS = ("avg", "min", "max", "sum")
DEFAULT_AFTER = -3600.0
# Raw samples arrive a little later than every interval (sampling takes time): a bucket
# this much wider than the interval always holds one, so jitter never makes false gaps.
RAW_SLACK = 1.25


class QueryError(ValueError):
    """A bad query parameter; ``param`` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


@dataclass(frozen=True)
class Plan:
    """What to read and how to regroup it."""

    tier: Tier
    after: float
    before: float
    points: int

    @property
    def step(self) -> float:
        return (self.before - self.after) / self.points

    def timestamps(self) -> list[float]:
        return [self.after + i * self.step for i in range(self.points)]


def resolve_time(value: float, now: float) -> float:
    """Absolute unix seconds; zero or negative ``value`` counts back from ``now``."""
    return now + value if value <= 0 else value


def native_step(tier: Tier) -> float:
    """The finest output step a tier fills without false gaps."""
    return tier.interval * RAW_SLACK if tier.raw else tier.interval


def plan_query(
    tiers: Sequence[Tier],
    now: float,
    after: float | None = None,
    before: float | None = None,
    points: int | None = None,
) -> Plan:
    """Resolve the times, pick the tier and the number of points.

    Raises:
        QueryError: a parameter is out of range (the error names it).
    """
    start = resolve_time(DEFAULT_AFTER if after is None else after, now)
    end = resolve_time(0.0 if before is None else before, now)
    if not math.isfinite(start):
        raise QueryError("after", "expected a finite number")
    if not math.isfinite(end):
        raise QueryError("before", "expected a finite number")
    if start >= end:
        raise QueryError("after", f"must be earlier than before ({start:.3f} >= {end:.3f})")
    span = end - start
    if points is not None and not 1 <= points <= MAX_POINTS:
        raise QueryError("points", f"expected 1..{MAX_POINTS}, got {points}")
    wanted = points or min(MAX_POINTS, max(1, math.floor(span / native_step(tiers[0]))))
    step = span / wanted
    tier = tiers[0]
    for candidate in tiers:
        if native_step(candidate) <= step:
            tier = candidate
    while tier.index + 1 < len(tiers) and start < now - tier.retention:
        tier = tiers[tier.index + 1]
    # Never more points than the tier holds: finer buckets would be mostly gaps.
    wanted = max(1, min(wanted, math.floor(span / native_step(tier))))
    return Plan(tier, start, end, wanted)


def regroup(points: Iterable[Point], plan: Plan, group: str) -> list[float | None]:
    """One value per output bucket: ``group`` of the stored points that start in it."""
    if group not in GROUPS:
        raise QueryError("group", f"expected one of {', '.join(GROUPS)}, got {group!r}")
    n = plan.points
    step = plan.step
    counts = [0] * n
    sums = [0.0] * n
    lows = [math.inf] * n
    highs = [-math.inf] * n
    after = plan.after
    for start, count, total, low, high in points:
        if start < after:
            continue
        i = int((start - after) / step)  # floor: the offset is not negative
        if i < n:
            counts[i] += count
            sums[i] += total
            if low < lows[i]:
                lows[i] = low
            if high > highs[i]:
                highs[i] = high
    if group == "avg":
        return [s / c if c else None for c, s in zip(counts, sums, strict=True)]
    if group == "sum":
        return [s if c else None for c, s in zip(counts, sums, strict=True)]
    chosen = lows if group == "min" else highs
    return [v if c else None for c, v in zip(counts, chosen, strict=True)]
