"""``GET /api/requests/{request_id}/trace`` and ``GET /api/profile``.

Served when the app has a trace store (the coordinator with ``tracing.enabled``; see
:func:`~mlx_relay.monitoring.api.mount.mount_monitoring`). A bad parameter answers 400 with
``{"detail": {"param": ..., "message": ...}}``, an unknown request 404 with
``{"detail": {"param": "request_id", "request_id": ..., "message": ...}}``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, status
from fastapi.responses import JSONResponse
from pydantic import WithJsonSchema
from starlette.requests import HTTPConnection

from mlx_relay.monitoring.api.params import bad, number_param
from mlx_relay.monitoring.traces import TraceStore, chrome_trace, trace_document

STATE_ATTRIBUTE = "trace_store"
FORMATS = ("json", "chrome")
DEFAULT_PROFILE_WINDOW = 300.0
MAX_PROFILE_WINDOW = 366 * 86400.0

router = APIRouter(tags=["traces"])
_BAD: dict[int | str, dict[str, Any]] = {
    400: {"description": 'A bad parameter: `{"detail": {"param", "message"}}`'}
}
_UNKNOWN: dict[int | str, dict[str, Any]] = {
    404: {"description": 'No trace kept of this request: `{"detail": {...}}`'}
}


def get_traces(connection: HTTPConnection) -> TraceStore:
    store: TraceStore = getattr(connection.app.state, STATE_ATTRIBUTE)
    return store


TracesDep = Annotated[TraceStore, Depends(get_traces)]


@router.get(
    "/api/requests/{request_id}/trace",
    response_model=None,
    summary="Request trace",
    responses={**_BAD, **_UNKNOWN},
)
def get_trace(
    request_id: str,
    store: TracesDep,
    format: Annotated[
        str,
        Query(description="json|chrome (trace-event download)."),
        WithJsonSchema({"type": "string", "enum": list(FORMATS)}),
    ] = "json",
) -> Any:
    """One request's spans across every stage, its lanes in pipeline order and where its
    time went (queue, coordinator, compute per stage, network per link, bubble).
    ``format=chrome`` downloads the same spans as Chrome trace-event JSON (Perfetto,
    chrome://tracing). A request older than the last ``tracing.max_traces`` answers from
    the history store, when there is one, with its attribution and no spans."""
    if format not in FORMATS:
        raise bad("format", f"expected one of {', '.join(FORMATS)}, got {format!r}")
    timeline = store.get(request_id)
    if timeline is not None:
        document = trace_document(timeline)
        document["spans_kept"] = True
    else:
        summary = store.archived(request_id)
        if summary is None:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND,
                {
                    "param": "request_id",
                    "request_id": request_id,
                    "message": (
                        f"no trace of request {request_id!r}: unknown, still running, or "
                        f"older than the traces kept (the last {store.max_traces})"
                    ),
                },
            )
        document = {**summary, "spans": [], "spans_kept": False}
    if format == "chrome":
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", request_id)[:64]
        return JSONResponse(
            chrome_trace(document),
            headers={"Content-Disposition": f'attachment; filename="trace-{name}.json"'},
        )
    return document


@router.get(
    "/api/profile",
    response_model=None,
    summary="Time profile of recent requests",
    responses=_BAD,
)
def get_profile(
    store: TracesDep,
    window: Annotated[
        str | None,
        Query(description="Seconds back from now (default 300)."),
        WithJsonSchema({"type": "number", "exclusiveMinimum": 0, "maximum": MAX_PROFILE_WINDOW}),
    ] = None,
) -> dict[str, Any]:
    """Where the time of the requests that finished in the last ``window`` seconds went,
    summed, per request and per output token: queue, coordinator, compute per stage,
    network per link, bubble (from the traces kept in memory)."""
    seconds = number_param("window", window)
    if seconds is None:
        seconds = DEFAULT_PROFILE_WINDOW
    if not 0 < seconds <= MAX_PROFILE_WINDOW:
        raise bad("window", f"expected 0 < window <= {MAX_PROFILE_WINDOW:g} seconds, got {window}")
    return store.profile(seconds)


__all__ = ["STATE_ATTRIBUTE", "get_traces", "router"]
