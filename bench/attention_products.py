"""What the BLAS router's small products buy: attention's products in the router vs OpenBLAS.

    .venv/bin/python bench/attention_products.py                 # 3 alternating rounds
    .venv/bin/python bench/attention_products.py --rounds 5

One process holds the whole bundled model (float32, compiled decode step, 2 BLAS threads),
as ``bench/engine.py`` runs it. A decode step's attention is one product per head for the
scores and one for the values, each a query row against the positions in use: 540 products
a step at batch 1, 8,640 at batch 16. The router computes them itself (``small on``, the
default) or sends them to OpenBLAS's ``sgemm`` (``small off``, as before); the two ways take
turns in each round, in this one process. Figures (medians over rounds, ms): one decode step
at batch 1 and 16 with 16-token prompts, at batch 16 with 200-token prompts, and a prefill
of 128 and of 1,000 tokens; then the on/off ratio (below 1: the router's is faster).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from mlx_relay.core.blas import load_blas, loaded_router, set_threads
from mlx_relay.core.hugepages import reexec_with_hugepages

reexec_with_hugepages()  # weights in huge pages, as in the workers
load_blas()  # before MLX is imported, as the worker does

import mlx.core as mx  # noqa: E402

from mlx_relay.core.blas_route import set_route_small  # noqa: E402
from mlx_relay.core.config import ModelConfig  # noqa: E402
from mlx_relay.core.types import LayerRange  # noqa: E402
from mlx_relay.model.load import load_model, resolve_model_dir  # noqa: E402
from mlx_relay.model.shard import Shard  # noqa: E402


def prompt_ids(vocab: int, length: int, row: int = 0) -> list[int]:
    """A fixed, ordinary-token prompt (no special tokens), different per row."""
    return [1000 + (37 * i + 101 * row) % (vocab - 2000) for i in range(length)]


class Figures:
    def __init__(self, shard: Shard) -> None:
        self.shard = shard
        self.vocab = shard.vocab_size

    def decode_step_ms(self, batch: int, context: int, steps: int = 12) -> float:
        """The median decode step of ``batch`` rows after ``context``-token prompts."""
        rows = [prompt_ids(self.vocab, context, r) for r in range(batch)]
        cache = self.shard.make_cache()
        mx.eval(self.shard(mx.array(rows), cache, last_position_only=True))
        times = []
        for step in range(steps):
            tokens = mx.array([[prompt_ids(self.vocab, 1, r + step)[0]] for r in range(batch)])
            started = time.perf_counter()
            mx.eval(self.shard(tokens, cache, last_position_only=True))
            times.append(time.perf_counter() - started)
        return statistics.median(times[2:]) * 1e3  # the first steps trace the graph

    def prefill_ms(self, length: int) -> float:
        cache = self.shard.make_cache()
        ids = mx.array([prompt_ids(self.vocab, length)])
        started = time.perf_counter()
        mx.eval(self.shard(ids, cache, last_position_only=True))
        return (time.perf_counter() - started) * 1e3


def main(args: argparse.Namespace) -> None:
    set_threads(args.threads)
    router = loaded_router()
    if router is None:
        raise SystemExit("no BLAS router here (needs libopenblas0-pthread and a C compiler)")
    model = load_model(resolve_model_dir(ModelConfig()), compute="float32")
    shard = Shard(model, LayerRange(0, len(model.model.layers)), compiled=True)
    shard.warm_up()
    figures = Figures(shard)
    cases: dict[str, Callable[[], float]] = {
        "decode step, batch 1": lambda: figures.decode_step_ms(1, 16),
        "decode step, batch 16": lambda: figures.decode_step_ms(16, 16),
        "decode step, batch 16, 200-token prompts": lambda: figures.decode_step_ms(16, 200, 8),
        "prefill, 128 tokens": lambda: figures.prefill_ms(128),
        "prefill, 1,000 tokens": lambda: figures.prefill_ms(1000),
    }
    measured: dict[tuple[str, bool], list[float]] = {}
    for round_ in range(args.rounds):
        order = (True, False) if round_ % 2 == 0 else (False, True)
        for small in order:
            set_route_small(router, small)
            for name, measure in cases.items():
                measured.setdefault((name, small), []).append(measure())
        print(f"round {round_ + 1} of {args.rounds} done", flush=True)
    set_route_small(router, True)
    print(f"\n{'':44s} {'small on':>9s} {'small off':>10s} {'on/off':>7s}   (ms, medians)")
    for name in cases:
        on = statistics.median(measured[(name, True)])
        off = statistics.median(measured[(name, False)])
        print(f"{name:44s} {on:9.1f} {off:10.1f} {on / off:7.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    main(parser.parse_args())
