"""``GET /api/placement`` and ``mlxrelay_placement_predicted_step_seconds``: the placement
advisor (:mod:`mlx_relay.model.placement`) fed with the coordinator's live measurements.

Inputs, per stage in pipeline order: the layers it holds and its compute form (from the
cluster view), its mean decode forward time and prefill time per token (stage metrics), its
memory cap (``memory_budget_gb``, else the machine's memory) and the transit of the hop into
it (the link's transfer time: Forward RPC time minus compute). Without a snapshot (no running
coordinator) every device is unmeasured and the times are in layer units (1.0 = one layer).
After a live repartition only the timings measured since count (:class:`StageTotals`): the
stages' histograms are cumulative, and the old split's times would mislead the new one's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from pydantic import BaseModel, Field

from mlx_relay.core.config import ClusterConfig
from mlx_relay.core.errors import PartitionError, RelayError
from mlx_relay.core.http_access import rate_limit, require_token
from mlx_relay.core.types import LayerRange
from mlx_relay.model.backend import backend_name
from mlx_relay.model.footprint import Footprint, read_footprint
from mlx_relay.model.load import read_model_info, resolve_model_dir
from mlx_relay.model.partition import assign_layers
from mlx_relay.model.placement import (
    Advice,
    DeviceCost,
    Prediction,
    StageSample,
    advise,
    device_costs,
    what_if,
)
from mlx_relay.monitoring.api.deps import PLACEMENT_ATTRIBUTE
from mlx_relay.monitoring.snapshot import Snapshot

logger = logging.getLogger(__name__)

STEP_FAMILY = "mlxrelay_placement_predicted_step_seconds"

router = APIRouter(tags=["monitoring"])


class StageView(BaseModel):
    device_id: str
    layer_start: int
    layer_end: int
    predicted_seconds: float = Field(description="Predicted decode forward time of the stage.")
    memory_bytes: int = Field(description="Weights plus KV budget the stage needs.")


class SplitView(BaseModel):
    stages: list[StageView]
    predicted_step_seconds: float = Field(
        description="Batched decode step: the slowest stage or link."
    )
    predicted_latency_seconds: float = Field(
        description="One request's decode token: every stage and link in turn."
    )


class DeviceView(BaseModel):
    device_id: str
    decode_layer_seconds: float = Field(description="Decode forward time per layer.")
    overhead_seconds: float = Field(default=0.0, description="Fixed cost of a forward call.")
    prefill_layer_seconds_per_token: float | None = None
    memory_cap_bytes: int | None = None
    link_seconds: float = Field(description="Transit of the hop into this stage.")
    measured: bool = Field(description="False: the speed is the mean of the measured ones.")


class PlacementView(BaseModel):
    """What ``GET /api/placement`` returns (docs/monitoring-api.md)."""

    source: str = Field(description="'measured' (live stage timings) or 'model' (layer units).")
    compute: str = Field(description="Weight form the memory figures assume.")
    head_layers: float = Field(description="Output head compute, in layers (parameter ratio).")
    kv_budget_tokens: int = Field(description="KV budget per stage: max_sessions x context.")
    devices: list[DeviceView]
    current: SplitView | None
    proposed: SplitView | None
    predicted_gain_ratio: float | None = Field(
        default=None, description="current step / proposed step - 1 (0.25 = 25 % faster)."
    )
    error: str | None = Field(default=None, description="Why no split was proposed.")


@dataclass(frozen=True)
class StageTotals:
    """A stage's cumulative forward figures at one moment (a baseline to measure from)."""

    decode_seconds: float = 0.0
    decode_calls: int = 0
    prefill_seconds: float = 0.0
    prefill_tokens: int = 0


def stage_totals(snapshot: Snapshot | None) -> dict[str, StageTotals]:
    """Every stage's :class:`StageTotals` in ``snapshot``."""
    totals: dict[str, StageTotals] = {}
    for device_id, stage in snapshot.stages.items() if snapshot is not None else ():
        decode = stage.forward_duration_seconds.get("decode")
        prefill = stage.forward_duration_seconds.get("prefill")
        totals[device_id] = StageTotals(
            decode.sum if decode is not None else 0.0,
            decode.count if decode is not None else 0,
            prefill.sum if prefill is not None else 0.0,
            stage.tokens_total.get("prefill", 0),
        )
    return totals


def placement_view(
    config: ClusterConfig,
    footprint: Footprint,
    snapshot: Snapshot | None,
    *,
    model_max_context: int,
    add_device_gb: Sequence[float] = (),
    without: Sequence[str] = (),
    baseline: Mapping[str, StageTotals] | None = None,
) -> PlacementView:
    """The advisor's report for ``config``'s workers, measured from ``snapshot`` when given
    (the timings since ``baseline`` only, when given).

    Raises:
        PartitionError: an unknown worker in ``without``.
    """
    current = _current_split(config, footprint, snapshot)
    dense = _dense(config, snapshot)
    context = config.model.max_context or model_max_context
    kv_tokens = config.inference.max_sessions * context
    costs = footprint.costs(dense, kv_tokens)
    since = baseline or {}
    samples = [_sample(config, device_id, layers, snapshot, since) for device_id, layers in current]
    error: str | None = None
    advice: Advice | None = None
    try:
        if add_device_gb or without:
            devices = device_costs(samples, costs)
            advice = what_if(
                devices,
                costs,
                add_device_bytes=[int(g * 1e9) for g in add_device_gb],
                without=without,
            )
        else:
            advice = advise(samples, costs)
    except PartitionError as exc:
        if without and "no device" in str(exc):
            raise
        error = str(exc)
    devices = list(advice.devices) if advice else device_costs(samples, costs)
    measured = snapshot is not None and all(d.measured for d in device_costs(samples, costs))
    current_prediction = advice.current if advice else None
    return PlacementView(
        source="measured" if measured else "model",
        compute="float32" if dense else "quantized",
        head_layers=costs.head_layers,
        kv_budget_tokens=kv_tokens,
        devices=[_device_view(d) for d in devices],
        current=_split_view(current_prediction, [d for d, _ in current]),
        proposed=_split_view(advice.proposed, [d.device_id for d in advice.devices])
        if advice
        else None,
        predicted_gain_ratio=advice.gain_ratio if advice else None,
        error=error,
    )


def _current_split(
    config: ClusterConfig, footprint: Footprint, snapshot: Snapshot | None
) -> list[tuple[str, LayerRange]]:
    assigned = assign_layers(config, len(footprint.layer_bytes))
    split = []
    for device_id, layers in assigned.items():
        status = snapshot.devices.get(device_id) if snapshot is not None else None
        if status is not None and status.layer_start is not None and status.layer_end is not None:
            layers = LayerRange(status.layer_start, status.layer_end)
        split.append((device_id, layers))
    return split


def _dense(config: ClusterConfig, snapshot: Snapshot | None) -> bool:
    if snapshot is not None:
        workers = {w.id for w in config.workers}
        statuses = snapshot.devices.items()
        forms = {s.compute for d, s in statuses if d in workers and s.compute}
        if forms:
            return "float32" in forms
    if config.model.compute == "auto":
        # As a stage resolves it on this machine's backend (mlx_relay.model.backend).
        return backend_name() == "cpu"
    return config.model.compute == "float32"


def _sample(
    config: ClusterConfig,
    device_id: str,
    layers: LayerRange,
    snapshot: Snapshot | None,
    baseline: Mapping[str, StageTotals],
) -> StageSample:
    device = next(w for w in config.workers if w.id == device_id)
    cap = int(device.memory_budget_gb * 1e9) if device.memory_budget_gb is not None else None
    decode = prefill = None
    link = 0.0
    if snapshot is not None:
        status = snapshot.devices.get(device_id)
        if cap is None and status is not None and status.metrics is not None:
            cap = status.metrics.memory_total_bytes
        now = stage_totals(snapshot).get(device_id)
        if now is not None:
            before = baseline.get(device_id, StageTotals())
            calls = now.decode_calls - before.decode_calls
            if calls > 0:
                decode = (now.decode_seconds - before.decode_seconds) / calls
            tokens = now.prefill_tokens - before.prefill_tokens
            if tokens > 0:
                prefill = (now.prefill_seconds - before.prefill_seconds) / tokens
        for transit in snapshot.network.links:
            if transit.peer == device_id and transit.transfer.mean is not None:
                link = transit.transfer.mean
    return StageSample(device_id, layers, decode, prefill, cap, link, device.host)


def _device_view(device: DeviceCost) -> DeviceView:
    return DeviceView(
        device_id=device.device_id,
        decode_layer_seconds=device.decode_layer_seconds,
        overhead_seconds=device.overhead_seconds,
        prefill_layer_seconds_per_token=device.prefill_layer_seconds_per_token,
        memory_cap_bytes=device.memory_cap_bytes,
        link_seconds=device.link_seconds,
        measured=device.measured,
    )


def _split_view(prediction: Prediction | None, device_ids: list[str]) -> SplitView | None:
    if prediction is None:
        return None
    return SplitView(
        stages=[
            StageView(
                device_id=device_id,
                layer_start=r.start,
                layer_end=r.end,
                predicted_seconds=seconds,
                memory_bytes=size,
            )
            for device_id, r, seconds, size in zip(
                device_ids,
                prediction.split,
                prediction.stage_seconds,
                prediction.stage_bytes,
                strict=True,
            )
        ],
        predicted_step_seconds=prediction.step_seconds,
        predicted_latency_seconds=prediction.latency_seconds,
    )


class PlacementSource:
    """The coordinator's config, its model's footprint (read once) and the live snapshot."""

    def __init__(self, config: ClusterConfig, snapshot: Any) -> None:
        self.config = config
        self._snapshot = snapshot
        self._model: tuple[Footprint, int] | None = None
        self.baseline: dict[str, StageTotals] = {}

    def totals(self) -> dict[str, StageTotals]:
        """Every stage's figures now (what :attr:`baseline` takes after a repartition)."""
        return stage_totals(self._snapshot())

    def model(self) -> tuple[Footprint, int]:
        """The model's footprint and context length, read once."""
        if self._model is None:
            model_dir: Path = resolve_model_dir(self.config.model, False)
            info = read_model_info(model_dir)
            self._model = (read_footprint(model_dir), info.max_context)
        return self._model

    def view(
        self, add_device_gb: Sequence[float] = (), without: Sequence[str] = ()
    ) -> PlacementView:
        footprint, max_context = self.model()
        return placement_view(
            self.config,
            footprint,
            self._snapshot(),
            model_max_context=max_context,
            add_device_gb=add_device_gb,
            without=without,
            baseline=self.baseline,
        )


class PlacementCollector(Collector):
    """``mlxrelay_placement_predicted_step_seconds{split="current|proposed"}``."""

    def __init__(self, source: PlacementSource, registry: CollectorRegistry) -> None:
        self._source = source
        registry.register(self)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            STEP_FAMILY,
            "Predicted batched decode step of the current and the proposed layer split, seconds.",
            labels=["split"],
        )
        try:
            view = self._source.view()
        except RelayError as exc:
            # A scrape never fails for the advisor: the family is empty until it can answer.
            logger.debug("no placement prediction for /metrics: %s", exc)
            yield family
            return
        for name, split in (("current", view.current), ("proposed", view.proposed)):
            if split is not None:
                family.add_metric([name], split.predicted_step_seconds)
        yield family


def mount_placement(app: FastAPI, source: PlacementSource) -> None:
    """Serve ``GET /api/placement`` and add the placement family to ``/metrics``."""
    setattr(app.state, PLACEMENT_ATTRIBUTE, source)
    registry = app.state.monitoring.registry
    PlacementCollector(source, registry)
    app.include_router(router, dependencies=[Depends(rate_limit), Depends(require_token)])


# A what-if device's memory: positive, and at most a million GB (bytes must fit an integer).
DeviceGigabytes = Annotated[float, Field(gt=0, le=1e6)]


@router.get(
    "/api/placement",
    response_model=PlacementView,
    summary="Placement advice",
    responses={400: {"description": "A what-if the advisor cannot answer."}},
)
async def get_placement(
    request: Request,
    add_device_gb: Annotated[list[DeviceGigabytes], Query()] = [],  # noqa: B006
    without: Annotated[list[str], Query()] = [],  # noqa: B006
) -> PlacementView:
    """The current and the proposed layer split with their predicted decode step and the
    predicted gain; ``add_device_gb`` and ``without`` ask what-ifs."""
    source: PlacementSource = getattr(request.app.state, PLACEMENT_ATTRIBUTE)
    try:
        return await asyncio.to_thread(source.view, add_device_gb, without)
    except PartitionError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
