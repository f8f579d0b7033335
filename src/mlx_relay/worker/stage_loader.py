"""Loading a worker's stage: where it sits in the model, then its layers on the MLX thread."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlx_relay.core.blas import default_threads, same_host, set_threads
from mlx_relay.core.config import ClusterConfig, DeviceConfig
from mlx_relay.core.errors import ShardMismatch
from mlx_relay.core.types import LayerRange
from mlx_relay.model.load import ModelInfo, read_model_info, resolve_model_dir
from mlx_relay.model.partition import assign_layers
from mlx_relay.worker.executor import MLXExecutor
from mlx_relay.worker.stage import StageLimits, StageRuntime


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
    """BLAS threads for a worker: ``model.blas_threads``, else its host's cores divided
    among the workers configured on that host."""
    if config.model.blas_threads is not None:
        return config.model.blas_threads
    here = [w for w in config.workers if same_host(w.host, device.host)]
    return default_threads(len(here))


async def load_stage(
    config: ClusterConfig, executor: MLXExecutor, placement: Placement, threads: int
) -> StageRuntime:
    """Load the placement's layers on the MLX thread, with the configured limits and weight
    form (``model.compute``), the BLAS running ``threads`` threads."""
    inference = config.inference
    limits = StageLimits(
        max_prompt_tokens=inference.max_prompt_tokens,
        max_sessions=inference.max_sessions,
        session_ttl_seconds=inference.session_ttl_seconds,
        max_context=config.model.max_context or placement.info.max_context,
    )
    model = config.model
    await executor.run(set_threads, threads)
    return await executor.run(
        StageRuntime.load,
        placement.model_dir,
        placement.layer_range,
        limits,
        model.compute,
        model.dense_memory_share,
    )
