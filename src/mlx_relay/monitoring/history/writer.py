"""The writer thread's state: open blocks and rollups per series, written in batches.

Only the store's writer thread uses a :class:`BlockWriter`; it holds the one writing
connection. Samples arrive in time order per series (older ones are dropped).
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field

from mlx_relay.monitoring.history.blocks import OpenBlock, pack_points, pack_raw
from mlx_relay.monitoring.history.series import COUNTER, SeriesSpec
from mlx_relay.monitoring.history.tiers import Point, Rollup, Sample, Tier, counter_rate

logger = logging.getLogger(__name__)

_INSERT_BLOCK = "INSERT INTO blocks (series, tier, start, end, n, data) VALUES (?, ?, ?, ?, ?, ?)"
_UPDATE_BLOCK = "UPDATE blocks SET end = ?, n = ?, data = ? WHERE id = ?"


@dataclass
class SeriesState:
    """One series in the writer: open raw block, rollups and open rollup blocks."""

    id: int
    counter: bool
    rollups: list[Rollup]
    open: list[OpenBlock | None]
    sealed: list[OpenBlock] = field(default_factory=list)
    last: Sample | None = None


class BlockWriter:
    """Turns samples into rows: raw blocks, rollup points and their blocks.

    Args:
        connection: The store's writing connection.
        tiers: Tier 0 (raw) first.
        block_samples: Samples (or points) per block before it is sealed.
        max_gap: Two counter samples further apart give no rate.
    """

    def __init__(
        self,
        connection: sqlite3.Connection,
        tiers: Sequence[Tier],
        *,
        block_samples: int,
        max_gap: float,
    ) -> None:
        self._db = connection
        self._tiers = list(tiers)
        self._block_samples = block_samples
        self._max_gap = max_gap
        self._ids: dict[str, int] = dict(connection.execute("SELECT key, id FROM series"))
        self._states: dict[str, SeriesState] = {}
        self._dirty: dict[int, SeriesState] = {}
        self.samples_written = 0

    @property
    def series(self) -> int:
        return len(self._ids)

    def add(self, timestamp: float, samples: Sequence[tuple[SeriesSpec, float]]) -> None:
        """Append one sample per series, all at ``timestamp``."""
        missing = [spec for spec, _ in samples if spec.key not in self._states]
        if missing:
            self._register(missing)
        for spec, value in samples:
            state = self._states[spec.key]
            if state.last is not None and timestamp <= state.last[0]:
                continue  # not newer than the last sample of the series
            self._append_raw(state, timestamp, value)
            rollup_value: float | None = value
            if state.counter:
                rollup_value = counter_rate(state.last, timestamp, value, self._max_gap)
            state.last = (timestamp, value)
            if rollup_value is not None:
                for index, rollup in enumerate(state.rollups, start=1):
                    point = rollup.add(timestamp, rollup_value)
                    if point is not None:
                        self._append_point(state, index, point)
            self._dirty[state.id] = state

    def close_rollups(self) -> None:
        """Write each open (partial) bucket as a point, e.g. before shutting down. A point of
        the same bucket written later merges with it on read."""
        for state in self._states.values():
            for index, rollup in enumerate(state.rollups, start=1):
                point = rollup.close()
                if point is not None:
                    self._append_point(state, index, point)
                    self._dirty[state.id] = state

    def write(self) -> int:
        """Write every changed block (caller holds a transaction); returns rows written.

        A rollup's open bucket is written as its block's last point so far, so that reads
        reach up to the newest sample; the full point replaces it once the bucket closes.
        """
        rows = 0
        for state in self._dirty.values():
            for tier, rollup in enumerate(state.rollups, start=1):
                partial = rollup.peek()
                if partial is not None:
                    self._open_block(state, tier, partial[0]).dirty = True
            for sealed in state.sealed:
                self._write_block(state, sealed, None)
                rows += 1
            for tier, block in enumerate(state.open):
                if block is not None and block.dirty:
                    partial = state.rollups[tier - 1].peek() if tier else None
                    self._write_block(state, block, partial)
                    rows += 1
            state.sealed.clear()
        self._dirty.clear()
        return rows

    def _register(self, specs: Sequence[SeriesSpec]) -> None:
        for spec in specs:
            if spec.key in self._states:
                continue
            series_id = self._ids.get(spec.key)
            if series_id is None:
                cursor = self._db.execute(
                    "INSERT INTO series (key, family, labels, kind, unit) VALUES (?, ?, ?, ?, ?)",
                    (spec.key, spec.family, json.dumps(dict(spec.labels)), spec.kind, spec.unit),
                )
                series_id = int(cursor.lastrowid or 0)
                self._ids[spec.key] = series_id
            self._states[spec.key] = SeriesState(
                id=series_id,
                counter=spec.kind == COUNTER,
                rollups=[Rollup(t.interval) for t in self._tiers[1:]],
                open=[None] * len(self._tiers),
            )

    def _append_raw(self, state: SeriesState, timestamp: float, value: float) -> None:
        block = self._open_block(state, 0, timestamp)
        block.samples.append((timestamp, value))
        block.dirty = True
        self.samples_written += 1

    def _append_point(self, state: SeriesState, tier: int, point: Point) -> None:
        block = self._open_block(state, tier, point[0])
        block.points.append(point)
        block.dirty = True

    def _open_block(self, state: SeriesState, tier: int, start: float) -> OpenBlock:
        block = state.open[tier]
        # A block spans at most block_samples intervals, so that age eviction, which drops
        # whole blocks, drops data at most one block's span late.
        span = self._block_samples * self._tiers[tier].interval
        if block is not None and (len(block) >= self._block_samples or start - block.start >= span):
            state.sealed.append(block)
            block = None
        if block is None:
            block = OpenBlock(tier, start)
            state.open[tier] = block
        return block

    def _write_block(self, state: SeriesState, block: OpenBlock, partial: Point | None) -> None:
        interval = self._tiers[block.tier].interval
        if block.tier == 0:
            data = pack_raw(block.start, block.samples, exact=state.counter)
            end, count = block.end(interval), len(block)
        else:
            points = block.points if partial is None else [*block.points, partial]
            data = pack_points(block.start, interval, points)
            end, count = points[-1][0] + interval, len(points)
        if block.rowid is not None:
            cursor = self._db.execute(_UPDATE_BLOCK, (end, count, data, block.rowid))
            if cursor.rowcount:
                block.dirty = False
                return
        # New, or its row was evicted meanwhile: (re)insert it.
        cursor = self._db.execute(
            _INSERT_BLOCK, (state.id, block.tier, block.start, end, count, data)
        )
        block.rowid = cursor.lastrowid
        block.dirty = False
