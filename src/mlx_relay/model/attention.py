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

Prompts (more than one query position) take the same written-out attention wherever
:func:`install` put it in front of MLX's, their softmax compiled once for every shape: a
layer of the bundled model over a 128-token prompt 2.35 -> 1.01 ms, over 1,000 tokens 161
-> 66 ms, with MLX's bits for a causal mask (any offset), a boolean mask or none (tested).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import mlx.core as mx

# Scores a layer (batch x heads x positions) from which the written-out softmax is faster.
UNFUSED_SCORES = 1024

_MLX_ATTENTION = mx.fast.scaled_dot_product_attention
_tracing = threading.local()
_install_lock = threading.Lock()


def _softmax(scores: mx.array) -> mx.array:
    """MLX's CPU softmax, written out: the row maximum, ``exp(x - max)``, their sum in order
    from zero, the products with the sum's reciprocal."""
    exponentials = mx.exp(scores - scores.max(axis=-1, keepdims=True))
    return exponentials * (1 / exponentials.sum(axis=-1, keepdims=True))


# For prompts, outside any compiled step: one compiled graph whatever the scores' shape, so
# that the exponentials run vectorized. Traced under a lock (workers of one process compute
# on their own threads).
_compiled_softmax = mx.compile(_softmax, shapeless=True)
_compiled_lock = threading.Lock()


def _prompt_softmax(scores: mx.array) -> mx.array:
    with _compiled_lock:
        return cast(mx.array, _compiled_softmax(scores))


def install() -> None:
    """Put this module's attention in front of ``mx.fast.scaled_dot_product_attention`` (once
    per process): prompts on the CPU take the written-out attention from then on, decode
    steps inside :func:`decode_attention`."""
    _install()


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
    mask: mx.array | str | None = None,
    softmax: Callable[[mx.array], mx.array] = _softmax,
) -> mx.array:
    """``mx.fast.scaled_dot_product_attention`` as MLX's CPU backend computes it, bit for
    bit, with the softmax written out.

    Args:
        queries: ``(B, H, L, D)``, float32.
        keys, values: ``(B, KV, W, D)``, float32, ``H`` a multiple of ``KV``.
        scale: Applied to the queries.
        mask: Boolean (True: attend), broadcastable to ``(B, H, L, W)``, or ``"causal"``
            (the ``L`` queries are the last of the ``W`` positions).
        softmax: The softmax's arithmetic (compiled for prompts).
    """
    batch, heads, length, _ = queries.shape
    kv_heads, width = keys.shape[1], keys.shape[2]
    repeats = heads // kv_heads
    if isinstance(mask, str):
        mask = mx.arange(width - length, width)[:, None] >= mx.arange(width)[None]
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
    out = softmax(scores) @ v
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
    if plain and not getattr(_tracing, "active", False) and _is_cpu_prompt(q, k, v, mask):
        return attention(q, k, v, scale, mask, softmax=_prompt_softmax)
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


def _is_cpu_prompt(
    queries: mx.array, keys: mx.array, values: mx.array, mask: str | mx.array | None
) -> bool:
    # Several positions per row, in float32, a boolean or causal mask (or none), on the CPU.
    if queries.ndim != 4 or queries.shape[2] < 2 or mx.default_device() != mx.cpu:
        return False
    if queries.shape[2] > keys.shape[2] or queries.shape[1] % keys.shape[1]:
        return False
    if {queries.dtype, keys.dtype, values.dtype} != {mx.float32}:
        return False
    if isinstance(mask, str):
        return mask == "causal"
    return mask is None or mask.dtype == mx.bool_


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
