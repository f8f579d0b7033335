"""The compiled decode step's attention: MLX's bits with the softmax written out, and only
where it is asked for."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest

from mlx_relay.core.types import LayerRange
from mlx_relay.model import attention as attention_module
from mlx_relay.model.attention import UNFUSED_SCORES, attention, decode_attention
from mlx_relay.model.batch import empty_batch_caches
from mlx_relay.model.shard import Shard
from tests.support.tiny_model import VARIANTS, make_tiny_model_dir

MLX_ATTENTION = attention_module._MLX_ATTENTION


def _inputs(
    batch: int, heads: int, kv_heads: int, width: int, seed: int
) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    key = mx.random.key(seed)
    parts = mx.random.split(key, 3)
    q = 3 * mx.random.normal((batch, heads, 1, 64), key=parts[0])
    k = 3 * mx.random.normal((batch, kv_heads, width, 64), key=parts[1])
    v = mx.random.normal((batch, kv_heads, width, 64), key=parts[2])
    # Each row its own left padding and unused tail, as a decode batch masks them.
    positions = mx.arange(width)
    pads = mx.arange(batch) % 7
    used = width - 1 - (mx.arange(batch) % 5)
    mask = (positions >= pads[:, None]) & (positions <= used[:, None])
    return q, k, v, mask.reshape(batch, 1, 1, width)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize(
    "batch,heads,kv_heads,width",
    [(1, 9, 3, 64), (16, 9, 3, 64), (5, 4, 4, 192), (16, 8, 2, 320), (3, 4, 1, 1024)],
)
def test_the_written_out_softmax_gives_mlx_attention_bit_for_bit(
    batch: int, heads: int, kv_heads: int, width: int, compiled: bool
) -> None:
    q, k, v, mask = _inputs(batch, heads, kv_heads, width, seed=batch * width)
    scale = 64**-0.5

    def mine(*a: mx.array) -> mx.array:
        return attention(*a[:3], scale, a[3])

    def theirs(*a: mx.array) -> mx.array:
        return MLX_ATTENTION(*a[:3], scale=scale, mask=a[3])

    run_mine, run_theirs = (mx.compile(mine), mx.compile(theirs)) if compiled else (mine, theirs)
    got, expected = run_mine(q, k, v, mask), run_theirs(q, k, v, mask)
    assert got.shape == expected.shape == (batch, heads, 1, 64)
    assert mx.array_equal(got, expected).item()
    # Without a mask too.
    assert mx.array_equal(
        attention(q, k, v, scale), MLX_ATTENTION(q, k, v, scale=scale, mask=None)
    ).item()


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    seen: list[tuple[int, ...]] = []
    real = attention_module.attention

    def counted(q: mx.array, *rest: Any, **named: Any) -> mx.array:
        seen.append(tuple(q.shape))
        return real(q, *rest, **named)

    monkeypatch.setattr(attention_module, "attention", counted)
    return seen


def test_only_this_threads_large_enough_decode_attention_is_written_out(
    calls: list[tuple[int, ...]],
) -> None:
    big = _inputs(16, 9, 3, 64, seed=1)  # 9,216 scores a layer
    small = _inputs(1, 9, 3, 64, seed=2)  # 576
    assert 16 * 9 * 64 >= UNFUSED_SCORES > 9 * 64
    scale = 0.125

    def sdpa(q: mx.array, k: mx.array, v: mx.array, mask: Any, **extra: Any) -> mx.array:
        # How mlx-lm's attention calls it.
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, **extra)

    sdpa(*big)
    assert calls == [], "outside the block MLX's attention computes"
    with decode_attention():
        out = sdpa(*big)
        sdpa(*small)
        prompt_q = mx.random.normal((16, 9, 4, 64))
        sdpa(prompt_q, *big[1:3], "causal")
        sdpa(*big[:3], mx.where(big[3], 0.0, -mx.inf))  # an additive mask
        sdpa(*big, sinks=mx.zeros((9,)))
        sdpa(*(a.astype(mx.float16) for a in big[:3]), big[3])
        other: list[tuple[int, ...]] = []
        thread = threading.Thread(target=lambda: other.append(tuple(sdpa(*big).shape)))
        thread.start()
        thread.join()
        assert other == [(16, 9, 1, 64)]
    assert calls == [(16, 9, 1, 64)], "only the large one-position float32 call"
    assert mx.array_equal(out, MLX_ATTENTION(*big[:3], scale=scale, mask=big[3])).item()
    sdpa(*big)
    assert len(calls) == 1, "the block ended"


@pytest.mark.parametrize(
    "batch,heads,kv_heads,length,width,masking",
    [
        (1, 9, 3, 16, 16, "causal"),
        (1, 9, 3, 128, 128, "causal"),
        (2, 9, 3, 7, 40, "causal"),  # a chunk after 33 cached positions
        (3, 4, 4, 12, 30, "boolean"),  # a batch of prompts with left padding
        (16, 8, 2, 16, 16, "boolean"),
        (2, 4, 1, 9, 9, "none"),
    ],
)
def test_a_prompts_attention_is_written_out_with_mlx_bits(
    batch: int,
    heads: int,
    kv_heads: int,
    length: int,
    width: int,
    masking: str,
    calls: list[tuple[int, ...]],
) -> None:
    attention_module.install()  # as a Shard does
    parts = mx.random.split(mx.random.key(batch * width + length), 3)
    q = 3 * mx.random.normal((batch, heads, length, 64), key=parts[0])
    k = 3 * mx.random.normal((batch, kv_heads, width, 64), key=parts[1])
    v = mx.random.normal((batch, kv_heads, width, 64), key=parts[2])
    mask: Any = None
    if masking == "causal":
        mask = "causal"
    elif masking == "boolean":
        pads = mx.arange(batch) % 5
        queries = mx.arange(width - length, width)[:, None]
        allowed = (mx.arange(width)[None] <= queries)[None] & (
            mx.arange(width)[None, None] >= pads[:, None, None]
        )
        mask = allowed.reshape(batch, 1, length, width)
    got = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
    expected = MLX_ATTENTION(q, k, v, scale=0.125, mask=mask)
    assert calls == [(batch, heads, length, 64)], "the prompt took the written-out attention"
    assert mx.array_equal(got, expected).item()
    # Half precision stays with MLX's own.
    half = [a.astype(mx.float16) for a in (q, k, v)]
    mx.eval(mx.fast.scaled_dot_product_attention(*half, scale=0.125, mask=mask))
    assert len(calls) == 1


def test_a_compiled_batch_step_uses_it_and_keeps_every_rows_logits(
    tmp_path: Path, calls: list[tuple[int, ...]]
) -> None:
    # 12 rows x 4 heads x 64 positions: the written-out softmax. Each row's logits equal the
    # same request's alone (one row: MLX's softmax), bit for bit (MLX's quantized kernels
    # compute a row the same whatever the batch).
    model_dir = make_tiny_model_dir(tmp_path / "llama-4bit", num_layers=4, **VARIANTS["llama-4bit"])
    stage = Shard.load(model_dir, LayerRange(0, 4), "quantized")
    assert stage.compiled
    prompts = [[(5 * r + 3 * i) % 200 + 1 for i in range(4 + r)] for r in range(12)]
    longest = max(len(p) for p in prompts)
    pads = [longest - len(p) for p in prompts]
    caches = empty_batch_caches(stage, pads)
    padded = [[0] * pad + p for p, pad in zip(prompts, pads, strict=True)]
    mx.eval(stage(mx.array(padded), caches))
    alone = []
    for prompt in prompts:
        cache = stage.make_cache()
        mx.eval(stage(mx.array([prompt]), cache))
        alone.append(cache)
    # The prompts' attention (several positions a row) is written out too.
    assert calls and all(shape[2] > 1 for shape in calls)
    calls.clear()
    for step in range(3):
        tokens = [[(17 * r + step) % 200 + 1] for r in range(12)]
        batch = stage(mx.array(tokens), caches)
        mx.eval(batch)
        assert calls, "the batch step's attention is written out"
        for row, cache in enumerate(alone):
            solo = stage(mx.array([tokens[row]]), cache)
            assert mx.array_equal(batch[row : row + 1], solo).item(), (step, row)
