"""What one process generates with the whole model: the reference a pipeline must equal."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from mlx_relay.model.generate import generate_tokens
from mlx_relay.model.load import load_model
from mlx_relay.model.sampling import SampledToken, SamplingParams
from mlx_relay.model.tokenizer import eos_token_ids, load_tokenizer


@cache
def cached_model(model_dir: Path, compute: str = "auto") -> Any:
    """The whole model of ``model_dir``, loaded once per test session, computing with the
    weights a worker picks by default (``model.compute: auto``)."""
    return load_model(model_dir, compute=compute)


@cache
def cached_tokenizer(model_dir: Path) -> Any:
    """The tokenizer of ``model_dir``, loaded once per test session."""
    return load_tokenizer(model_dir)


def reference_tokens(
    model_dir: Path,
    ids: list[int],
    max_tokens: int,
    params: SamplingParams = SamplingParams(),
    compute: str = "auto",
) -> list[SampledToken]:
    """Single-process tokens, without the eos token (the pipeline does not output it)."""
    eos = eos_token_ids(cached_tokenizer(model_dir))
    model = cached_model(model_dir, compute)
    tokens = list(generate_tokens(model, ids, max_tokens, params, eos))
    if tokens and tokens[-1].token_id in eos:
        tokens.pop()
    return tokens
