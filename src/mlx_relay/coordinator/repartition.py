"""Live repartition: move the pipeline to a new layer split without restarting a process.

The steps (docs/architecture.md, "Live repartition"):

1. **drain**: the step loop is held: requests already running go on to their end, new ones
   wait to join (within the admission limits, so they do not fail); past
   ``placement.drain_timeout_s`` nothing changes and the error says how many still run;
2. **load**: every worker whose range changes loads its new range beside the old one
   (``Reshard`` PREPARE; the worker's fit check applies to the new range);
3. **switch**: each of them serves its new range (COMMIT), the coordinator's stages take
   the new ranges, and the loop resumes, the requests that waited first;
4. **release**: the workers drop their old ranges (RELEASE).

A refusal in step 2 or 3 (a range that does not fit, a worker that cannot be reached)
undoes the steps on every worker (ABORT) and the loop resumes on the old split; the error
names the worker and its reason.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, replace

from mlx_relay.coordinator.client import StageError, WorkerClient
from mlx_relay.coordinator.pipeline import Stage
from mlx_relay.coordinator.step_loop import StepLoop
from mlx_relay.core.config import ClusterConfig
from mlx_relay.core.errors import PartitionError, RelayError
from mlx_relay.core.types import LayerRange
from mlx_relay.model.partition import partition_layers
from mlx_relay.proto import relay_pb2 as pb

logger = logging.getLogger(__name__)

Phase = str
"""``draining``, ``loading``, ``switching``, ``rolling back``, ``done``, ``unchanged``."""


class RepartitionFailed(RelayError):
    """The new split was not applied; the pipeline serves the old one."""


class RepartitionBusy(RelayError):
    """Another repartition is under way."""


@dataclass(frozen=True)
class RepartitionResult:
    """What a repartition changed and how long its steps took (seconds)."""

    before: tuple[LayerRange | None, ...]
    after: tuple[LayerRange, ...]
    drain_seconds: float = 0.0
    load_seconds: float = 0.0
    total_seconds: float = 0.0

    @property
    def changed(self) -> bool:
        return self.before != self.after


@dataclass(frozen=True)
class RepartitionSettings:
    """The ``placement`` section's limits and the status call's deadline (seconds)."""

    drain_timeout: float
    load_timeout: float
    status_timeout: float = 10.0

    @classmethod
    def from_config(cls, config: ClusterConfig) -> RepartitionSettings:
        placement = config.placement
        return cls(placement.drain_timeout_s, placement.load_timeout_s, config.network.ping_timeout)


def check_split(split: Sequence[LayerRange], num_layers: int, stages: int) -> list[LayerRange]:
    """``split`` when it gives each of ``stages`` stages a contiguous range, in order,
    covering the model's layers once.

    Raises:
        PartitionError: the split does not; the message says where.
    """
    if len(split) != stages:
        raise PartitionError(f"{len(split)} layer ranges for {stages} stages")
    return partition_layers(num_layers, list(split))


async def repartition(
    stages: list[Stage],
    clients: Sequence[WorkerClient],
    loop: StepLoop,
    split: Sequence[LayerRange],
    settings: RepartitionSettings,
    *,
    cleanups: Callable[[], Collection[asyncio.Task[None]]] = lambda: (),
    on_drained: Callable[[], Awaitable[None]] | None = None,
    on_phase: Callable[[Phase, str], None] = lambda phase, detail: None,
) -> RepartitionResult:
    """Apply ``split`` (one range per stage, checked by the caller with :func:`check_split`)
    and update ``stages`` in place.

    Args:
        stages: the coordinator's pipeline (its ranges are replaced on success).
        clients: one client per stage, same order.
        loop: the step loop to hold while the split changes.
        split: the new ranges.
        settings: drain and load deadlines.
        cleanups: the pending EndSession tasks, awaited after the drain.
        on_drained: awaited once the pipeline is drained (e.g. a fresh status poll).
        on_phase: told each step as it starts, with one line of detail.

    Raises:
        RepartitionFailed: nothing changed (drain timed out, a worker refused); the message
            names the worker and the reason.
    """
    started = time.monotonic()
    after = tuple(split)
    before = await served_ranges(stages, clients, settings)
    moving = [i for i, (old, new) in enumerate(zip(before, after, strict=True)) if old != new]
    if not moving:
        for i, layers in enumerate(after):
            stages[i] = replace(stages[i], layer_range=layers)
        on_phase("unchanged", "the pipeline already has this split")
        return RepartitionResult(before, after)
    on_phase("draining", f"{loop.scheduled} request(s) finish, new ones wait")
    loop.hold()
    try:
        try:
            await asyncio.wait_for(loop.drained(), settings.drain_timeout)
        except TimeoutError:
            raise RepartitionFailed(
                f"{loop.scheduled} request(s) still running after "
                f"{settings.drain_timeout:g} s (placement.drain_timeout_s); the split is "
                f"unchanged"
            ) from None
        pending = list(cleanups())
        if pending:
            await asyncio.wait(pending, timeout=settings.drain_timeout)
        drained = time.monotonic()
        if on_drained is not None:
            await on_drained()
        on_phase("loading", _describe(stages, moving, before, after))
        try:
            load_seconds = await _move(stages, clients, moving, after, settings, on_phase)
        except RepartitionFailed as exc:
            raise RepartitionFailed(f"{exc}; rolled back to {_split_text(before)}") from None
        for i, layers in enumerate(after):
            stages[i] = replace(stages[i], layer_range=layers)
    finally:
        loop.end_hold()
    await _step_all(clients, moving, pb.ReshardRequest.RELEASE, after, settings)
    result = RepartitionResult(
        before, after, drained - started, load_seconds, time.monotonic() - started
    )
    on_phase("done", f"{_split_text(before)} -> {_split_text(after)}")
    logger.info(
        "repartitioned %s -> %s in %.2f s (drain %.2f s, load %.2f s)",
        _split_text(before),
        _split_text(after),
        result.total_seconds,
        result.drain_seconds,
        result.load_seconds,
    )
    return result


async def served_ranges(
    stages: Sequence[Stage], clients: Sequence[WorkerClient], settings: RepartitionSettings
) -> tuple[LayerRange | None, ...]:
    """The range each worker says it serves (``GetStatus``); None when it reports none.

    Raises:
        RepartitionFailed: a worker does not answer.
    """
    answers = await asyncio.gather(
        *(c.get_status(timeout=settings.status_timeout) for c in clients),
        return_exceptions=True,
    )
    served: list[LayerRange | None] = []
    for stage, answer in zip(stages, answers, strict=True):
        if isinstance(answer, BaseException):
            if not isinstance(answer, RelayError):
                raise answer
            raise RepartitionFailed(
                f"{stage.device_id} does not say which layers it serves: {answer}"
            )
        ok = 0 <= answer.layer_start < answer.layer_end
        served.append(LayerRange(answer.layer_start, answer.layer_end) if ok else None)
    return tuple(served)


async def restore_ranges(
    stages: Sequence[Stage], clients: Sequence[WorkerClient], settings: RepartitionSettings
) -> list[str]:
    """Give back its range to every worker that serves another one than the coordinator's
    stage (a worker restarted with its configured layers after a live repartition); the
    device ids given back. The caller makes sure no step runs meanwhile.

    Raises:
        RepartitionFailed: a worker does not answer or refuses its range.
    """
    served = await served_ranges(stages, clients, settings)
    expected = [s.layer_range for s in stages]
    moving = [i for i, layers in enumerate(served) if layers != expected[i]]
    if not moving:
        return []
    logger.warning("giving their layers back: %s", _describe(stages, moving, served, expected))
    await _move(stages, clients, moving, expected, settings, lambda phase, detail: None)
    await _step_all(clients, moving, pb.ReshardRequest.RELEASE, expected, settings)
    return [stages[i].device_id for i in moving]


async def _move(
    stages: Sequence[Stage],
    clients: Sequence[WorkerClient],
    moving: Sequence[int],
    split: Sequence[LayerRange],
    settings: RepartitionSettings,
    on_phase: Callable[[Phase, str], None],
) -> float:
    """PREPARE then COMMIT on every moving worker; ABORT on all of them if one fails. The
    slowest load's seconds.

    Raises:
        RepartitionFailed: a worker refused (named, with its reason); every moving worker
            serves its old range again.
    """
    loads = await _step_all(clients, moving, pb.ReshardRequest.PREPARE, split, settings)
    failed = _first_failure(stages, moving, loads, split, "refused layers")
    if failed is None:
        on_phase("switching", "workers serve their new ranges")
        commits = await _step_all(clients, moving, pb.ReshardRequest.COMMIT, split, settings)
        failed = _first_failure(stages, moving, commits, split, "could not switch to")
    if failed is not None:
        on_phase("rolling back", failed)
        await _step_all(clients, moving, pb.ReshardRequest.ABORT, split, settings)
        raise RepartitionFailed(failed)
    return max((r.load_seconds for r in loads if isinstance(r, pb.ReshardResponse)), default=0.0)


async def _step_all(
    clients: Sequence[WorkerClient],
    moving: Sequence[int],
    phase: pb.ReshardRequest.Phase,
    split: Sequence[LayerRange],
    settings: RepartitionSettings,
) -> list[pb.ReshardResponse | BaseException]:
    """One reshard step on every moving stage at once; errors are returned, and logged for
    the steps that only clean up (RELEASE, ABORT)."""
    timeout = settings.load_timeout
    results = await asyncio.gather(
        *(clients[i].reshard(phase, split[i].start, split[i].end, timeout=timeout) for i in moving),
        return_exceptions=True,
    )
    if phase in (pb.ReshardRequest.RELEASE, pb.ReshardRequest.ABORT):
        name = pb.ReshardRequest.Phase.Name(phase)
        for i, result in zip(moving, results, strict=True):
            if isinstance(result, BaseException):
                logger.warning("Reshard %s on %s failed: %s", name, clients[i].device_id, result)
    return list(results)


def _first_failure(
    stages: Sequence[Stage],
    moving: Sequence[int],
    results: Sequence[pb.ReshardResponse | BaseException],
    split: Sequence[LayerRange],
    what: str,
) -> str | None:
    for i, result in zip(moving, results, strict=True):
        if isinstance(result, asyncio.CancelledError):
            raise result
        if isinstance(result, BaseException):
            # A worker's own answer already names it and the numbers; say it once.
            reason = result.detail if isinstance(result, StageError) else str(result)
            return f"{stages[i].device_id} {what} {split[i]}: {reason}"
    return None


def _describe(
    stages: Sequence[Stage],
    moving: Sequence[int],
    before: Sequence[LayerRange | None],
    after: Sequence[LayerRange],
) -> str:
    return ", ".join(f"{stages[i].device_id} {before[i]} -> {after[i]}" for i in moving)


def _split_text(split: Sequence[LayerRange | None]) -> str:
    return " / ".join(str(r) for r in split)
