"""``GET /health``, the readiness probe: does every pipeline stage have a serving replica?
For load balancers and ``mlx-relay up``. (The monitoring system's health checks are
``GET /api/health``.)

It answers from the coordinator's last poll of the stages
(:class:`~mlx_relay.coordinator.stage_health.StageHealthPoll`, every
``monitoring.poll_interval`` seconds), so however often it is called, each worker gets one
health RPC per interval.

When the app has a bearer token (``http.auth_token``), ``/health`` asks for it like every
other route; load balancers then send it as ``Authorization: Bearer TOKEN``.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from mlx_relay.core.http_access import require_token
from mlx_relay.server.deps import ServicesDep

router = APIRouter(tags=["readiness"], dependencies=[Depends(require_token)])


class StageState(BaseModel):
    device_id: str = Field(description="The worker's device id.")
    stage: int = Field(description="Position in the pipeline, from 0.")
    layers: list[int] = Field(description="Half-open layer range [start, end).")
    status: str = Field(description="SERVING, NOT_SERVING or UNREACHABLE.")


class ReadinessResponse(BaseModel):
    status: str = Field(
        description="'ok' when every stage has a SERVING replica, else 'unavailable'."
    )
    stages: list[StageState] = Field(
        description="Every worker, in pipeline order (the replicas of a stage share its index)."
    )
    failing: list[str] = Field(
        default_factory=list, description="Workers not SERVING of stages with none SERVING."
    )
    degraded: list[str] = Field(
        default_factory=list,
        description="Replicas not SERVING of stages that still have a SERVING replica.",
    )
    detail: str | None = Field(default=None, description="Why the cluster is unavailable.")
    checked_at: float | None = Field(
        default=None, description="When the stages were last polled, unix seconds."
    )


@router.get(
    "/health",
    response_model=ReadinessResponse,
    responses={503: {"model": ReadinessResponse, "description": "A stage is not serving."}},
)
async def get_readiness(services: ServicesDep) -> JSONResponse:
    """200 when every stage had a replica answering SERVING on ``grpc.health.v1`` at the
    last poll (replicas not serving are listed as ``degraded``); 503 naming the failing
    stages' workers otherwise (or while the pipeline is not initialised)."""
    orchestrator = services.orchestrator
    if orchestrator is None:
        return _reply(ReadinessResponse(status="ok", stages=[], detail="no pipeline (dashboard)"))
    if not orchestrator.ready:
        return _reply(
            ReadinessResponse(status="unavailable", stages=[], detail="pipeline not initialised"),
        )
    poll = orchestrator.health_poll
    states = dict(poll.states or [])
    stages = [
        StageState(
            device_id=stage.device_id,
            stage=stage.index,
            layers=[stage.layer_range.start, stage.layer_range.end],
            status=states.get(stage.device_id, "UNREACHABLE"),
        )
        for stage in orchestrator.stages
    ]
    served = {s.stage for s in stages if s.status == "SERVING"}
    failing = [s.device_id for s in stages if s.stage not in served]
    degraded = [s.device_id for s in stages if s.stage in served and s.status != "SERVING"]
    if not failing:
        return _reply(
            ReadinessResponse(
                status="ok", stages=stages, degraded=degraded, checked_at=poll.checked_at
            )
        )
    detail = "not serving: " + ", ".join(
        f"{s.device_id} ({s.status})" for s in stages if s.device_id in failing
    )
    return _reply(
        ReadinessResponse(
            status="unavailable",
            stages=stages,
            failing=failing,
            degraded=degraded,
            detail=detail,
            checked_at=poll.checked_at,
        )
    )


def _reply(body: ReadinessResponse) -> JSONResponse:
    code = status.HTTP_200_OK if body.status == "ok" else status.HTTP_503_SERVICE_UNAVAILABLE
    return JSONResponse(body.model_dump(), status_code=code)
