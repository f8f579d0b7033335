"""One pipeline stage: a contiguous slice of a model's transformer layers.

A shard runs the architecture's own layer classes with the same mask logic as mlx-lm's
full forward, so running the stages one after another gives the full model's logits.

Decode steps (one position per row) run as one ``mx.compile``d graph: the KV buffers are
passed in whole with the position as an array and a mask over the unused tail, so the
shapes stay fixed until a buffer grows (every 256 positions) and the graph is reused.
Attention reads only the first *window* positions of the buffers: the positions in use
rounded up to :data:`ATTENTION_WINDOW_STEP`, one graph per window (at batch 16 attending over
a whole 256-position buffer costs about as much as 20 of the step's matmuls). A decode
batch's caches (:mod:`mlx_relay.model.batch`) run the same way, each row with its own RoPE
offset and left padding masked. Without a working compiler, and for sliding-window layers,
every step runs eagerly. The step's attention keeps MLX's arithmetic with a faster softmax
(:mod:`mlx_relay.model.attention`).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import BatchKVCache, KVCache, RotatingKVCache

from mlx_relay.core.errors import ShardMismatch
from mlx_relay.core.types import LayerRange
from mlx_relay.model.attention import decode_attention, install
from mlx_relay.model.backend import is_quantized

logger = logging.getLogger(__name__)

# Attention in a compiled decode step spans the positions in use rounded up to this.
ATTENTION_WINDOW_STEP = 64


class Shard:
    """Layers ``[start, end)`` of a model, plus the embedding on the first stage and the
    final norm and output head on the last.

    Attributes:
        layer_range: The layers this stage runs.
        num_layers: The whole model's layer count.
        is_first: Whether this stage takes token ids (it holds the embedding).
        is_last: Whether this stage returns logits (it holds the norm and head).
        hidden_size: Width of the hidden states passed between stages.
        vocab_size: Width of the logits.
        dtype: The dtype of the hidden states this stage takes (after the first) and returns.
    """

    def __init__(self, model: nn.Module, layer_range: LayerRange, compiled: bool = True) -> None:
        inner = model.model
        self.num_layers = len(inner.layers)
        if layer_range.end > self.num_layers:
            raise ShardMismatch(
                f"layers {layer_range} do not fit a model with {self.num_layers} layers"
            )
        self.layer_range = layer_range
        install()  # prompts' attention with the written-out softmax (same bits, faster)
        self.is_first = layer_range.start == 0
        self.is_last = layer_range.end == self.num_layers
        self._layers = list(inner.layers[layer_range.start : layer_range.end])
        missing = [layer_range.start + i for i, b in enumerate(self._layers) if b is None]
        if missing:
            raise ShardMismatch(f"layers {missing} of {layer_range} were not loaded")
        args = model.args
        self.hidden_size = int(args.hidden_size)
        self.vocab_size = int(args.vocab_size)
        self._sliding_window = getattr(args, "sliding_window", None)
        self._embed = self._part(inner, "embed_tokens") if self.is_first else None
        self._norm = self._part(inner, "norm") if self.is_last else None
        self._head: Any = None
        if self.is_last:
            if getattr(args, "tie_word_embeddings", False):
                self._head = self._part(inner, "embed_tokens").as_linear
            else:
                self._head = self._part(model, "lm_head")
        self.dtype = _activation_dtype(self._layers)
        self.compute = compute_label(model)
        self._model = model
        static = not any(_sliding(layer) for layer in self._layers)
        self.compiled = compiled and static and compile_works()
        self._graphs: dict[tuple[int, bool], Any] = {}  # compiled steps by window, batched

    @staticmethod
    def _part(module: nn.Module, name: str) -> Any:
        if name not in module:
            raise ShardMismatch(f"the loaded model has no {name!r}, which this stage needs")
        return module[name]

    @classmethod
    def load(
        cls,
        model_dir: Path,
        layer_range: LayerRange,
        compute: str = "quantized",
        dense_memory_share: float = 0.5,
        compiled: bool = True,
    ) -> Shard:
        """Load only this stage's part of the model in ``model_dir``, computing with
        ``compute`` weights (see :func:`mlx_relay.model.load.load_model`)."""
        from mlx_relay.model.load import load_model

        model = load_model(model_dir, layer_range, compute, dense_memory_share)
        return cls(model, layer_range, compiled)

    def make_cache(self) -> list[Any]:
        """Fresh KV caches, one per layer of this stage."""
        return [
            RotatingKVCache(max_size=self._sliding_window)
            if getattr(layer, "use_sliding", False)
            else KVCache()
            for layer in self._layers
        ]

    @staticmethod
    def cache_offset(cache: list[Any]) -> int:
        """How many positions the cache already holds."""
        return int(cache[0].offset) if cache else 0

    def __call__(
        self, x: mx.array, cache: list[Any], *, last_position_only: bool = False
    ) -> mx.array:
        """Run this stage (lazily; the caller evaluates).

        Args:
            x: Token ids ``(B, L)`` on the first stage, hidden states ``(B, L, H)`` on the
                others (cast to ``dtype`` if another float type arrives).
            cache: This stage's caches from :meth:`make_cache`, updated in place.
            last_position_only: On the last stage, apply the norm and head to the last
                position only (``(B, 1, V)``): sampling needs nothing else, and the head is
                the largest matrix of a small model.

        Returns:
            Hidden states ``(B, L, H)``, or logits ``(B, L, V)`` on the last stage.

        Raises:
            ShardMismatch: ``x`` or ``cache`` does not fit this stage.
        """
        if len(cache) != len(self._layers):
            raise ShardMismatch(f"expected {len(self._layers)} caches, got {len(cache)}")
        if self._embed is not None:
            if x.ndim != 2 or not mx.issubdtype(x.dtype, mx.integer):
                raise ShardMismatch(
                    f"the first stage takes integer token ids (B, L), got {x.dtype} {x.shape}"
                )
            h = x
        else:
            if x.ndim != 3 or x.shape[-1] != self.hidden_size:
                raise ShardMismatch(
                    f"stage {self.layer_range} takes hidden states (B, L, {self.hidden_size}), "
                    f"got {tuple(x.shape)}"
                )
            h = x if x.dtype == self.dtype else x.astype(self.dtype)

        if self.compiled and h.shape[1] == 1 and _compilable(cache[0]):
            return self._compiled_step(h, cache)
        if self._embed is not None:
            h = self._embed(h)
        full_mask = sliding_mask = None
        full = [c for b, c in zip(self._layers, cache, strict=True) if not _sliding(b)]
        sliding = [c for b, c in zip(self._layers, cache, strict=True) if _sliding(b)]
        if full:
            full_mask = create_attention_mask(h, full[0])
        if sliding:
            sliding_mask = create_attention_mask(h, sliding[0], window_size=self._sliding_window)
        for layer, c in zip(self._layers, cache, strict=True):
            h = layer(h, sliding_mask if _sliding(layer) else full_mask, c)

        if self._norm is None:
            return h
        if last_position_only:
            h = h[:, -1:, :]
        return self._head(self._norm(h))

    def warm_up(self) -> None:
        """Run a two-position prompt and one decode step on a throwaway cache, so that the
        compiled decode graph is built before the first request needs it."""
        shape = (1, 2) if self.is_first else (1, 2, self.hidden_size)
        x = mx.zeros(shape, dtype=mx.int32 if self.is_first else self.dtype)
        cache = self.make_cache()
        mx.eval(self(x, cache, last_position_only=True))
        mx.eval(self(x[:, :1], cache, last_position_only=True))

    def _compiled_step(self, x: mx.array, cache: list[Any]) -> mx.array:
        first = cache[0]
        batched = isinstance(first, BatchKVCache)
        used = int(first._idx) if batched else int(first.offset)
        buffers: list[mx.array] = []
        for c in cache:
            if used >= c.keys.shape[2]:
                _grow(c)
            buffers += [c.keys, c.values]
        window = min(buffers[0].shape[2], attention_window(used + 1))
        index = mx.array(used, dtype=mx.int32)
        # A decode batch's rows carry their own RoPE offsets and left padding.
        rows = [first.offset, first.left_padding] if batched else []
        outputs = self._decode_graph(window, batched)(x, index, *rows, *buffers)
        for i, c in enumerate(cache):
            c.keys, c.values = outputs[1 + 2 * i], outputs[2 + 2 * i]
            if batched:
                c.offset = c.offset + 1
                c._idx = used + 1
            else:
                c.offset = used + 1
        return outputs[0]

    def _decode_graph(self, window: int, batched: bool) -> Any:
        """The compiled decode step attending over ``window`` positions, for a request's own
        caches or a decode batch's."""
        graph = self._graphs.get((window, batched))
        if graph is None:
            step = self._batch_decode_step if batched else self._decode_step
            graph = self._graphs[(window, batched)] = mx.compile(functools.partial(step, window))
        return graph

    def _decode_step(
        self, window: int, x: mx.array, index: mx.array, *buffers: mx.array
    ) -> list[mx.array]:
        # Traced once per buffer capacity and window: the position is an array, the
        # window's tail is masked.
        mask = (mx.arange(window) <= index).reshape(1, 1, 1, window)
        return self._layers_step(window, x, mask, index, index, buffers)

    def _batch_decode_step(
        self,
        window: int,
        x: mx.array,
        index: mx.array,
        offsets: mx.array,
        left_padding: mx.array,
        *buffers: mx.array,
    ) -> list[mx.array]:
        # Every row writes at ``index``; its own padding is masked, as BatchKVCache masks it.
        positions = mx.arange(window)
        mask = (positions <= index) & (positions >= left_padding[:, None])
        mask = mask.reshape(-1, 1, 1, window)
        return self._layers_step(window, x, mask, index, offsets, buffers)

    def _layers_step(
        self,
        window: int,
        x: mx.array,
        mask: mx.array,
        index: mx.array,
        offsets: mx.array,
        buffers: tuple[mx.array, ...],
    ) -> list[mx.array]:
        h = self._embed(x) if self._embed is not None else x
        outputs: list[mx.array] = []
        with decode_attention():
            for i, layer in enumerate(self._layers):
                view = _TracedCache(buffers[2 * i], buffers[2 * i + 1], index, offsets, window)
                h = layer(h, mask, view)
                outputs += [view.keys, view.values]
        if self._norm is not None:
            h = self._head(self._norm(h))
        return [h, *outputs]

    def parameter_bytes(self) -> int:
        """Bytes of every parameter this stage holds."""
        return sum(v.nbytes for v in parameter_arrays(self._model))


def attention_window(positions: int) -> int:
    """The positions a compiled decode step attends over when ``positions`` are in use."""
    return -(-positions // ATTENTION_WINDOW_STEP) * ATTENTION_WINDOW_STEP


def parameter_arrays(module: nn.Module) -> list[mx.array]:
    """Every parameter array a module holds."""
    flat: list[tuple[str, Any]] = tree_flatten(module.parameters())  # type: ignore[assignment]
    return [cast(mx.array, value) for _, value in flat]


class _TracedCache:
    """What a layer's attention sees of its KV cache inside the compiled decode step: the new
    position is written at ``index``, RoPE rotates by ``offset`` (per row in a batch)."""

    def __init__(
        self, keys: mx.array, values: mx.array, index: mx.array, offset: mx.array, window: int
    ) -> None:
        self.keys, self.values, self.index = keys, values, index
        self.offset, self.window = offset, window

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Writes the new position into the whole buffers; returns their first ``window``
        positions, the ones attention reads."""
        start = self.index.reshape(1)
        self.keys = mx.slice_update(self.keys, keys, start, axes=(2,))
        self.values = mx.slice_update(self.values, values, start, axes=(2,))
        return self.keys[..., : self.window, :], self.values[..., : self.window, :]


def _compilable(cache: Any) -> bool:
    # A request's own full-attention cache, or a decode batch's outside a padded prefill.
    if isinstance(cache, BatchKVCache):
        return cache.keys is not None and getattr(cache, "_right_padding", None) is None
    return isinstance(cache, KVCache) and cache.keys is not None


def _grow(cache: Any) -> None:
    # Full buffers gain one more block of positions, as KVCache.update_and_fetch grows them.
    keys, values = cache.keys, cache.values
    extra = (keys.shape[0], keys.shape[1], cache.step)
    cache.keys = mx.concatenate([keys, mx.zeros((*extra, keys.shape[3]), keys.dtype)], axis=2)
    cache.values = mx.concatenate(
        [values, mx.zeros((*extra, values.shape[3]), values.dtype)], axis=2
    )


@functools.cache
def compile_works() -> bool:
    """Whether ``mx.compile`` can build kernels here (on CPU it needs a C++ compiler)."""
    try:
        probe = mx.compile(lambda a: mx.exp(a) * 2 + 1)
        mx.eval(probe(mx.ones((4,))))
    except Exception as exc:
        logger.warning("mx.compile is unavailable (%s): decode steps run uncompiled", exc)
        return False
    return True


def compute_label(model: nn.Module) -> str:
    """What a stage computes with: ``quantized``, or the dtype of its dense weights."""
    if is_quantized(model):
        return "quantized"
    floats = {str(a.dtype) for a in parameter_arrays(model) if mx.issubdtype(a.dtype, mx.floating)}
    return floats.pop().rsplit(".", 1)[-1] if len(floats) == 1 else "mixed"


def _sliding(layer: nn.Module) -> bool:
    return bool(getattr(layer, "use_sliding", False))


def _activation_dtype(layers: list[nn.Module]) -> mx.Dtype:
    # Hidden states come out of a layer as the promotion of its float parameters.
    dtype: mx.Dtype | None = None
    for layer in layers:
        for value in parameter_arrays(layer):
            if mx.issubdtype(value.dtype, mx.floating):
                dtype = value.dtype if dtype is None else mx.result_type(dtype, value.dtype)
    return dtype or mx.float32
