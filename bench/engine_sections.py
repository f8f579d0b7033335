"""Where a float32 decode step's time goes, one process, the bundled model (a few minutes).

    .venv/bin/python bench/engine_sections.py                 # 5 alternating rounds
    .venv/bin/python bench/engine_sections.py --batches 1 16 --threads 1 2

For each batch size and BLAS thread count, round by round in turn (medians over the rounds):
  step            one compiled decode step of the whole model (16 positions in the cache)
  30 MLPs, one    the first layer's MLP 30 times: its 14 MB of weights stay in the caches
  30 MLPs, all    each layer's MLP once: 319 MB of distinct weights, read from memory
  head            final norm and the tied output head (113 MB of weights)
  attention x30   30 attention calls over the 64-position window a step uses, and over a
                  whole 256-position KV buffer (what a step attended over before windows)

"all" minus "one" is what streaming the weights from memory costs; at batch 1 the step is
about the time to read its 0.54 GB of weights once.
"""

from __future__ import annotations

from mlx_relay.core.blas import load_blas, set_threads
from mlx_relay.core.hugepages import reexec_with_hugepages

reexec_with_hugepages()  # weights in huge pages, as in the workers
load_blas()  # before MLX is imported below

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import mlx.core as mx  # noqa: E402

from mlx_relay.core.config import ModelConfig  # noqa: E402
from mlx_relay.core.types import LayerRange  # noqa: E402
from mlx_relay.model.load import load_model, resolve_model_dir  # noqa: E402
from mlx_relay.model.shard import ATTENTION_WINDOW_STEP, Shard  # noqa: E402

CONTEXT = 16


def timed(run: Callable[[], list[mx.array]]) -> float:
    """Milliseconds to build and evaluate ``run``'s arrays one after another."""
    started = time.perf_counter()
    for out in run():
        mx.eval(out)
    return (time.perf_counter() - started) * 1000


def sections(shard: Shard, batch: int) -> dict[str, Callable[[], list[mx.array]]]:
    layers: list[Any] = shard._layers
    attention = layers[0].self_attn
    heads, kv_heads, dim = attention.n_heads, attention.n_kv_heads, attention.head_dim
    cache = shard.make_cache()
    prompt = [[1000 + 37 * i + 101 * r for i in range(CONTEXT)] for r in range(batch)]
    mx.eval(shard(mx.array(prompt), cache, last_position_only=True))
    token = mx.array([[1234]] * batch)
    h = mx.random.normal((batch, 1, shard.hidden_size))
    q = mx.random.normal((batch, heads, 1, dim))
    kv = mx.random.normal((2, batch, kv_heads, 256, dim))
    mx.eval(h, q, kv)

    def attend(width: int) -> list[mx.array]:
        mask = (mx.arange(width) <= CONTEXT).reshape(1, 1, 1, width)
        k, v = kv[0, ..., :width, :], kv[1, ..., :width, :]
        sdpa = mx.fast.scaled_dot_product_attention
        return [sdpa(q, k, v, scale=dim**-0.5, mask=mask) for _ in layers]

    return {
        "step": lambda: [shard(token, cache, last_position_only=True)],
        "30 MLPs, one": lambda: [layers[0].mlp(h) for _ in layers],
        "30 MLPs, all": lambda: [layer.mlp(h) for layer in layers],
        "head": lambda: [shard._head(shard._norm(h))],
        f"attention x30, {ATTENTION_WINDOW_STEP}": lambda: attend(ATTENTION_WINDOW_STEP),
        "attention x30, 256": lambda: attend(256),
    }


def main(args: argparse.Namespace) -> None:
    model = load_model(resolve_model_dir(ModelConfig(), progress=True), compute="float32")
    shard = Shard(model, LayerRange(0, len(model.model.layers)))
    shard.warm_up()
    runs = {batch: sections(shard, batch) for batch in args.batches}
    results: dict[tuple[int, int, str], list[float]] = {}
    for _ in range(args.rounds):
        for threads in args.threads:
            set_threads(threads)
            for batch, parts in runs.items():
                for name, run in parts.items():
                    results.setdefault((batch, threads, name), []).append(timed(run))
    print(f"{args.rounds} alternating rounds, medians in ms (min - max)")
    for (batch, threads, name), values in sorted(results.items()):
        print(
            f"b={batch:<3d} threads {threads}  {name:24s} {statistics.median(values):8.1f}"
            f"   ({min(values):.1f} - {max(values):.1f})"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    main(parser.parse_args())
