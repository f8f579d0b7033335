"""This engine on the CPU backend vs llama.cpp, one process, the bundled model's GGUF.

    make bench-engine                       # builds llama-cpp-python once, then runs this
    .venv/bin/python bench/engine.py                      # 3 alternating rounds
    .venv/bin/python bench/engine.py --rounds 5 --threads 2

Paths measured, round by round in turn (medians over the rounds):
  llama.cpp   llama-cpp-python on the same Q4_1 GGUF, ``--threads`` threads
  quantized   this engine with the stored (quantized) weights
  float32     this engine with dense float32 weights and the system OpenBLAS
              (``float32 eager``: the same without the compiled decode step)
and first, in a child process that loads no BLAS, ``quantized, wheel BLAS``: the quantized
path as it ran before the system BLAS was loaded (the reference for decode speed-ups).

Figures: prefill tok/s of a 128-token prompt; decode tok/s at batch 1 (one token per step,
each step's logits evaluated); this engine's aggregate decode tok/s at batch 4, 8 and 16
(B rows through one shard with a batch KV cache, same-length prompts). Each figure is
printed with its ratio to llama.cpp's (decode batch 1 for the aggregates).
"""

from __future__ import annotations

import sys

from mlx_relay.core.blas import load_blas, set_threads
from mlx_relay.core.hugepages import reexec_with_hugepages

WHEEL_BLAS = "--wheel-blas"
reexec_with_hugepages()  # weights in huge pages, as in the workers (every path alike)
if WHEEL_BLAS not in sys.argv:
    load_blas()  # before MLX is imported below

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import mlx.core as mx  # noqa: E402

from mlx_relay.core.config import ModelConfig  # noqa: E402
from mlx_relay.core.types import LayerRange  # noqa: E402
from mlx_relay.model.backend import blas_in_use  # noqa: E402
from mlx_relay.model.load import bundled_gguf_path, load_model, resolve_model_dir  # noqa: E402
from mlx_relay.model.shard import Shard  # noqa: E402

PROMPT_TOKENS = 128
BATCHES = (4, 8, 16)


def prompt_ids(vocab: int, length: int, row: int = 0) -> list[int]:
    """A fixed, ordinary-token prompt (no special tokens), different per row."""
    return [1000 + (37 * i + 101 * row) % (vocab - 2000) for i in range(length)]


class Engine:
    """One shard over the whole model, run the way a worker runs it."""

    def __init__(self, model_dir: Path, compute: str, compiled: bool = True) -> None:
        model = load_model(model_dir, compute=compute)
        self.shard = Shard(model, LayerRange(0, len(model.model.layers)), compiled=compiled)
        self.shard.warm_up()

    def prefill(self, ids: list[int]) -> float:
        cache = self.shard.make_cache()
        started = time.perf_counter()
        mx.eval(self.shard(mx.array([ids]), cache, last_position_only=True))
        return len(ids) / (time.perf_counter() - started)

    def decode(self, batch: int, steps: int, context: int = 16) -> float:
        """Aggregate tokens/s of ``steps`` decode steps over ``batch`` rows."""
        vocab = self.shard.vocab_size
        rows = [prompt_ids(vocab, context, r) for r in range(batch)]
        cache = self.shard.make_cache()
        mx.eval(self.shard(mx.array(rows), cache, last_position_only=True))
        started = time.perf_counter()
        for step in range(steps):
            tokens = mx.array([[prompt_ids(vocab, 1, r + step)[0]] for r in range(batch)])
            mx.eval(self.shard(tokens, cache, last_position_only=True))
        return batch * steps / (time.perf_counter() - started)


class LlamaCpp:
    """llama.cpp on the bundled GGUF through llama-cpp-python."""

    def __init__(self, threads: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=str(bundled_gguf_path()),
            n_ctx=1024,
            n_batch=PROMPT_TOKENS,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        self.vocab = self.llm.n_vocab()

    def prefill(self, ids: list[int]) -> float:
        self.llm.reset()
        started = time.perf_counter()
        self.llm.eval(ids)
        return len(ids) / (time.perf_counter() - started)

    def decode(self, batch: int, steps: int, context: int = 16) -> float:
        assert batch == 1, "llama-cpp-python decodes one sequence"
        self.llm.reset()
        self.llm.eval(prompt_ids(self.vocab, context))
        started = time.perf_counter()
        for step in range(steps):
            self.llm.eval([prompt_ids(self.vocab, 1, step)[0]])
        return steps / (time.perf_counter() - started)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def wheel_blas_figures(args: argparse.Namespace) -> dict[str, list[float]]:
    """The quantized path without the system BLAS, measured in a child process."""
    command = [sys.executable, __file__, WHEEL_BLAS, "--rounds", str(args.rounds)]
    command += ["--quantized-steps", str(args.quantized_steps)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return dict(json.loads(output.strip().splitlines()[-1]))


def wheel_blas_child(args: argparse.Namespace) -> None:
    engine = Engine(resolve_model_dir(ModelConfig(), progress=False), "quantized")
    ids = prompt_ids(engine.shard.vocab_size, PROMPT_TOKENS)
    figures: dict[str, list[float]] = {"prefill": [], "decode b=1": []}
    for _ in range(args.rounds):
        figures["prefill"].append(engine.prefill(ids))
        figures["decode b=1"].append(engine.decode(1, args.quantized_steps))
    print(json.dumps(figures))


def main(args: argparse.Namespace) -> None:
    if args.wheel_blas:
        wheel_blas_child(args)
        return
    wheel = wheel_blas_figures(args)
    library = set_threads(args.threads)
    model_dir = resolve_model_dir(ModelConfig(), progress=True)
    engines: dict[str, Any] = {"llama.cpp": LlamaCpp(args.threads)}
    engines["quantized"] = Engine(model_dir, "quantized")
    engines["float32"] = Engine(model_dir, "float32")
    engines["float32 eager"] = Engine(model_dir, "float32", compiled=False)
    print(
        f"model {model_dir.name}; {args.threads} threads; BLAS {blas_in_use(library)} "
        f"({library.path}); {args.rounds} alternating rounds; figures are medians"
    )

    ids = prompt_ids(engines["float32"].shard.vocab_size, PROMPT_TOKENS)
    steps = {"quantized": args.quantized_steps}
    runs: list[tuple[str, str, Callable[[], float]]] = []
    for name, engine in engines.items():
        if name != "float32 eager":
            runs.append((name, "prefill", lambda e=engine: e.prefill(ids)))
        n = steps.get(name, args.steps)
        runs.append((name, "decode b=1", lambda e=engine, n=n: e.decode(1, n)))
    for batch in BATCHES:
        for name in ("quantized", "float32"):
            n = steps.get(name, args.steps)
            runs.append(
                (name, f"decode b={batch}", lambda e=engines[name], b=batch, n=n: e.decode(b, n))
            )

    results: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.warmup):
        for _, _, run in runs:
            run()
    for round_ in range(args.rounds):
        started = time.perf_counter()
        for name, figure, run in runs:
            results.setdefault((name, figure), []).append(run())
        print(f"round {round_ + 1} done in {time.perf_counter() - started:.0f} s", flush=True)

    for figure, values in wheel.items():
        results[("quantized, wheel BLAS", figure)] = values
    reference = {
        "prefill": median(results[("llama.cpp", "prefill")]),
        "decode": median(results[("llama.cpp", "decode b=1")]),
    }
    print(f"\n{'path':22s} {'figure':12s} {'tok/s':>9s} {'x llama.cpp':>12s}   (min - max)")
    for (name, figure), values in results.items():
        value = median(values)
        base = reference["prefill" if figure == "prefill" else "decode"]
        print(
            f"{name:22s} {figure:12s} {value:9.1f} {value / base:11.2f}x   "
            f"({min(values):.1f} - {max(values):.1f})"
        )
    dense = median(results[("float32", "decode b=1")])
    for name in ("quantized", "quantized, wheel BLAS"):
        base = median(results[(name, "decode b=1")])
        print(f"float32 / {name} decode b=1: {dense / base:.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=0, help="unmeasured rounds first")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp and BLAS threads")
    parser.add_argument("--steps", type=int, default=24, help="decode steps per figure")
    parser.add_argument(
        "--quantized-steps", type=int, default=4, help="decode steps of the slow quantized path"
    )
    parser.add_argument(WHEEL_BLAS, action="store_true", help=argparse.SUPPRESS)
    main(parser.parse_args())
