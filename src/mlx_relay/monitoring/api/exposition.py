"""``GET /metrics``: the Prometheus text exposition of the same snapshot."""

from __future__ import annotations

from fastapi import APIRouter, Response

from mlx_relay.monitoring.api.deps import ContextDep
from mlx_relay.monitoring.prometheus import render_latest

router = APIRouter(tags=["prometheus"])


@router.get("/metrics", response_class=Response, summary="Prometheus metrics")
def get_prometheus_metrics(context: ContextDep) -> Response:
    """Every ``mlxrelay_*`` family (docs/monitoring-api.md), plus ``grpc_client_*`` calls."""
    body, content_type = render_latest(context.registry)
    return Response(content=body, media_type=content_type)
