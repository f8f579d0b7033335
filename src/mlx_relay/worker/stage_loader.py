"""Loading a worker's stage: where it sits in the model, then its layers on the MLX thread."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from mlx_relay.core.blas import available_cores, same_host, set_threads
from mlx_relay.core.config import ClusterConfig, DeviceConfig
from mlx_relay.core.errors import PartitionError, ShardMismatch
from mlx_relay.core.types import LayerRange
from mlx_relay.model.backend import backend_name, choose_compute
from mlx_relay.model.footprint import read_footprint, stage_bytes
from mlx_relay.model.load import ModelInfo, read_model_info, resolve_model_dir
from mlx_relay.model.partition import assign_layers
from mlx_relay.worker.executor import MLXExecutor
from mlx_relay.worker.stage import StageLimits, StageRuntime
from mlx_relay.worker.step_threads import ThreadPolicy


@dataclass(frozen=True)
class Placement:
    """Which model a worker serves and which of its layers."""

    model_dir: Path
    info: ModelInfo
    layer_range: LayerRange


async def find_placement(
    config: ClusterConfig,
    device_id: str,
    executor: MLXExecutor,
    configured: LayerRange | None,
) -> Placement:
    """Resolve the model and this worker's layers: ``configured``, else its share of an
    ``auto`` assignment.

    Raises:
        ModelError: the model cannot be found or read.
        ShardMismatch: the layers do not fit the model.
    """
    model_dir = await executor.run(resolve_model_dir, config.model, False)
    info = await executor.run(read_model_info, model_dir, config.model.name)
    layer_range = configured or assign_layers(config, info.num_layers)[device_id]
    if layer_range.end > info.num_layers:
        raise ShardMismatch(
            f"worker {device_id}: layers {layer_range} do not fit {info.name}, "
            f"which has {info.num_layers} layers"
        )
    return Placement(model_dir, info, layer_range)


def blas_threads(config: ClusterConfig, device: DeviceConfig) -> int:
    """BLAS threads for a worker at load: ``model.blas_threads``, else its host's cores
    divided among the workers configured on that host."""
    return thread_policy(config, device).for_step(0)


def thread_policy(config: ClusterConfig, device: DeviceConfig) -> ThreadPolicy:
    """How many BLAS threads each step of a worker uses (:mod:`~mlx_relay.worker.step_threads`)."""
    here = [w for w in config.workers if same_host(w.host, device.host)]
    return ThreadPolicy(available_cores(), len(here), config.model.blas_threads)


def check_fit(
    config: ClusterConfig,
    device: DeviceConfig,
    placement: Placement,
    limits: StageLimits,
    backend: str,
) -> None:
    """Refuse, before any weight is read, a layer range that cannot fit this worker.

    The weights are sized from the safetensors headers in the form the stage will compute
    with (dense float32 where ``model.compute`` resolves to it). With ``memory_budget_gb``
    set (10^9 bytes), weights plus the KV budget (``max_sessions`` x ``max_context`` tokens
    over its layers) must fit it; without, the weights must fit the machine's memory.

    Raises:
        PartitionError: one line naming the range, the numbers and the cap.
    """
    import psutil

    footprint = read_footprint(placement.model_dir)
    layers = placement.layer_range
    stored = stage_bytes(footprint, layers, dense=False, kv_tokens=0)
    dense_size = stage_bytes(footprint, layers, dense=True, kv_tokens=0)
    memory = psutil.virtual_memory()
    budget = device.memory_budget_gb
    cap = int(budget * 1e9) if budget is not None else memory.total
    quantized = placement.info.quantization != "none"
    share = config.model.dense_memory_share
    choice = choose_compute(
        config.model.compute, backend, dense_size, min(cap, memory.available), share, quantized
    )
    dense = choice.compute == "float32"
    weights = dense_size if dense else stored
    context = limits.max_context or placement.info.max_context
    kv_tokens = limits.max_sessions * context if budget is not None else 0
    need = stage_bytes(footprint, layers, dense=dense, kv_tokens=kv_tokens)
    if need <= cap:
        return
    where = f"memory_budget_gb {budget:g}" if budget is not None else "this machine's memory"
    raise PartitionError(
        f"worker {device.id}: layers {layers} need {size_text(need)} "
        f"({choice.compute} weights {size_text(weights)} + KV budget "
        f"{size_text(need - weights)} for {kv_tokens} tokens) but {where} is "
        f"{size_text(cap)}; give it fewer layers or a larger budget"
    )


def size_text(size: float) -> str:
    """Bytes as GB (10^9) with two decimals, or MB below a GB."""
    return f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.2f} MB"


async def load_stage(
    config: ClusterConfig,
    executor: MLXExecutor,
    placement: Placement,
    threads: int,
    device: DeviceConfig | None = None,
) -> StageRuntime:
    """Check the placement fits (:func:`check_fit`, when ``device`` is given), then load its
    layers on the MLX thread, with the configured limits and weight form (``model.compute``),
    the BLAS running ``threads`` threads."""
    inference = config.inference
    limits = StageLimits(
        max_prompt_tokens=inference.max_prompt_tokens,
        max_sessions=inference.max_sessions,
        max_sessions_per_peer=inference.peer_session_quota,
        session_ttl_seconds=inference.session_ttl_seconds,
        max_context=config.model.max_context or placement.info.max_context,
    )
    model = config.model
    if device is not None:
        backend = await executor.run(backend_name)
        await asyncio.to_thread(check_fit, config, device, placement, limits, backend)
    await executor.run(set_threads, threads)
    return await executor.run(
        StageRuntime.load,
        placement.model_dir,
        placement.layer_range,
        limits,
        model.compute,
        model.dense_memory_share,
    )
