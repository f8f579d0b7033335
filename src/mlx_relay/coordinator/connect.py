"""What the coordinator builds, checks and derives when it connects to the pipeline.

The pipeline's stages and one client per worker come from the configuration
(:func:`pipeline_stages`, :func:`worker_clients`). Every worker must be SERVING within
``network.connect_timeout`` (:func:`wait_serving`) and serve the layers the assignment gives
it (:func:`check_shards`); :func:`stage_states` asks each one's health for ``GET /health``;
the prompt limits and the scheduler's settings follow from the configuration and the model
(:func:`prompt_limits`, :func:`scheduler_settings`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from mlx_relay.coordinator.client import WorkerClient
from mlx_relay.coordinator.pipeline import Stage
from mlx_relay.coordinator.prepare import PromptLimits
from mlx_relay.coordinator.scheduler import SchedulerSettings, default_micro_batches
from mlx_relay.core.config import ClusterConfig
from mlx_relay.core.errors import RelayError, ShardMismatch, WorkerUnavailable
from mlx_relay.core.tls_config import tls_material
from mlx_relay.model.backend import backend_name
from mlx_relay.model.load import ModelInfo
from mlx_relay.model.partition import assign_layers


class WorkersUnreachable(WorkerUnavailable):
    """Some workers were not SERVING within ``network.connect_timeout``.

    Attributes:
        failures: ``(device_id, address, last error)`` of each worker that failed.
    """

    def __init__(self, failures: list[tuple[str, str, str]], total: int) -> None:
        listed = "; ".join(f"{d} at {a} ({e})" for d, a, e in failures)
        RelayError.__init__(self, f"{len(failures)} of {total} workers unreachable: {listed}")
        self.device_id = failures[0][0]
        self.failures = failures


def pipeline_stages(config: ClusterConfig, num_layers: int) -> list[Stage]:
    """One :class:`Stage` per worker, in pipeline order, with the layers the assignment
    gives it (``devices[i].layers``, else a split by memory); replicas share an index."""
    assignment = assign_layers(config, num_layers)
    return [
        Stage(config.stage_index(w.id), w.id, w.address, assignment[w.id]) for w in config.workers
    ]


def worker_clients(config: ClusterConfig, recorder: Any | None = None) -> list[WorkerClient]:
    """One client per worker, same order, with the coordinator's TLS material and its
    collector recording each call (``recorder``, or None)."""
    tls = tls_material(config, config.coordinator_id)
    return [
        WorkerClient.for_device(w, config.network, recorder=recorder, tls=tls)
        for w in config.workers
    ]


async def wait_serving(clients: Sequence[WorkerClient], timeout: float) -> None:
    """Wait until every worker is SERVING.

    Raises:
        WorkersUnreachable: some were not within ``timeout`` seconds (each one named).
    """
    results = await asyncio.gather(
        *(client.wait_serving(timeout) for client in clients), return_exceptions=True
    )
    failures: list[tuple[str, str, str]] = []
    for client, result in zip(clients, results, strict=True):
        if isinstance(result, asyncio.CancelledError):
            raise result
        if isinstance(result, BaseException):
            message = str(result)
            if isinstance(result, WorkerUnavailable):
                message = message.split(": ", 1)[-1]
            failures.append((client.device_id, client.address, message))
    if failures:
        raise WorkersUnreachable(failures, len(clients))


async def check_shards(
    stages: Sequence[Stage], clients: Sequence[WorkerClient], num_layers: int
) -> None:
    """Check that each stage's worker serves the layers the assignment gives it.

    Raises:
        ShardMismatch: one serves other layers, or another model's.
    """
    statuses = await asyncio.gather(*(client.get_status() for client in clients))
    for stage, status in zip(stages, statuses, strict=True):
        served = (status.layer_start, status.layer_end)
        expected = (stage.layer_range.start, stage.layer_range.end)
        if status.num_layers != num_layers or served != expected:
            raise ShardMismatch(
                f"stage {stage.index} ({stage.device_id}) serves layers "
                f"[{served[0]}, {served[1]}) of {status.num_layers}; the coordinator "
                f"expects {stage.layer_range} of {num_layers} (same model and layer "
                f"assignment on every node?)"
            )


async def stage_states(clients: Sequence[WorkerClient]) -> list[tuple[str, str]]:
    """Each worker's ``(device_id, status)``: SERVING, NOT_SERVING or UNREACHABLE (one
    health RPC each, not retried)."""

    async def one(client: WorkerClient) -> tuple[str, str]:
        try:
            status = await client.health(retry=False)
        except RelayError:
            return client.device_id, "UNREACHABLE"
        return client.device_id, "SERVING" if status == "SERVING" else "NOT_SERVING"

    return list(await asyncio.gather(*(one(client) for client in clients)))


def prompt_limits(config: ClusterConfig, info: ModelInfo) -> PromptLimits:
    """The limits every request is checked against (``inference.*``, the model's context
    and vocabulary, ``model.max_context`` when it is shorter)."""
    max_context = info.max_context
    if config.model.max_context is not None:
        max_context = min(max_context, config.model.max_context)
    inference = config.inference
    return PromptLimits(
        inference.max_prompt_tokens,
        max_context,
        info.vocab_size,
        max_prompt_bytes=inference.max_prompt_bytes,
        max_messages=inference.max_messages,
        max_stop_length=inference.max_stop_length,
    )


def scheduler_settings(config: ClusterConfig) -> SchedulerSettings:
    """The scheduler's settings from ``inference.*`` (micro-batches: one per machine the
    stages run on, unless ``inference.micro_batches`` says)."""
    inference = config.inference
    return SchedulerSettings(
        max_batch_size=inference.max_batch_size,
        prefill_chunk_tokens=min(inference.prefill_chunk_tokens, inference.max_prompt_tokens),
        max_micro_batches=inference.micro_batches
        or default_micro_batches([stage[0].host for stage in config.stages]),
        first_token_tokens=inference.first_token_priority_tokens,
        chain_max_batch=chained_steps_max_batch(config),
    )


# Chained steps' batch limit where the setting is left to the machine and it has a GPU.
CHAINED_STEPS_GPU = 4


def chained_steps_max_batch(config: ClusterConfig) -> int:
    """``inference.chained_steps_max_batch``, or when unset: :data:`CHAINED_STEPS_GPU` where
    this machine computes on a GPU (its CPU cores are free while a stage computes), 0 on a
    CPU-only machine (the stages' compute takes its cores)."""
    configured = config.inference.chained_steps_max_batch
    if configured is not None:
        return configured
    return CHAINED_STEPS_GPU if backend_name() != "cpu" else 0
