"""Does the placement advisor's predicted gain show up? A skewed split, then the split the
advisor proposes from its measurements, each served by real ``mlx-relay worker`` processes.

    .venv/bin/python bench/placement.py                       # bundled model, 20/10 then proposed
    .venv/bin/python bench/placement.py --layers 15 --concurrency 8 --rounds 3

For each split: aggregate generated tokens/s with ``--concurrency`` requests in flight
(medians of ``--rounds``), and the advisor's predicted decode step. Printed: the predicted
gain of the proposal next to the measured tokens/s ratio.

One run on a shared 2-core machine (both workers on its cores; 8 x 32 tokens, 3 rounds):
from 8/22 layers the advisor proposed 19/11 with a predicted gain of +53.9 %; each stage
then measured 78 ms per decode call against 70.8 ms predicted, but tokens/s rose only
1.13x (32.1 -> 36.2): stages that share cores do not run side by side, so their step is
nearer the sum of the stages than the maximum the model assumes (one device per stage).
"""

from __future__ import annotations

from mlx_relay.core.blas import load_blas
from mlx_relay.core.hugepages import reexec_with_hugepages

reexec_with_hugepages()  # weights in huge pages, as in the workers
load_blas()  # before MLX is imported below, as in the worker processes

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import AsyncIterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import yaml  # noqa: E402

from mlx_relay.cli.fleet import WorkerFleet  # noqa: E402
from mlx_relay.cli.up import with_free_worker_ports  # noqa: E402
from mlx_relay.coordinator.orchestrator import DistributedOrchestrator, InferenceRequest  # noqa: E402
from mlx_relay.core.config import ClusterConfig, ModelConfig  # noqa: E402
from mlx_relay.model.footprint import read_footprint  # noqa: E402
from mlx_relay.model.load import read_model_info, resolve_model_dir  # noqa: E402
from mlx_relay.server.placement import PlacementView, placement_view  # noqa: E402

PROMPT = "Distributed inference splits the layers of a model across several devices because"
POLL = 0.5


def split_config(model_dir: Path, split: list[tuple[int, int]]) -> ClusterConfig:
    devices: list[dict[str, Any]] = [
        {"id": f"worker-{i}", "host": "127.0.0.1", "port": 0, "layers": list(r)}
        for i, r in enumerate(split)
    ]
    data = {
        "model": {"path": str(model_dir)},
        "devices": devices,
        "monitoring": {"poll_interval": POLL, "collection_interval": POLL},
    }
    return with_free_worker_ports(ClusterConfig.from_dict(data), avoid=0)


async def aggregate(orchestrator: DistributedOrchestrator, concurrent: int, tokens: int) -> float:
    started = time.perf_counter()
    responses = await asyncio.gather(
        *(
            orchestrator.process_request(InferenceRequest(prompt=PROMPT, max_tokens=tokens))
            for _ in range(concurrent)
        )
    )
    return sum(r.usage.completion_tokens for r in responses) / (time.perf_counter() - started)


@contextlib.asynccontextmanager
async def split_cluster(
    model_dir: Path, split: list[tuple[int, int]]
) -> AsyncIterator[DistributedOrchestrator]:
    """``mlx-relay worker`` processes on ``split`` and an initialised, warmed-up coordinator."""
    config = split_config(model_dir, split)
    work_dir = Path(tempfile.mkdtemp(prefix="mlx-relay-placement-"))
    config_path = work_dir / "cluster.yaml"
    config_path.write_text(yaml.safe_dump(config.to_dict()))
    fleet = WorkerFleet(config, config_path, work_dir, monitoring=True)
    fleet.start()
    orchestrator = DistributedOrchestrator(config, enable_monitoring=True)
    try:
        while not await fleet.poll_serving():
            await asyncio.sleep(0.2)
        await orchestrator.initialize()
        await aggregate(orchestrator, 2, 4)  # warm-up
        yield orchestrator
    finally:
        await orchestrator.shutdown()
        fleet.stop()
        shutil.rmtree(work_dir, ignore_errors=True)


async def measure(
    model_dir: Path, split: list[tuple[int, int]], args: argparse.Namespace
) -> tuple[float, PlacementView]:
    """Median tokens/s of the split, and the advisor's view after those requests."""
    async with split_cluster(model_dir, split) as orchestrator:
        config = orchestrator.config
        rates = [
            await aggregate(orchestrator, args.concurrency, args.max_tokens)
            for _ in range(args.rounds)
        ]
        await asyncio.sleep(POLL * 4)  # the workers' stage timings reach the coordinator
        collector = orchestrator.metrics_collector
        assert collector is not None
        info = read_model_info(model_dir)
        view = placement_view(
            config,
            read_footprint(model_dir),
            collector.snapshot(),
            model_max_context=info.max_context,
        )
        return statistics.median(rates), view


def describe(view: PlacementView, name: str) -> str:
    split = view.current if name == "current" else view.proposed
    assert split is not None
    stages = ", ".join(
        f"{s.device_id} [{s.layer_start}, {s.layer_end}) {s.predicted_seconds * 1e3:.1f} ms"
        for s in split.stages
    )
    return f"{stages}; predicted step {split.predicted_step_seconds * 1e3:.1f} ms"


async def main(args: argparse.Namespace) -> None:
    model_dir = resolve_model_dir(ModelConfig(), progress=True)
    layers = read_model_info(model_dir).num_layers
    skewed = [(0, args.layers), (args.layers, layers)]
    print(
        f"model {model_dir.name}: {args.concurrency} requests x {args.max_tokens} tokens, "
        f"{args.rounds} rounds, medians\n"
    )
    before, view = await measure(model_dir, skewed, args)
    print(f"skewed    {before:7.1f} tok/s   {describe(view, 'current')}")
    assert view.proposed is not None and view.predicted_gain_ratio is not None
    proposed = [(s.layer_start, s.layer_end) for s in view.proposed.stages]
    print(f"proposal  {describe(view, 'proposed')}")
    after, after_view = await measure(model_dir, proposed, args)
    print(f"proposed  {after:7.1f} tok/s   {describe(after_view, 'current')}")
    print(
        f"\npredicted gain {view.predicted_gain_ratio:+.1%}   "
        f"measured tokens/s ratio {after / before:.2f}x"
    )


def parse_args(layers: int = 20, description: str = __doc__) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    parser.add_argument("--layers", type=int, default=layers, help="layers of worker-0 (skewed)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
