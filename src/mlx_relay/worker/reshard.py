"""Live repartition on a worker: move the stage to another layer range without a restart.

Three steps, driven by the coordinator's ``Reshard`` calls (docs/architecture.md,
"Live repartition"):

- **prepare**: the fit check on the new range (:func:`~mlx_relay.worker.stage_loader.check_fit`),
  then its layers are loaded on the MLX thread beside the old ones, which keep serving;
- **commit**: the stage serves the new range (its KV sessions start empty);
- **release**: the old range's weights are dropped.

``abort`` undoes a prepare (the new range is dropped) or a commit (the old range serves
again), so a refusal anywhere in the pipeline leaves every stage on its old split. The
stage keeps its weight form (quantized or float32) and its place: a stage that takes token
ids (or samples) keeps doing so.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from mlx_relay.core.config import ClusterConfig, DeviceConfig
from mlx_relay.core.errors import InvalidRequest, PipelineNotReady, ShardMismatch
from mlx_relay.core.types import LayerRange
from mlx_relay.proto import relay_pb2 as pb
from mlx_relay.worker.service import WorkerState
from mlx_relay.worker.stage import StageRuntime
from mlx_relay.worker.stage_loader import Placement, load_stage

logger = logging.getLogger(__name__)

# Weight forms a stage can be told to load again as they are.
_FORMS = ("quantized", "float32")


class NothingPrepared(InvalidRequest):
    """A commit without a prepared range."""


@dataclass(frozen=True)
class _Held:
    layers: LayerRange
    runtime: StageRuntime


class StageReshard:
    """The reshard steps of one worker's stage (see the module docstring).

    Args:
        state: the worker's shared state (its runtime and layer range are swapped here).
        config: the cluster configuration (limits, model).
        device: this worker's entry.
        threads: BLAS threads of the worker.
        on_change: called with the range the stage serves after a commit or an abort.

    Attributes:
        placement: the stage's model and first range; set by the worker once that is loaded.
    """

    def __init__(
        self,
        state: WorkerState,
        config: ClusterConfig,
        device: DeviceConfig,
        threads: int,
        on_change: Callable[[LayerRange], None],
    ) -> None:
        self._state = state
        self._config = config
        self._device = device
        self._threads = threads
        self._on_change = on_change
        self.placement: Placement | None = None
        self._staged: _Held | None = None
        self._previous: _Held | None = None
        self._lock = asyncio.Lock()

    async def handle(self, request: pb.ReshardRequest) -> pb.ReshardResponse:
        """One step, by ``request.phase``.

        Raises:
            InvalidRequest: unknown phase, or a commit with nothing prepared.
            ShardMismatch: a range outside the model, or one that changes the stage's place.
            PartitionError: the range does not fit the worker (the fit check's one line).
            PipelineNotReady: the stage has not loaded its first range yet.
        """
        phase = request.phase
        async with self._lock:
            response = pb.ReshardResponse(request_id=request.request_id)
            if phase == pb.ReshardRequest.PREPARE:
                layers = LayerRange(request.layer_start, request.layer_end)
                response.load_seconds = await self.prepare(layers)
            elif phase == pb.ReshardRequest.COMMIT:
                response.dropped_sessions = self.commit()
            elif phase == pb.ReshardRequest.RELEASE:
                self.release()
            elif phase == pb.ReshardRequest.ABORT:
                self.abort()
            else:
                raise InvalidRequest(f"unknown reshard phase {phase}")
            response.device_id = self._state.device_id
            served = self._state.layer_range
            if served is not None:
                response.layer_start, response.layer_end = served.start, served.end
            return response

    async def prepare(self, layers: LayerRange) -> float:
        """Check and load ``layers`` beside the range being served; seconds it took."""
        state, placement = self._state, self.placement
        if state.runtime is None or placement is None:
            raise PipelineNotReady(f"worker {state.device_id} has not loaded its layers yet")
        self._check_place(layers, placement, state.runtime)
        self._staged = None  # a range prepared before and never committed
        config = self._config
        form = state.runtime.engine.compute
        if form in _FORMS:
            config = config.model_copy(
                update={"model": config.model.model_copy(update={"compute": form})}
            )
        started = time.perf_counter()
        runtime = await load_stage(
            config,
            state.executor,
            Placement(placement.model_dir, placement.info, layers),
            self._threads,
            self._device,
        )
        self._staged = _Held(layers, runtime)
        seconds = time.perf_counter() - started
        logger.info(
            "worker %s prepared layers %s in %.2fs (serving %s)",
            state.device_id,
            layers,
            seconds,
            state.layer_range,
        )
        return seconds

    def _check_place(self, layers: LayerRange, placement: Placement, runtime: StageRuntime) -> None:
        total = placement.info.num_layers
        device_id = self._state.device_id
        if not 0 <= layers.start < layers.end <= total:
            raise ShardMismatch(
                f"worker {device_id}: layers {layers} do not fit {placement.info.name}, "
                f"which has {total} layers"
            )
        if (layers.start == 0) != runtime.is_first or (layers.end == total) != runtime.is_last:
            raise ShardMismatch(
                f"worker {device_id}: layers {layers} would change its place in the pipeline "
                f"(it serves {self._state.layer_range} of {total}); the first stage keeps "
                f"layer 0 and the last keeps layer {total - 1}"
            )

    def commit(self) -> int:
        """Serve the prepared range; returns how many KV sessions of the old one were
        dropped (none after a drain)."""
        state, staged = self._state, self._staged
        if staged is None:
            raise NothingPrepared(f"worker {state.device_id}: no prepared layer range to commit")
        old = state.runtime
        assert old is not None and state.layer_range is not None
        self._previous = _Held(state.layer_range, old)
        self._staged = None
        dropped = len(old.sessions)
        state.runtime, state.layer_range = staged.runtime, staged.layers
        state.report_sessions()
        self._on_change(staged.layers)
        logger.info(
            "worker %s serves layers %s (was %s; %d session(s) dropped)",
            state.device_id,
            staged.layers,
            self._previous.layers,
            dropped,
        )
        return dropped

    def release(self) -> None:
        """Drop the old range's weights and sessions."""
        previous, self._previous = self._previous, None
        if previous is not None:
            previous.runtime.sessions.clear()
            logger.info("worker %s dropped layers %s", self._state.device_id, previous.layers)

    def abort(self) -> None:
        """Undo a prepare or a commit: the stage serves the range it served before."""
        state = self._state
        self._staged = None
        previous, self._previous = self._previous, None
        if previous is None:
            return
        current = state.runtime
        state.runtime, state.layer_range = previous.runtime, previous.layers
        if current is not None:
            current.sessions.clear()
        state.report_sessions()
        self._on_change(previous.layers)
        logger.warning("worker %s is back on layers %s", state.device_id, previous.layers)
