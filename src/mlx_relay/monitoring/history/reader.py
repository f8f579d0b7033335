"""Reading the store: the series catalogue, stored points and the request log.

Functions over a read-only connection (each reading thread opens its own); pure apart from
the SQL they run.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mlx_relay.monitoring.history.blocks import unpack_points, unpack_raw
from mlx_relay.monitoring.history.query import QueryError
from mlx_relay.monitoring.history.series import COUNTER, SeriesSpec
from mlx_relay.monitoring.history.tiers import Point, Tier, counter_rates

REQUEST_ORDERS = {
    "newest": "arrival DESC",
    "oldest": "arrival ASC",
    "slowest": "e2e_seconds DESC",
    "fastest": "e2e_seconds ASC",
}
REQUEST_COLUMNS = (
    "request_id",
    "arrival",
    "status",
    "finish_reason",
    "error_type",
    "queue_seconds",
    "ttft_seconds",
    "e2e_seconds",
    "prompt_tokens",
    "generated_tokens",
    "stage_seconds",
    "network_seconds",
)


@dataclass(frozen=True)
class StoredSeries:
    id: int
    spec: SeriesSpec


def _spec(row: Sequence[Any]) -> StoredSeries:
    series_id, key, family, labels, kind, unit = row
    pairs = tuple((str(k), str(v)) for k, v in json.loads(labels).items())
    return StoredSeries(int(series_id), SeriesSpec(key, family, pairs, kind, unit))


def catalogue(connection: sqlite3.Connection) -> list[StoredSeries]:
    rows = connection.execute(
        "SELECT id, key, family, labels, kind, unit FROM series ORDER BY key"
    ).fetchall()
    return [_spec(row) for row in rows]


def find_series(connection: sqlite3.Connection, keys: Sequence[str]) -> list[StoredSeries]:
    """The stored series of ``keys``, in that order.

    Raises:
        QueryError: a key is not in the store (``param`` is ``series``).
    """
    marks = ",".join("?" * len(keys))
    rows = connection.execute(
        f"SELECT id, key, family, labels, kind, unit FROM series WHERE key IN ({marks})",
        list(keys),
    ).fetchall()
    found = {row[1]: _spec(row) for row in rows}
    for key in keys:
        if key not in found:
            raise QueryError(
                "series", f"no series {key!r} in the history (see /api/history/series)"
            )
    return [found[key] for key in keys]


def read_points(
    connection: sqlite3.Connection,
    series: StoredSeries,
    tier: Tier,
    after: float,
    before: float,
    max_gap: float,
) -> list[Point]:
    """The stored points of one series in ``[after, before)``: raw samples as one-sample
    points (a counter's as rates, see :func:`counter_rates`) or the tier's rollup points."""
    counter = series.spec.kind == COUNTER
    # A counter's first rate in range needs the sample before it.
    reach = after - max_gap if tier.raw and counter else after - tier.interval
    rows = connection.execute(
        "SELECT start, data FROM blocks WHERE series = ? AND tier = ? AND start < ? AND end >= ?"
        " ORDER BY start",
        (series.id, tier.index, before, reach),
    ).fetchall()
    if tier.raw:
        samples = [s for start, data in rows for s in unpack_raw(start, data)]
        samples.sort()
        if counter:
            samples = counter_rates(samples, max_gap)
        return [(t, 1, v, v, v) for t, v in samples if after <= t < before]
    points = [p for start, data in rows for p in unpack_points(start, tier.interval, data)]
    partial = connection.execute(
        "SELECT start, count, sum, min, max FROM partials WHERE series = ? AND tier = ?",
        (series.id, tier.index),
    ).fetchone()
    if partial is not None:
        points.append(tuple(partial))
    return [p for p in points if after <= p[0] < before]


def query_requests(
    connection: sqlite3.Connection,
    *,
    after: float,
    before: float,
    status: str | None,
    limit: int,
    offset: int,
    order: str,
) -> tuple[list[dict[str, Any]], int]:
    """A page of the request log and how many rows match in all."""
    where = "arrival >= ? AND arrival < ?"
    params: list[Any] = [after, before]
    if status is not None:
        where += " AND status = ?"
        params.append(status)
    total = connection.execute(f"SELECT COUNT(*) FROM requests WHERE {where}", params).fetchone()
    rows = connection.execute(
        f"SELECT {', '.join(REQUEST_COLUMNS)} FROM requests WHERE {where}"
        f" ORDER BY {REQUEST_ORDERS[order]}, id LIMIT ? OFFSET ?",
        [*params, limit, offset],
    ).fetchall()
    out = []
    for row in rows:
        record = dict(zip(REQUEST_COLUMNS, row, strict=True))
        record["stage_seconds"] = json.loads(record["stage_seconds"])
        out.append(record)
    return out, int(total[0])


def trace_summary(connection: sqlite3.Connection, request_id: str) -> dict[str, Any] | None:
    """A request's stored trace summary, or None."""
    row = connection.execute(
        "SELECT summary FROM trace_summaries WHERE request_id = ?", (request_id,)
    ).fetchone()
    if row is None:
        return None
    summary: dict[str, Any] = json.loads(row[0])
    return summary
