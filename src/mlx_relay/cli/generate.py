"""``mlx-relay generate``: run a prompt through the whole model in this process."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from mlx_relay.cli.options import add_compute_arguments
from mlx_relay.core.blas import default_threads, set_threads
from mlx_relay.core.config import ModelConfig
from mlx_relay.core.errors import ConfigError
from mlx_relay.model.generate import generate_tokens
from mlx_relay.model.load import load_model, resolve_model_dir
from mlx_relay.model.sampling import SamplingParams
from mlx_relay.model.tokenizer import TextDecoder, encode_prompt, eos_token_ids, load_tokenizer


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "generate",
        help="generate text from a prompt in one process (no cluster)",
        description="Generate text from a prompt with the whole model in this process, "
        "streaming it to stdout, then print prompt and generation speed.",
    )
    parser.add_argument("prompt", help="the prompt text")
    parser.add_argument(
        "--model",
        metavar="PATH",
        help="MLX model directory or .gguf file (default: the bundled SmolLM2-135M-Instruct)",
    )
    parser.add_argument("--cache-dir", metavar="DIR", help="where imported GGUF models live")
    parser.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    parser.add_argument("--top-k", type=int, default=0, help="0 = no top-k filtering")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    parser.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="wrap the prompt in the model's chat template (default: on)",
    )
    add_compute_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed
    )
    if args.blas_threads is not None and args.blas_threads < 1:
        raise ConfigError(f"--blas-threads: expected at least 1, got {args.blas_threads}")
    config = ModelConfig(path=args.model, cache_dir=args.cache_dir, compute=args.compute or "auto")
    set_threads(args.blas_threads or default_threads(1))
    model_dir = resolve_model_dir(config)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, compute=config.compute)
    prompt_ids = encode_prompt(tokenizer, args.prompt, chat=args.chat)
    eos = eos_token_ids(tokenizer)

    out = sys.stdout
    detokenizer = TextDecoder(tokenizer, prompt_ids)
    generated = 0
    start = time.perf_counter()
    first = end = start
    for token in generate_tokens(model, prompt_ids, max(args.max_tokens, 0), params, eos):
        end = time.perf_counter()
        if generated == 0:
            first = end
        generated += 1
        if token.token_id in eos:
            break
        detokenizer.add_token(token.token_id)
        out.write(detokenizer.last_segment)
        out.flush()
    detokenizer.finalize()
    out.write(detokenizer.last_segment + "\n")
    # The first token's time covers the prompt; the rest are decode steps.
    prompt_tps = len(prompt_ids) / (first - start) if generated else 0.0
    gen_tps = (generated - 1) / (end - first) if generated > 1 and end > first else 0.0
    out.write(
        f"prompt: {len(prompt_ids)} tokens, {prompt_tps:.1f} tok/s | "
        f"generation: {generated} tokens, {gen_tps:.1f} tok/s\n"
    )
    out.flush()
    return 0
