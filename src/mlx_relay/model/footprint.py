"""What each part of a model takes in memory, read from its safetensors headers (no weights).

A stage holds its layers' weights either as stored (``quantized``) or dequantized to dense
float32 (``float32``, the CPU path: see :mod:`mlx_relay.model.backend`), plus a KV cache of
``2 x kv_heads x head_dim`` values per token per layer.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_relay.core.errors import ModelError
from mlx_relay.core.types import LayerRange
from mlx_relay.model.load import read_config
from mlx_relay.model.placement import ModelCosts

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Footprint:
    """Bytes of each part of a model, stored and as dense float32."""

    layer_bytes: tuple[int, ...]
    layer_dense_bytes: tuple[int, ...]
    embed_bytes: int
    embed_dense_bytes: int
    head_bytes: int
    """Output head and final norm; the embedding's size again when it doubles as the head."""
    head_dense_bytes: int
    kv_values_per_token_per_layer: int
    """Keys and values stored per token per layer: 2 x kv_heads x head_dim."""
    activation_bytes: int
    """Bytes of one stored activation value (KV entries follow it; 4 on the float32 path)."""

    def costs(self, dense: bool, kv_tokens: int) -> ModelCosts:
        """The placement cost table for weights in one form and ``kv_tokens`` of KV."""
        layers = self.layer_dense_bytes if dense else self.layer_bytes
        value_bytes = 4 if dense else self.activation_bytes
        per_layer = sum(self.layer_dense_bytes) / max(1, len(self.layer_dense_bytes))
        return ModelCosts(
            layer_bytes=layers,
            embed_bytes=self.embed_dense_bytes if dense else self.embed_bytes,
            head_bytes=self.head_dense_bytes if dense else self.head_bytes,
            kv_bytes_per_layer=self.kv_values_per_token_per_layer * value_bytes * kv_tokens,
            # Dense bytes are 4 x parameters, so their ratio is the parameter ratio.
            head_layers=(self.head_dense_bytes / per_layer) if per_layer else 0.0,
        )


def read_footprint(model_dir: Path) -> Footprint:
    """Sizes of a model directory's parts, from config.json and the safetensors headers.

    Raises:
        ModelNotFound: no config.json.
        ModelError: a header cannot be read.
    """
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    num_layers = int(config.get("num_hidden_layers", 0))
    stored = [0] * num_layers
    dense = [0] * num_layers
    parts = {"embed": [0, 0], "head": [0, 0]}
    activation = 4
    for name, entry in _tensors(model_dir).items():
        size, dense_size = _sizes(name, entry, config)
        if entry["dtype"] in ("F16", "BF16"):
            activation = min(activation, 2)
        match = _LAYER.match(name)
        if match and int(match.group(1)) < num_layers:
            stored[int(match.group(1))] += size
            dense[int(match.group(1))] += dense_size
        else:
            part = "embed" if "embed_tokens" in name else "head"
            parts[part][0] += size
            parts[part][1] += dense_size
    if config.get("tie_word_embeddings", False) or not any(
        "lm_head" in n for n in _tensors(model_dir)
    ):
        parts["head"][0] += parts["embed"][0]
        parts["head"][1] += parts["embed"][1]
    heads = int(config.get("num_attention_heads", 1))
    kv_heads = int(config.get("num_key_value_heads", heads))
    head_dim = int(config.get("head_dim") or int(config.get("hidden_size", 0)) // heads)
    return Footprint(
        layer_bytes=tuple(stored),
        layer_dense_bytes=tuple(dense),
        embed_bytes=parts["embed"][0],
        embed_dense_bytes=parts["embed"][1],
        head_bytes=parts["head"][0],
        head_dense_bytes=parts["head"][1],
        kv_values_per_token_per_layer=2 * kv_heads * head_dim,
        activation_bytes=activation,
    )


def stage_bytes(footprint: Footprint, layers: LayerRange, dense: bool, kv_tokens: int) -> int:
    """Memory one stage holding ``layers`` needs: weights in that form plus KV budget."""
    return footprint.costs(dense, kv_tokens).stage_bytes(layers)


def _tensors(model_dir: Path) -> dict[str, dict[str, Any]]:
    tensors: dict[str, dict[str, Any]] = {}
    for file in sorted(model_dir.glob("model*.safetensors")):
        try:
            with file.open("rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
        except (OSError, ValueError, struct.error) as exc:
            raise ModelError(f"{file}: cannot read the safetensors header: {exc}") from None
        tensors.update({k: v for k, v in header.items() if k != "__metadata__"})
    return tensors


def _sizes(name: str, entry: dict[str, Any], config: dict[str, Any]) -> tuple[int, int]:
    """(stored bytes, dense float32 bytes) of one tensor; scales and biases of a quantized
    weight vanish in the dense form."""
    start, end = entry["data_offsets"]
    shape = [int(d) for d in entry["shape"]]
    count = 1
    for d in shape:
        count *= d
    module, _, leaf = name.rpartition(".")
    quant = config.get("quantization") or config.get("quantization_config")
    if isinstance(quant, dict) and leaf in ("scales", "biases"):
        return end - start, 0
    if isinstance(quant, dict) and entry["dtype"] == "U32" and leaf == "weight":
        override = quant.get(module)
        bits = int((override if isinstance(override, dict) else quant).get("bits", 4))
        return end - start, count * 32 // bits * 4
    return end - start, count * 4
