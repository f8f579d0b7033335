"""The writer thread's state: open blocks and rollups per series, written in batches.

Only the store's writer thread uses a :class:`BlockWriter`; it holds the one writing
connection. Samples arrive in time order per series (older ones are dropped). Each commit
costs O(new samples): new samples go into a small segment row per open block, a full block
is packed once into its final row, and each rollup's open bucket is one plain row of
``partials`` that is replaced until the bucket closes.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field

from mlx_relay.monitoring.history.blocks import OpenBlock
from mlx_relay.monitoring.history.series import COUNTER, SeriesSpec
from mlx_relay.monitoring.history.tiers import Point, Rollup, Sample, Tier, counter_rate

logger = logging.getLogger(__name__)

_INSERT_BLOCK = "INSERT INTO blocks (series, tier, start, end, n, data) VALUES (?, ?, ?, ?, ?, ?)"
_UPDATE_BLOCK = "UPDATE blocks SET start = ?, end = ?, n = ?, data = ? WHERE id = ?"
_DELETE_BLOCK = "DELETE FROM blocks WHERE id = ?"
_PUT_PARTIAL = (
    "INSERT OR REPLACE INTO partials (series, tier, start, count, sum, min, max)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_DELETE_PARTIAL = "DELETE FROM partials WHERE series = ? AND tier = ?"


@dataclass
class SeriesState:
    """One series in the writer: open blocks per tier, rollups and their open-bucket rows."""

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
        # A block spans at most block_samples intervals, so that age eviction, which drops
        # whole blocks, drops data at most one block's span late.
        self._spans = [block_samples * t.interval for t in self._tiers]
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
        states = self._states
        for spec, value in samples:
            state = states.get(spec.key) or self._register(spec)
            last = state.last
            if last is not None and timestamp <= last[0]:
                continue  # not newer than the last sample of the series
            block = state.open[0]
            if (
                block is None
                or len(block.items) >= self._block_samples
                or timestamp - block.start >= self._spans[0]
            ):
                block = self._new_block(state, 0, timestamp)
            block.items.append((timestamp, value))
            rollup_value: float | None = value
            if state.counter:
                rollup_value = counter_rate(last, timestamp, value, self._max_gap)
            state.last = (timestamp, value)
            if rollup_value is not None:
                for index, rollup in enumerate(state.rollups, start=1):
                    point = rollup.add(timestamp, rollup_value)
                    if point is not None:
                        self._append_point(state, index, point)
            self._dirty[state.id] = state
        self.samples_written += len(samples)

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
        """Write what changed since the last call (caller holds a transaction); returns the
        rows inserted or updated."""
        rows = 0
        partials: list[tuple[int, int, float, int, float, float, float]] = []
        closed: list[tuple[int, int]] = []
        for state in self._dirty.values():
            for sealed in state.sealed:
                self._seal(state, sealed)
                rows += 1
            state.sealed.clear()
            for block in state.open:
                if block is not None and block.written < len(block.items):
                    self._segment(state, block)
                    rows += 1
            for tier, rollup in enumerate(state.rollups, start=1):
                point = rollup.peek()
                if point is None:
                    closed.append((state.id, tier))
                else:
                    partials.append((state.id, tier, *point))
        self._db.executemany(_PUT_PARTIAL, partials)
        self._db.executemany(_DELETE_PARTIAL, closed)
        self._dirty.clear()
        return rows + len(partials)

    def _register(self, spec: SeriesSpec) -> SeriesState:
        series_id = self._ids.get(spec.key)
        if series_id is None:
            cursor = self._db.execute(
                "INSERT INTO series (key, family, labels, kind, unit) VALUES (?, ?, ?, ?, ?)",
                (spec.key, spec.family, json.dumps(dict(spec.labels)), spec.kind, spec.unit),
            )
            series_id = int(cursor.lastrowid or 0)
            self._ids[spec.key] = series_id
        state = SeriesState(
            id=series_id,
            counter=spec.kind == COUNTER,
            rollups=[Rollup(t.interval) for t in self._tiers[1:]],
            open=[None] * len(self._tiers),
        )
        self._states[spec.key] = state
        return state

    def _new_block(self, state: SeriesState, tier: int, start: float) -> OpenBlock:
        old = state.open[tier]
        if old is not None and old.items:
            state.sealed.append(old)
        block = OpenBlock(tier, start)
        state.open[tier] = block
        return block

    def _append_point(self, state: SeriesState, tier: int, point: Point) -> None:
        block = state.open[tier]
        if (
            block is None
            or len(block.items) >= self._block_samples
            or point[0] - block.start >= self._spans[tier]
        ):
            block = self._new_block(state, tier, point[0])
        block.items.append(point)

    def _segment(self, state: SeriesState, block: OpenBlock) -> None:
        interval = self._tiers[block.tier].interval
        start, end, data = block.pack(block.written, interval, exact=state.counter)
        count = len(block.items) - block.written
        cursor = self._db.execute(_INSERT_BLOCK, (state.id, block.tier, start, end, count, data))
        block.segments.append(int(cursor.lastrowid or 0))
        block.written = len(block.items)

    def _seal(self, state: SeriesState, block: OpenBlock) -> None:
        interval = self._tiers[block.tier].interval
        start, end, data = block.pack(0, interval, exact=state.counter)
        self._db.execute(_INSERT_BLOCK, (state.id, block.tier, start, end, len(block.items), data))
        self._db.executemany(_DELETE_BLOCK, [(rowid,) for rowid in block.segments])
