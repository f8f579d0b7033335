"""Decode attention for the compiled CPU step: MLX's own arithmetic, with a faster softmax.

On the CPU, ``mx.fast.scaled_dot_product_attention`` is not a fused kernel: it composes
``scale * q``, a matmul with the keys, the mask, a ``softmax`` primitive and a matmul with
the values. That softmax takes each exponential through MLX's scalar ``exp``, which its
CPU build compiles as calls to ``fmaf``: at batch 16 it is most of a decode step's
attention, and it grows with the context (16 rows over 1,024 positions: 4.7 ms a layer).

:func:`decode_attention` has the attention of one-position queries traced inside it
(:class:`~mlx_relay.model.shard.Shard`'s compiled decode step) composed of the same
operations, except the softmax, which is written out as MLX's CPU kernel computes it: the
row maximum, ``exp(x - max)``, their sum in order from zero, and the products with the
sum's reciprocal. The exponentials then run in a compiled kernel (vectorized, see
:mod:`mlx_relay.core.native_jit`) and every result has the same bits as MLX's attention
(tested), so the choice is free: it is made where it is faster, from
:data:`UNFUSED_SCORES` attention scores a layer (at batch 16: 400 -> 261 us a layer over
64 positions, 4,698 -> 2,732 us over 1,024; one row over 64 positions is faster as is).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import mlx.core as mx

# Scores a layer (batch x heads x positions) from which the written-out softmax is faster.
UNFUSED_SCORES = 1024

_MLX_ATTENTION = mx.fast.scaled_dot_product_attention
_tracing = threading.local()
_install_lock = threading.Lock()


@contextmanager
def decode_attention() -> Iterator[None]:
    """Within this block, this thread's one-position attention on the CPU is computed by
    :func:`attention` where that is faster; any other call (another thread, a prompt, a
    GPU) goes to MLX's own."""
    _install()
    before = getattr(_tracing, "active", False)
    _tracing.active = True
    try:
        yield
    finally:
        _tracing.active = before


def attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    scale: float,
    mask: mx.array | None = None,
) -> mx.array:
    """``mx.fast.scaled_dot_product_attention`` as MLX's CPU backend computes it, bit for
    bit, with the softmax written out.

    Args:
        queries: ``(B, H, L, D)``, float32.
        keys, values: ``(B, KV, W, D)``, float32, ``H`` a multiple of ``KV``.
        scale: Applied to the queries.
        mask: Boolean (True: attend), broadcastable to ``(B, H, L, W)``.
    """
    batch, heads, length, _ = queries.shape
    kv_heads, width = keys.shape[1], keys.shape[2]
    repeats = heads // kv_heads
    q = mx.array(scale, queries.dtype) * queries
    k, v = keys, values
    if repeats > 1:
        q = q.reshape(batch, kv_heads, repeats, length, q.shape[-1])
        k, v = mx.expand_dims(k, 2), mx.expand_dims(v, 2)
    scores = q @ k.swapaxes(-1, -2)
    if mask is not None:
        mask = mx.broadcast_to(mask, (batch, heads, length, width))
        if repeats > 1:
            mask = mask.reshape(batch, kv_heads, repeats, length, width)
        scores = mx.where(mask, scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype))
    exponentials = mx.exp(scores - scores.max(axis=-1, keepdims=True))
    weights = exponentials * (1 / exponentials.sum(axis=-1, keepdims=True))
    out = weights @ v
    return out.reshape(batch, heads, length, out.shape[-1]) if repeats > 1 else out


def _install() -> None:
    with _install_lock:
        if mx.fast.scaled_dot_product_attention is not _dispatch:
            mx.fast.scaled_dot_product_attention = _dispatch


def _dispatch(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    *,
    scale: float,
    mask: str | mx.array | None = None,
    sinks: mx.array | None = None,
    force_fused: bool = False,
    stream: Any = None,
) -> mx.array:
    # MLX 0.32's signature, everything passed on unchanged.
    plain = sinks is None and not force_fused and stream is None
    if plain and getattr(_tracing, "active", False) and _written_out_is_faster(q, k, v, mask):
        return attention(q, k, v, scale, cast(mx.array | None, mask))
    return _MLX_ATTENTION(
        q,
        k,
        v,
        scale=scale,
        mask=mask,
        sinks=sinks,
        force_fused=force_fused,
        stream=stream,
    )


def _written_out_is_faster(
    queries: mx.array, keys: mx.array, values: mx.array, mask: str | mx.array | None
) -> bool:
    # One position per row, in float32 (MLX's softmax of 16-bit scores sums in float32), a
    # boolean mask (or none), on the CPU.
    if queries.ndim != 4 or queries.shape[2] != 1 or mx.default_device() != mx.cpu:
        return False
    if {queries.dtype, keys.dtype, values.dtype} != {mx.float32}:
        return False
    if mask is not None and (isinstance(mask, str) or mask.dtype != mx.bool_):
        return False
    return queries.shape[0] * queries.shape[1] * keys.shape[2] >= UNFUSED_SCORES
