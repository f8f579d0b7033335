"""``GET /api/history``, ``GET /api/history/series`` and ``GET /api/requests``.

Served only when the app has a history store (see :func:`mount_monitoring`). Parameters are
parsed here so that a bad one answers 400 with ``{"detail": {"param": ..., "message": ...}}``.
"""

from __future__ import annotations

import math
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from starlette.requests import HTTPConnection

from mlx_relay.monitoring.api.history_views import (
    CatalogEntry,
    HistoryResponse,
    HistorySeries,
    RequestLogEntry,
    RequestLogResponse,
    SeriesCatalogResponse,
    StoreStatus,
    TierInfo,
)
from mlx_relay.monitoring.api.params import bad, integer_param, number_param
from mlx_relay.monitoring.history import MAX_POINTS, HistoryStore, QueryError, plan_query
from mlx_relay.monitoring.history.query import GROUPS
from mlx_relay.monitoring.history.reader import REQUEST_ORDERS
from mlx_relay.monitoring.inference import REQUEST_STATUSES

STATE_ATTRIBUTE = "history_store"
MAX_SERIES = 64
MAX_REQUESTS_PAGE = 1000

router = APIRouter(tags=["history"])


def get_store(connection: HTTPConnection) -> HistoryStore:
    store: HistoryStore = getattr(connection.app.state, STATE_ATTRIBUTE)
    return store


StoreDep = Annotated[HistoryStore, Depends(get_store)]


def split_series(values: list[str]) -> list[str]:
    """Keys from repeated ``series`` parameters, each possibly a comma-separated list
    (commas inside ``{...}`` belong to the labels)."""
    keys: list[str] = []
    for value in values:
        depth, current = 0, ""
        for char in value:
            if char == "{":
                depth += 1
            elif char == "}":
                depth = max(0, depth - 1)
            if char == "," and depth == 0:
                keys.append(current.strip())
                current = ""
            else:
                current += char
        keys.append(current.strip())
    return [k for k in keys if k]


@router.get("/api/history", response_model=HistoryResponse, summary="Series history")
def get_history(
    store: StoreDep,
    series: Annotated[list[str], Query(description="Series keys (repeat or comma-separate).")],
    after: Annotated[str | None, Query(description="Unix seconds, or <= 0: relative.")] = None,
    before: Annotated[str | None, Query(description="Unix seconds, or <= 0: relative.")] = None,
    points: Annotated[str | None, Query(description=f"Buckets, 1..{MAX_POINTS}.")] = None,
    group: Annotated[str, Query(description="avg|min|max|sum.")] = "avg",
) -> HistoryResponse:
    """Each series over ``[after, before)`` in ``points`` equal buckets, read from the
    coarsest tier that still yields that many points. A bucket where nothing was stored is
    ``null``: charts show a gap there. Counters come back as per-second rates."""
    keys = split_series(series)
    if not keys:
        raise bad("series", "give at least one series key (see /api/history/series)")
    if len(keys) > MAX_SERIES:
        raise bad("series", f"at most {MAX_SERIES} series per query, got {len(keys)}")
    if group not in GROUPS:
        raise bad("group", f"expected one of {', '.join(GROUPS)}, got {group!r}")
    try:
        plan = plan_query(
            store.tiers,
            time.time(),
            number_param("after", after),
            number_param("before", before),
            integer_param("points", points, 1, MAX_POINTS),
        )
        results = store.query(keys, plan, group)
    except QueryError as exc:
        raise bad(exc.param, exc.message) from None
    return HistoryResponse(
        after=plan.after,
        before=plan.before,
        points=plan.points,
        step_seconds=plan.step,
        group=group,
        tier=plan.tier.index,
        tier_interval_seconds=plan.tier.interval,
        timestamps=plan.timestamps(),
        series=[HistorySeries.of(spec, values=values) for spec, values in results],
    )


@router.get(
    "/api/history/series", response_model=SeriesCatalogResponse, summary="History catalogue"
)
def get_series(store: StoreDep) -> SeriesCatalogResponse:
    """Every stored series with its kind and unit, the tiers, and the store's size,
    rows and write lag."""
    stats = store.stats()
    return SeriesCatalogResponse(
        tiers=[
            TierInfo(index=t.index, interval_seconds=t.interval, retention_seconds=t.retention)
            for t in store.tiers
        ],
        series=[CatalogEntry.of(s, stored_unit=s.unit) for s in store.catalogue()],
        store=StoreStatus(
            path=str(store.path),
            bytes=stats.bytes,
            max_bytes=store.max_bytes,
            block_rows=stats.block_rows,
            request_rows=stats.request_rows,
            series=stats.series,
            samples_written=stats.samples_written,
            dropped=stats.dropped,
            write_lag_seconds=stats.write_lag_seconds,
            flush_interval_seconds=store.flush_interval,
        ),
    )


@router.get("/api/requests", response_model=RequestLogResponse, summary="Request log")
def get_requests(
    store: StoreDep,
    after: Annotated[str | None, Query(description="Arrival from, unix s or <= 0.")] = None,
    before: Annotated[str | None, Query(description="Arrival before, unix s or <= 0.")] = None,
    status: Annotated[str | None, Query(description="ok|aborted|error.")] = None,
    limit: Annotated[str | None, Query(description=f"1..{MAX_REQUESTS_PAGE}.")] = None,
    offset: Annotated[str | None, Query(description="Rows to skip.")] = None,
    order: Annotated[str, Query(description="newest|oldest|slowest|fastest.")] = "newest",
) -> RequestLogResponse:
    """Finished requests (timings and token counts only, never text), filtered by arrival
    time and status, in pages. ``after`` defaults to the whole log."""
    now = time.time()
    start = number_param("after", after)
    end = number_param("before", before)
    start_at = -math.inf if start is None else (now + start if start <= 0 else start)
    end_at = math.inf if end is None else (now + end if end <= 0 else end)
    if start_at >= end_at:
        raise bad("after", "must be earlier than before")
    if status is not None and status not in REQUEST_STATUSES:
        raise bad("status", f"expected one of {', '.join(REQUEST_STATUSES)}, got {status!r}")
    if order not in REQUEST_ORDERS:
        raise bad("order", f"expected one of {', '.join(REQUEST_ORDERS)}, got {order!r}")
    page = integer_param("limit", limit, 1, MAX_REQUESTS_PAGE) or 100
    skip = integer_param("offset", offset, 0, 1 << 31) or 0
    rows, total = store.requests(
        after=start_at, before=end_at, status=status, limit=page, offset=skip, order=order
    )
    return RequestLogResponse(
        total=total,
        limit=page,
        offset=skip,
        order=order,
        requests=[RequestLogEntry.model_validate(r) for r in rows],
    )


__all__ = ["STATE_ATTRIBUTE", "get_store", "router"]
