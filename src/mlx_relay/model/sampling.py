"""Choosing the next token from one position's logits.

Seeded sampling is reproducible across processes: the random key depends only on the seed
and the step, so the stage that samples may live in any process and still give the same
token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_relay.core.errors import InvalidRequest

# The bits of an unsigned 64-bit integer: seeds are uint64 on the wire and in SplitMix64.
MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens.

    Attributes:
        temperature: 0 picks the most likely token; higher values flatten the distribution.
        top_p: Keep the smallest set of tokens whose probability reaches ``top_p`` (1 = all).
        top_k: Keep only the ``top_k`` most likely tokens (0 = all).
        seed: Makes sampling reproducible; ``None`` draws fresh randomness.
        top_logprobs: How many of the most likely tokens to report with their log-probs.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InvalidRequest(
                f"temperature must be >= 0, got {self.temperature}", param="temperature"
            )
        if not (0 < self.top_p <= 1):
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0, got {self.top_k}", param="top_k")
        if self.top_logprobs < 0:
            raise InvalidRequest(
                f"top_logprobs must be >= 0, got {self.top_logprobs}", param="top_logprobs"
            )


@dataclass(frozen=True)
class SampledToken:
    """A chosen token with its log-probability and, if asked, the most likely alternatives.

    Log-probabilities are those of the model's distribution (before temperature and
    filtering).
    """

    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


def sample(logits: mx.array, params: SamplingParams, step: int) -> SampledToken:
    """Pick the next token.

    Args:
        logits: ``(V,)`` logits for one position.
        params: The sampling parameters.
        step: The index of the token being generated (0 for the first); with a seed, the
            same ``(seed, step)`` always gives the same draw.

    Returns:
        The chosen token.
    """
    logprobs = log_softmax(logits.reshape(-1))
    if params.temperature == 0:
        token = mx.argmax(logprobs)
    else:
        scaled = _filter(logprobs / params.temperature, params.top_k, params.top_p)
        key = step_key(params.seed, step) if params.seed is not None else None
        token = mx.random.categorical(scaled, key=key)
    outputs = [token, logprobs[token]]
    top_n = min(params.top_logprobs, logprobs.shape[0])
    if top_n:
        top_ids = mx.argpartition(-logprobs, kth=top_n - 1)[:top_n]
        top_ids = top_ids[mx.argsort(-logprobs[top_ids])]
        outputs += [top_ids, logprobs[top_ids]]
    mx.eval(outputs)
    values: list[Any] = [o.tolist() for o in outputs]
    top = list(zip(values[2], values[3], strict=True)) if top_n else []
    return SampledToken(int(values[0]), float(values[1]), top)


def greedy_rows(logits: mx.array) -> list[SampledToken]:
    """The most likely token of each row of ``(B, V)`` logits, in one evaluation: what
    :func:`sample` picks with ``temperature=0`` and no ``top_logprobs``, row by row."""
    if mx.default_device() == mx.cpu:
        ids, values = _greedy_rows_numpy(np.asarray(logits.astype(mx.float32)))
        return [SampledToken(t, lp) for t, lp in zip(ids, values, strict=True)]
    logprobs = log_softmax(logits)
    tokens = mx.argmax(logprobs, axis=-1)
    chosen = mx.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    mx.eval(tokens, chosen)
    ids = tokens.tolist()  # type: ignore[assignment]
    values = chosen.tolist()  # type: ignore[assignment]
    return [SampledToken(t, lp) for t, lp in zip(ids, values, strict=True)]


def _greedy_rows_numpy(x: np.ndarray) -> tuple[list[int], list[float]]:
    """:func:`greedy_rows` on the CPU backend: :func:`log_softmax`'s arithmetic, in one
    scratch buffer, and the first maximum of each row's log-probabilities, as
    ``mx.argmax`` picks it (16 rows of a 49,152-token vocabulary: 1.7 ms against 4.3 ms
    through MLX's ``argmax`` and copies)."""
    top = x.max(axis=-1, keepdims=True)
    work = np.subtract(x, top)
    np.exp(work, out=work)
    total = np.log(work.sum(axis=-1, keepdims=True, dtype=np.float32))
    np.subtract(x, top + total, out=work)
    tokens = work.argmax(axis=-1)
    chosen = work[np.arange(len(work)), tokens]
    return tokens.tolist(), chosen.tolist()


def log_softmax(logits: mx.array) -> mx.array:
    """Log-probabilities along the last axis, in float32, the same bits for a row alone or
    among others (every sampling path uses this).

    On the CPU backend through numpy, whose vectorized ``exp`` is about 30x MLX's there
    (16 rows of a 49,152-token vocabulary: 0.3 ms against 9.2 ms, a tenth of a batched
    decode step); elsewhere MLX's own.
    """
    logits = logits.astype(mx.float32)
    if mx.default_device() != mx.cpu:
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    x = np.asarray(logits)
    top = x.max(axis=-1, keepdims=True)
    total = np.log(np.exp(x - top).sum(axis=-1, keepdims=True, dtype=np.float32))
    return mx.array(x - (top + total))


def step_key(seed: int, step: int) -> mx.array:
    """The random key for one step of a seeded generation.

    The seed and step are mixed with SplitMix64 so that nearby (seed, step) pairs give
    unrelated keys.
    """
    return mx.random.key(_splitmix64(_splitmix64(seed & MASK64) ^ (step & MASK64)))


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def _filter(scores: mx.array, top_k: int, top_p: float) -> mx.array:
    vocab = scores.shape[0]
    if 0 < top_k < vocab:
        dropped = mx.argpartition(-scores, kth=top_k - 1)[top_k:]
        scores = mx.put_along_axis(scores, dropped, mx.array(-mx.inf, scores.dtype), axis=0)
    if top_p < 1:
        order = mx.argsort(-scores)
        probs = mx.softmax(scores[order])
        # Keep a token while the mass of the more likely ones is below top_p: this always
        # keeps the most likely token.
        keep_sorted = (mx.cumsum(probs) - probs) < top_p
        keep = mx.put_along_axis(mx.zeros(vocab, dtype=mx.bool_), order, keep_sorted, axis=0)
        scores = mx.where(keep, scores, -mx.inf)
    return scores
