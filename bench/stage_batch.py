"""What batching buys on one stage: decode steps of B requests in one Forward vs one by one.

    .venv/bin/python bench/stage_batch.py                       # bundled model, B = 1 4 8 16
    .venv/bin/python bench/stage_batch.py --batch 1 2 4 8 16 32 --steps 16 --rounds 5

One stage holds the whole bundled model (it embeds, runs every layer and samples, greedy),
driven in-process through ``StageRuntime.forward`` as the worker's MLX thread does, without
gRPC. For each batch size B: B requests with prompts of different lengths are prefilled,
then ``--steps`` decode steps run either as one Forward carrying all B entries (batched) or
as B Forwards of one entry each (one by one, what a stage did before batching). Reported:
aggregate decode tokens/s (medians over rounds), the batched/one-by-one ratio, and the
ratio to B = 1. Every round checks that both ways give the same tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time

from mlx_relay.core.blas import load_blas
from mlx_relay.core.hugepages import reexec_with_hugepages

reexec_with_hugepages()  # weights in huge pages, as in the workers
load_blas()  # before MLX is imported, as the worker does

from mlx_relay import wire  # noqa: E402
from mlx_relay.core.config import ModelConfig  # noqa: E402
from mlx_relay.core.types import LayerRange  # noqa: E402
from mlx_relay.model.load import read_model_info, resolve_model_dir  # noqa: E402
from mlx_relay.model.shard import Shard  # noqa: E402
from mlx_relay.proto import relay_pb2 as pb  # noqa: E402
from mlx_relay.worker.stage import StageLimits, StageRuntime  # noqa: E402

LIMITS = StageLimits(max_prompt_tokens=4096, max_sessions=1024, session_ttl_seconds=3600.0)


def entry(request_id: str, position: int, token_ids: list[int], step: int) -> pb.ForwardEntry:
    return pb.ForwardEntry(
        request_id=request_id,
        position=position,
        tensor=wire.encode_token_ids(token_ids),
        sampling=pb.SamplingParams(),
        step=step,
    )


def run_round(
    stage: StageRuntime, batch: int, steps: int, batched: bool, tag: str
) -> tuple[float, list[list[int]]]:
    """Aggregate decode tokens/s of ``batch`` requests, and each request's tokens."""
    ids = [f"{tag}-{i}" for i in range(batch)]
    prompts = [[1 + (7 * i + j) % 200 for j in range(8 + 3 * i)] for i in range(batch)]
    for rid, prompt in zip(ids, prompts, strict=True):
        stage.forward(stage.check(pb.ForwardRequest(entries=[entry(rid, 0, prompt[:-1], 0)])))
    positions = [len(p) - 1 for p in prompts]
    tokens = [p[-1] for p in prompts]
    out: list[list[int]] = [[] for _ in ids]
    started = time.perf_counter()
    for step in range(steps):
        entries = [entry(rid, positions[i], [tokens[i]], step) for i, rid in enumerate(ids)]
        calls = [entries] if batched else [[e] for e in entries]
        results = []
        for call in calls:
            results += stage.forward(stage.check(pb.ForwardRequest(entries=call))).results
        for i, result in enumerate(results):
            positions[i] += 1
            tokens[i] = result.token_id
            out[i].append(result.token_id)
    seconds = time.perf_counter() - started
    for rid in ids:
        stage.sessions.end(rid)
    stage.release_ended()
    return batch * steps / seconds, out


def main(args: argparse.Namespace) -> None:
    model_dir = resolve_model_dir(ModelConfig(), progress=True)
    layers = read_model_info(model_dir, model_dir.name).num_layers
    shard = Shard.load(model_dir, LayerRange(0, layers), args.compute)
    stage = StageRuntime(shard, LIMITS)
    print(
        f"model {model_dir.name}: one stage, all {shard.num_layers} layers, "
        f"{shard.compute} weights, greedy"
    )
    print(f"{args.steps} decode steps per round, {args.rounds} rounds, medians\n")
    run_round(stage, 2, 2, True, "warm")
    run_round(stage, 2, 2, False, "warm-one")
    print(" B  one-by-one tok/s  batched tok/s  batched/one-by-one  batched vs B=1")
    base: float | None = None
    for batch in args.batch:
        single: list[float] = []
        together: list[float] = []
        for r in range(args.rounds):
            rate, expected = run_round(stage, batch, args.steps, False, f"s{batch}-{r}")
            single.append(rate)
            rate, got = run_round(stage, batch, args.steps, True, f"b{batch}-{r}")
            together.append(rate)
            assert got == expected, f"B={batch} round {r}: batched tokens differ"
        s, b = statistics.median(single), statistics.median(together)
        base = base or b
        print(f"{batch:2d}  {s:16.1f}  {b:13.1f}  {b / s:18.2f}  {b / base:14.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--compute", default="auto", help="model.compute: auto, quantized, float32")
    main(parser.parse_args())
