"""One pipeline stage: a contiguous slice of a model's transformer layers.

A shard runs the architecture's own layer classes with the same mask logic as mlx-lm's
full forward, so running the stages one after another gives the full model's logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache, RotatingKVCache

from mlx_relay.core.errors import ShardMismatch
from mlx_relay.core.types import LayerRange


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

    def __init__(self, model: nn.Module, layer_range: LayerRange) -> None:
        inner = model.model
        self.num_layers = len(inner.layers)
        if layer_range.end > self.num_layers:
            raise ShardMismatch(
                f"layers {layer_range} do not fit a model with {self.num_layers} layers"
            )
        self.layer_range = layer_range
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
        self._model = model

    @staticmethod
    def _part(module: nn.Module, name: str) -> Any:
        if name not in module:
            raise ShardMismatch(f"the loaded model has no {name!r}, which this stage needs")
        return module[name]

    @classmethod
    def load(cls, model_dir: Path, layer_range: LayerRange) -> Shard:
        """Load only this stage's part of the model in ``model_dir``."""
        from mlx_relay.model.load import load_model

        return cls(load_model(model_dir, layer_range), layer_range)

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
            h = self._embed(x)
        else:
            if x.ndim != 3 or x.shape[-1] != self.hidden_size:
                raise ShardMismatch(
                    f"stage {self.layer_range} takes hidden states (B, L, {self.hidden_size}), "
                    f"got {tuple(x.shape)}"
                )
            h = x if x.dtype == self.dtype else x.astype(self.dtype)

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

    def parameter_bytes(self) -> int:
        """Bytes of every parameter this stage holds."""
        return sum(v.nbytes for v in parameter_arrays(self._model))


def parameter_arrays(module: nn.Module) -> list[mx.array]:
    """Every parameter array a module holds."""
    flat: list[tuple[str, Any]] = tree_flatten(module.parameters())  # type: ignore[assignment]
    return [cast(mx.array, value) for _, value in flat]


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
