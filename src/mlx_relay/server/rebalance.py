"""``POST /api/placement/apply`` and ``GET /api/placement/apply``: a live repartition of the
layers, started over HTTP and followed step by step (docs/monitoring-api.md, "Live
repartition"), and the opt-in automatic mode (``placement.auto_rebalance``).

A :class:`Rebalancer` runs one repartition at a time in the background
(:meth:`DistributedOrchestrator.repartition`); its :class:`RebalanceStatus` says where the
last one is. After a change the placement advisor measures from the new split on
(:attr:`PlacementSource.baseline`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, status
from pydantic import BaseModel, Field

from mlx_relay.coordinator.repartition import RepartitionBusy, check_split
from mlx_relay.core.errors import PartitionError, RelayError
from mlx_relay.core.http_access import rate_limit, require_token
from mlx_relay.core.placement_config import AutoRebalanceConfig
from mlx_relay.core.tasks import PeriodicTask
from mlx_relay.core.types import LayerRange
from mlx_relay.server.placement import PlacementSource, PlacementView, SplitView

logger = logging.getLogger(__name__)

REBALANCER_ATTRIBUTE = "rebalancer"

router = APIRouter(tags=["monitoring"])

State = Literal["idle", "running", "done", "unchanged", "failed"]


class ApplyRequest(BaseModel):
    """``POST /api/placement/apply``: the split to apply, or none for the advisor's proposal."""

    split: list[tuple[int, int]] | None = Field(
        default=None,
        description="One [start, end) pair per worker in pipeline order; null: the proposal.",
    )


class ProgressLine(BaseModel):
    seconds: float = Field(description="Since the repartition started.")
    phase: str
    detail: str


class RebalanceStatus(BaseModel):
    """Where the last repartition is (``GET /api/placement/apply``)."""

    state: State = "idle"
    trigger: Literal["manual", "auto"] | None = None
    before: list[tuple[int, int]] | None = None
    after: list[tuple[int, int]] | None = None
    predicted_gain_ratio: float | None = None
    progress: list[ProgressLine] = Field(default_factory=list)
    error: str | None = None
    started_at: float | None = Field(default=None, description="Unix time.")
    total_seconds: float | None = None
    drain_seconds: float | None = None
    load_seconds: float | None = None


@dataclass(frozen=True)
class Decision:
    """Whether the automatic mode acts now, and why (or why not)."""

    act: bool
    reason: str


def auto_decision(
    view: PlacementView, settings: AutoRebalanceConfig, last_change: float, now: float
) -> Decision:
    """The automatic mode's rule (pure): act when the hold-down has passed since the last
    change (or the start), every stage is measured on the current split, the proposal
    differs from it and its predicted gain is at least ``min_gain``."""
    waited = now - last_change
    if waited < settings.hold_down_s:
        return Decision(False, f"hold-down: {waited:.0f} of {settings.hold_down_s:g} s passed")
    if view.source != "measured":
        return Decision(False, "not every stage is measured on the current split yet")
    if view.proposed is None or view.current is None:
        return Decision(False, f"no proposal: {view.error}")
    if split_pairs(view.proposed) == split_pairs(view.current):
        return Decision(False, "the current split is the best one")
    gain = view.predicted_gain_ratio or 0.0
    if gain < settings.min_gain:
        return Decision(False, f"predicted gain {gain:+.1%} below min_gain {settings.min_gain:.0%}")
    return Decision(True, f"predicted gain {gain:+.1%} (min_gain {settings.min_gain:.0%})")


def split_pairs(split: SplitView) -> list[tuple[int, int]]:
    """A split's ranges as (start, end) pairs."""
    return [(s.layer_start, s.layer_end) for s in split.stages]


class Rebalancer:
    """Runs repartitions one at a time and keeps the last one's status.

    Args:
        orchestrator: the running pipeline (``DistributedOrchestrator``).
        source: the placement advisor's inputs (its baseline moves with each change).
        clock: monotonic clock for the hold-down (injectable for tests).
    """

    def __init__(
        self,
        orchestrator: Any,
        source: PlacementSource,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._orchestrator = orchestrator
        self._source = source
        self._clock = clock
        self.status = RebalanceStatus()
        self.last_change = clock()
        self._task: asyncio.Task[None] | None = None
        self._auto: PeriodicTask | None = None
        self.last_decision: Decision | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def current_split(self) -> list[LayerRange]:
        return [s.layer_range for s in self._orchestrator.stages]

    def start(
        self,
        split: Sequence[LayerRange],
        *,
        gain: float | None = None,
        trigger: Literal["manual", "auto"] = "manual",
    ) -> RebalanceStatus:
        """Check ``split`` and start applying it in the background.

        Raises:
            RepartitionBusy: one is under way.
            PartitionError: the split does not cover the model's layers in order.
        """
        if self.running:
            raise RepartitionBusy("a repartition is under way; see GET /api/placement/apply")
        info = self._orchestrator.model_info
        checked = check_split(split, info.num_layers, len(self._orchestrator.stages))
        self.status = RebalanceStatus(
            state="running",
            trigger=trigger,
            before=[(r.start, r.end) for r in self.current_split()],
            after=[(r.start, r.end) for r in checked],
            predicted_gain_ratio=gain,
            started_at=time.time(),
        )
        self._task = asyncio.get_running_loop().create_task(self._run(checked, self.status))
        return self.status

    async def proposal(self) -> tuple[list[LayerRange], float | None]:
        """The advisor's proposed split and its predicted gain.

        Raises:
            PartitionError: the advisor proposes none (the message says why).
        """
        view = await asyncio.to_thread(self._source.view)
        if view.proposed is None:
            raise PartitionError(f"the advisor proposes no split: {view.error}")
        return [LayerRange(a, b) for a, b in split_pairs(view.proposed)], view.predicted_gain_ratio

    async def wait(self) -> RebalanceStatus:
        """The status once the running repartition (if any) has ended."""
        if self._task is not None:
            await asyncio.shield(self._task)
        return self.status

    async def _run(self, split: list[LayerRange], job: RebalanceStatus) -> None:
        started = time.monotonic()
        baseline: dict[str, Any] = {}

        def on_phase(phase: str, detail: str) -> None:
            seconds = time.monotonic() - started
            job.progress.append(ProgressLine(seconds=seconds, phase=phase, detail=detail))
            if phase == "switching":
                # Drained and freshly polled: what the old split measured ends here.
                baseline.update(self._source.totals())

        try:
            result = await self._orchestrator.repartition(split, on_phase)
        except RelayError as exc:
            job.state, job.error = "failed", str(exc)
            logger.warning("repartition failed: %s", exc)
        else:
            job.state = "done" if result.changed else "unchanged"
            job.drain_seconds = result.drain_seconds
            job.load_seconds = result.load_seconds
            if result.changed:
                self._source.baseline = baseline
                self.last_change = self._clock()
        finally:
            job.total_seconds = time.monotonic() - started

    # -- the automatic mode ----------------------------------------------------------------

    def start_auto(self, settings: AutoRebalanceConfig) -> None:
        """Check the advisor every ``interval_s`` and apply its proposal by the rule of
        :func:`auto_decision`."""
        if self._auto is None:

            async def round_() -> None:
                await self.auto_round(settings)

            self._auto = PeriodicTask("auto-rebalance", settings.interval_s, round_)
            self._auto.start()

    async def auto_round(self, settings: AutoRebalanceConfig) -> Decision:
        """One check of the automatic mode; starts a repartition when the rule says so."""
        if self.running:
            return Decision(False, "a repartition is under way")
        view = await asyncio.to_thread(self._source.view)
        decision = auto_decision(view, settings, self.last_change, self._clock())
        self.last_decision = decision
        if decision.act and view.proposed is not None:
            logger.info("auto-rebalance: %s", decision.reason)
            split = [LayerRange(a, b) for a, b in split_pairs(view.proposed)]
            self.start(split, gain=view.predicted_gain_ratio, trigger="auto")
        else:
            logger.debug("auto-rebalance waits: %s", decision.reason)
        return decision

    async def stop(self) -> None:
        """Stop the automatic mode and wait for a running repartition to end."""
        auto, self._auto = self._auto, None
        if auto is not None:
            await auto.stop()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)


def mount_rebalance(app: FastAPI, rebalancer: Rebalancer) -> None:
    """Serve ``POST`` and ``GET /api/placement/apply`` (behind the app's token)."""
    setattr(app.state, REBALANCER_ATTRIBUTE, rebalancer)
    app.include_router(router, dependencies=[Depends(rate_limit), Depends(require_token)])


def _rebalancer(request: Request) -> Rebalancer:
    rebalancer: Rebalancer = getattr(request.app.state, REBALANCER_ATTRIBUTE)
    return rebalancer


@router.post(
    "/api/placement/apply",
    response_model=RebalanceStatus,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Apply a layer split live",
    responses={
        400: {"description": "A body that is not JSON, or a split that cannot be applied."},
        409: {"description": "A repartition is under way."},
    },
)
async def apply_split(request: Request, body: ApplyRequest) -> RebalanceStatus:
    """Start moving the pipeline to ``split`` (or the advisor's proposal) without restarting
    a worker: running requests drain, new ones wait, the workers load their new ranges, the
    pipeline resumes. Follow it with ``GET /api/placement/apply``. 409 while one runs; 400
    for a split that does not cover the layers in order."""
    rebalancer = _rebalancer(request)
    gain: float | None = None
    try:
        if body.split is None:
            split, gain = await rebalancer.proposal()
        else:
            split = [_range(pair, i) for i, pair in enumerate(body.split)]
        return rebalancer.start(split, gain=gain)
    except RepartitionBusy as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    except PartitionError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from None


def _range(pair: tuple[int, int], index: int) -> LayerRange:
    try:
        return LayerRange(*pair)
    except ValueError as exc:
        raise PartitionError(f"split[{index}]: {exc}") from None


@router.get(
    "/api/placement/apply", response_model=RebalanceStatus, summary="The last live repartition"
)
async def apply_status(request: Request) -> RebalanceStatus:
    """Where the last repartition is: its state, each step so far, the error if it failed."""
    return _rebalancer(request).status
