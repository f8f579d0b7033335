"""What the BLAS router's own kernels buy over OpenBLAS's sgemm, in one process.

    .venv/bin/python bench/router_paths.py                 # 3 alternating rounds
    .venv/bin/python bench/router_paths.py --rounds 5

One process holds the whole bundled model (float32, compiled decode step, 2 BLAS threads),
as ``bench/engine.py`` runs it. Three ways take turns in each round:

  router        the default: every product with the weights in the router's kernel (decode
                steps and prompts), attention's products in its small kernels
  small off     attention's products to OpenBLAS's sgemm (a decode step's attention is one
                product per head for the scores and one for the values, each a query row
                against the positions in use: 540 products a step at batch 1, 8,640 at 16)
  prompts off   prompts' products with the weights (more than 16 rows) to OpenBLAS's sgemm
Both off is how the router worked before. Figures (medians over rounds, ms): one decode step
at batch 1 and 16 with 16-token prompts, at batch 16 with 200-token prompts, and a prefill
of 128 and of 1,000 tokens; then each way's ratio to the router's (above 1: slower).
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

from mlx_relay.core.blas_route import KERNEL_ROWS, set_route_rows, set_route_small  # noqa: E402
from mlx_relay.core.config import ModelConfig  # noqa: E402
from mlx_relay.core.types import LayerRange  # noqa: E402
from mlx_relay.model.load import load_model, resolve_model_dir  # noqa: E402
from mlx_relay.model.shard import Shard  # noqa: E402

# Rows of a product with the weights that went to the kernel before prompts did (decode
# batches of up to 16).
DECODE_ROWS = 16


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
    ways = {
        "router": (True, KERNEL_ROWS),
        "small off": (False, KERNEL_ROWS),
        "prompts off": (True, DECODE_ROWS),
        "both off": (False, DECODE_ROWS),
    }
    measured: dict[tuple[str, str], list[float]] = {}
    for round_ in range(args.rounds):
        order = list(ways) if round_ % 2 == 0 else list(reversed(ways))
        for way in order:
            small, rows = ways[way]
            set_route_small(router, small)
            set_route_rows(router, rows)
            for name, measure in cases.items():
                measured.setdefault((name, way), []).append(measure())
        print(f"round {round_ + 1} of {args.rounds} done", flush=True)
    set_route_small(router, True)
    set_route_rows(router, KERNEL_ROWS)
    header = "".join(f"{way:>15s}" for way in ways)
    print(f"\n{'(ms, medians; ratio to the router)':42s}{header}")
    for name in cases:
        base = statistics.median(measured[(name, "router")])
        cells = [f"{base:15.1f}"]
        for way in list(ways)[1:]:
            value = statistics.median(measured[(name, way)])
            cells.append(f"{value:8.1f} {value / base:5.2f}x")
        print(f"{name:42s}" + "".join(cells))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    main(parser.parse_args())
