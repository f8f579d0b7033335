"""Blocks of samples as the writer fills them, and their packing into rows.

A raw block holds ``(timestamp, value)`` samples; a rollup block holds :data:`Point` tuples
of one tier. :func:`pack_raw` / :func:`pack_points` and their inverses are pure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mlx_relay.monitoring.history import codec
from mlx_relay.monitoring.history.tiers import Point, Sample

MILLISECONDS = 1000.0


def pack_raw(start: float, samples: Sequence[Sample], *, exact: bool) -> bytes:
    """Timestamps as millisecond offsets from ``start``; values as float32 unless ``exact``
    (then float64 where float32 would lose anything)."""
    offsets = [round((t - start) * MILLISECONDS) for t, _ in samples]
    values = [v for _, v in samples]
    narrow = codec.float_column(values, exact=exact)
    return codec.encode((("q", offsets), (narrow.typecode, narrow)))


def unpack_raw(start: float, blob: bytes) -> list[Sample]:
    offsets, values = codec.decode(blob)
    return [(start + o / MILLISECONDS, float(v)) for o, v in zip(offsets, values, strict=True)]


def pack_points(start: float, interval: float, points: Sequence[Point]) -> bytes:
    """Bucket starts as whole intervals after ``start``; count, sum, min, max exactly."""
    first = round(start / interval)
    columns: list[tuple[str, Sequence[float] | Sequence[int]]] = [
        ("q", [round(p[0] / interval) - first for p in points]),
        ("I", [p[1] for p in points]),
    ]
    for index in (2, 3, 4):
        column = codec.float_column([p[index] for p in points], exact=True)  # type: ignore[misc]
        columns.append((column.typecode, column))
    return codec.encode(columns)


def unpack_points(start: float, interval: float, blob: bytes) -> list[Point]:
    steps, counts, sums, lows, highs = codec.decode(blob)
    return [
        (start + step * interval, int(c), float(s), float(lo), float(hi))
        for step, c, s, lo, hi in zip(steps, counts, sums, lows, highs, strict=True)
    ]


@dataclass
class OpenBlock:
    """A block being filled. What each commit adds goes into a small segment row; once
    full, the block is packed into one row and its segments are deleted."""

    tier: int
    start: float
    items: list[Any] = field(default_factory=list)  # samples (tier 0) or points
    written: int = 0  # items already in segment rows
    segments: list[int] = field(default_factory=list)

    def pack(self, first: int, interval: float, *, exact: bool) -> tuple[float, float, bytes]:
        """``(start, end, data)`` of the items from ``first`` on."""
        items = self.items[first:]
        start = items[0][0]
        if self.tier == 0:
            return start, items[-1][0], pack_raw(start, items, exact=exact)
        return start, items[-1][0] + interval, pack_points(start, interval, items)
