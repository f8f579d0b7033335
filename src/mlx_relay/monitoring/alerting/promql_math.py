"""The arithmetic of PromQL's functions, as Prometheus defines it, on plain lists.

``extrapolated_rate`` follows Prometheus's ``rate``/``increase`` (counter resets, and the
extrapolation to the window's edges, capped at the counter's zero point); ``bucket_quantile``
follows ``histogram_quantile`` on classic buckets (linear interpolation inside a bucket).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Point = tuple[float, float]


def extrapolated_rate(
    points: Sequence[Point], range_start: float, range_end: float, *, per_second: bool
) -> float | None:
    """``rate`` (per second) or ``increase`` of a counter over ``(range_start, range_end]``.

    Returns None with fewer than two points, as Prometheus returns no sample then.
    """
    if len(points) < 2:
        return None
    first_t, first_v = points[0]
    last_t, last_v = points[-1]
    result = last_v - first_v
    previous = first_v
    for _, value in points[1:]:
        if value < previous:  # a counter reset: the counter restarted from 0
            result += previous
        previous = value
    sampled = last_t - first_t
    if sampled <= 0:
        return None
    to_start = first_t - range_start
    to_end = range_end - last_t
    average_step = sampled / (len(points) - 1)
    threshold = average_step * 1.1
    if to_start >= threshold:
        to_start = average_step / 2
    if result > 0 and first_v >= 0:
        # A counter cannot go below zero: do not extrapolate to before it started.
        to_zero = sampled * (first_v / result)
        to_start = min(to_start, to_zero)
    if to_end >= threshold:
        to_end = average_step / 2
    factor = (sampled + to_start + to_end) / sampled
    result *= factor
    if per_second:
        result /= range_end - range_start
    return result


def bucket_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float:
    """The ``q`` quantile of cumulative ``(upper_bound, count)`` buckets (any order).

    NaN without a +Inf bucket, with fewer than two buckets or with no observations.
    """
    if math.isnan(q):
        return math.nan
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    ordered = sorted(buckets)
    if len(ordered) < 2 or not math.isinf(ordered[-1][0]):
        return math.nan
    # Counts must not decrease with the bound (scrapes can tear); Prometheus fixes them up.
    counts: list[float] = []
    for _, count in ordered:
        counts.append(max(count, counts[-1]) if counts else count)
    observations = counts[-1]
    if observations == 0:
        return math.nan
    rank = q * observations
    index = next(i for i, count in enumerate(counts) if count >= rank)
    if index == len(ordered) - 1:
        return ordered[-2][0]
    upper = ordered[index][0]
    if index == 0 and upper <= 0:
        return upper
    lower = 0.0
    in_bucket = counts[index]
    if index > 0:
        lower = ordered[index - 1][0]
        in_bucket -= counts[index - 1]
        rank -= counts[index - 1]
    return lower + (upper - lower) * (rank / in_bucket)
