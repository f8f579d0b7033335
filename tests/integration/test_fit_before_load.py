"""A worker refuses a layer range that cannot fit its memory budget, with one line naming the
numbers, before it reads any weight; one that fits loads and serves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mlx_relay.core.config import ClusterConfig
from mlx_relay.core.errors import PartitionError
from mlx_relay.core.types import LayerRange
from mlx_relay.model.footprint import read_footprint
from mlx_relay.worker import stage
from mlx_relay.worker.worker_server import WorkerServer

MAX_SESSIONS = 4
MAX_CONTEXT = 256


def config_with_budget(model_dir: Path, budget_gb: float) -> ClusterConfig:
    return ClusterConfig.from_dict(
        {
            "model": {"path": str(model_dir), "max_context": MAX_CONTEXT, "compute": "float32"},
            "inference": {"max_sessions": MAX_SESSIONS},
            "devices": [
                {
                    "id": "w0",
                    "host": "127.0.0.1",
                    "port": 0,
                    "layers": [0, 4],
                    "memory_budget_gb": budget_gb,
                }
            ],
        }
    )


def needs(model_dir: Path) -> tuple[int, int]:
    """(float32 weights, weights + KV budget) of the whole 4-layer model, in bytes."""
    costs = read_footprint(model_dir).costs(dense=True, kv_tokens=MAX_SESSIONS * MAX_CONTEXT)
    weights = read_footprint(model_dir).costs(dense=True, kv_tokens=0).stage_bytes(LayerRange(0, 4))
    return weights, costs.stage_bytes(LayerRange(0, 4))


async def test_too_small_a_budget_is_refused_before_loading(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[Any] = []
    real_load = stage.StageRuntime.load
    monkeypatch.setattr(
        stage.StageRuntime, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k)
    )
    weights, total = needs(tiny_model_dir)
    # Room for the weights but not for the KV budget on top.
    budget_gb = (weights + (total - weights) / 2) / 1e9
    server = WorkerServer(config_with_budget(tiny_model_dir, budget_gb), "w0")
    try:
        with pytest.raises(PartitionError) as refused:
            await server.start(wait=True)
    finally:
        await server.stop(grace=0.1)
    message = str(refused.value)
    assert "\n" not in message
    assert f"worker w0: layers [0, 4) need {total / 1e6:.2f} MB" in message
    assert f"(float32 weights {weights / 1e6:.2f} MB + KV budget" in message
    assert f"for {MAX_SESSIONS * MAX_CONTEXT} tokens)" in message
    assert f"but memory_budget_gb {budget_gb:g} is {budget_gb * 1e3:.2f} MB" in message
    assert loads == []


async def test_a_budget_that_fits_loads(tiny_model_dir: Path) -> None:
    _, total = needs(tiny_model_dir)
    server = WorkerServer(config_with_budget(tiny_model_dir, total * 1.01 / 1e9), "w0")
    try:
        await server.start(wait=True)
        assert server.port
    finally:
        await server.stop(grace=0.1)
