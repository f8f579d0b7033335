"""Convert a GGUF file into an mlx-lm model directory (config.json, safetensors, tokenizer).

MLX reads GGUF natively: ``mx.load`` returns Q4_0/Q4_1/Q8_0 tensors already in MLX's
affine-quantized layout (``weight`` uint32 + ``scales`` + ``biases``, group size 32). What is
left is renaming tensors to mlx-lm's names and writing the config and tokenizer files.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import numpy as np

from mlx_relay.core.errors import ModelError, UnsupportedArchitecture
from mlx_relay.model.gguf_tokenizer import write_tokenizer_files

logger = logging.getLogger(__name__)

# MLX unpacks every GGUF quantization type it reads natively with this group size.
GGUF_GROUP_SIZE = 32

# GGUF architectures whose tensors and metadata follow llama.cpp's "llama" layout (mistral too).
SUPPORTED_GGUF_ARCHITECTURES = ("llama",)

_TOP_LEVEL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_PER_LAYER = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_PARAMS = ("weight", "scales", "biases", "bias")

Step = Callable[[str], None]


def read_gguf(path: Path) -> tuple[dict[str, mx.array], dict[str, Any]]:
    """Read a GGUF file's tensors (lazily) and metadata.

    Raises:
        ModelNotFound: The file does not exist.
        ModelError: The file is not a GGUF file MLX can read.
    """
    from mlx_relay.core.errors import ModelNotFound

    if not path.is_file():
        raise ModelNotFound(f"GGUF file not found: {path}")
    try:
        tensors, metadata = mx.load(str(path), format="gguf", return_metadata=True)
    except (RuntimeError, ValueError) as exc:
        raise ModelError(f"{path}: cannot read GGUF file: {exc}") from None
    return cast(dict[str, mx.array], tensors), cast(dict[str, Any], metadata)


def convert_gguf(gguf_path: Path, out_dir: Path, step: Step | None = None) -> dict[str, Any]:
    """Write config.json, model.safetensors and the tokenizer files for ``gguf_path``.

    Args:
        gguf_path: The GGUF file.
        out_dir: An existing, empty directory to write into.
        step: Called with a short description before each stage (for progress displays).

    Returns:
        The config written to config.json.

    Raises:
        UnsupportedArchitecture: The GGUF's architecture is not llama-style.
        ModelError: The file cannot be read or holds tensors that cannot be mapped.
    """
    report = step or (lambda _msg: None)
    report("reading GGUF")
    tensors, metadata = read_gguf(gguf_path)
    arch = str(metadata.get("general.architecture", "unknown"))
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"{gguf_path.name}: GGUF architecture {arch!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)})"
        )

    report("converting weights")
    weights = {_mlx_name(name): value for name, value in tensors.items()}
    config = _config(metadata, weights, arch)

    report("building tokenizer")
    config.update(write_tokenizer_files(metadata, out_dir, config["max_position_embeddings"]))

    report("writing weights")
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    logger.info(
        "imported %s: %d layers, hidden %d, vocab %d",
        gguf_path.name,
        config["num_hidden_layers"],
        config["hidden_size"],
        config["vocab_size"],
    )
    return config


def _mlx_name(name: str) -> str:
    parts = name.split(".")
    if len(parts) == 2 and parts[0] in _TOP_LEVEL and parts[1] in _PARAMS:
        return f"{_TOP_LEVEL[parts[0]]}.{parts[1]}"
    if (
        len(parts) == 4
        and parts[0] == "blk"
        and parts[1].isdigit()
        and parts[2] in _PER_LAYER
        and parts[3] in _PARAMS
    ):
        return f"model.layers.{parts[1]}.{_PER_LAYER[parts[2]]}.{parts[3]}"
    raise ModelError(f"GGUF tensor {name!r} has no counterpart in the llama architecture")


def _config(metadata: dict[str, Any], weights: dict[str, mx.array], arch: str) -> dict[str, Any]:
    def value(key: str, default: Any = None) -> Any:
        full = f"{arch}.{key}"
        if full not in metadata:
            if default is None:
                raise ModelError(f"GGUF metadata key {full!r} is missing")
            return default
        raw = metadata[full]
        return raw.item() if hasattr(raw, "item") else raw

    hidden = int(value("embedding_length"))
    heads = int(value("attention.head_count"))
    embed = weights["model.embed_tokens.weight"]
    vocab = int(value("vocab_size", 0)) or int(embed.shape[0])
    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": int(value("block_count")),
        "intermediate_size": int(value("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(value("attention.head_count_kv", heads)),
        "head_dim": int(value("attention.key_length", hidden // heads)),
        "rms_norm_eps": _short_float(value("attention.layer_norm_rms_epsilon")),
        "vocab_size": vocab,
        "max_position_embeddings": int(value("context_length")),
        "rope_theta": _short_float(value("rope.freq_base", 10000.0)),
        # llama.cpp stores q/k permuted for interleaved (GPT-J style) rotary embeddings.
        "rope_traditional": True,
        "tie_word_embeddings": "lm_head.weight" not in weights,
        "torch_dtype": activation_dtype_name(weights),
    }
    quantization = _quantization(weights)
    if quantization:
        config["quantization"] = quantization
        config["quantization_config"] = quantization
    name = metadata.get("general.name")
    if isinstance(name, str):
        config["gguf_name"] = name
    return config


def _short_float(value: Any) -> float:
    # GGUF stores float32: 1e-5 arrives as 9.99999974e-06; keep the value it was written as.
    return float(str(np.float32(value)))


def _quantization(weights: dict[str, mx.array]) -> dict[str, Any] | None:
    bits: dict[str, int] = {}
    for key, scales in weights.items():
        if not key.endswith(".scales"):
            continue
        module = key.removesuffix(".scales")
        packed = weights[f"{module}.weight"]
        in_dims = scales.shape[-1] * GGUF_GROUP_SIZE
        bits[module] = packed.shape[-1] * 32 // in_dims
    if not bits:
        return None
    common = Counter(bits.values()).most_common(1)[0][0]
    out: dict[str, Any] = {"group_size": GGUF_GROUP_SIZE, "bits": common}
    for module, b in sorted(bits.items()):
        if b != common:
            out[module] = {"group_size": GGUF_GROUP_SIZE, "bits": b}
    return out


def activation_dtype_name(weights: dict[str, mx.array]) -> str:
    """The dtype hidden states take between layers: the promotion of every float parameter
    (quantization scales, norms, unquantized weights)."""
    dtype: mx.Dtype | None = None
    for array in weights.values():
        if mx.issubdtype(array.dtype, mx.floating):
            dtype = array.dtype if dtype is None else mx.result_type(dtype, array.dtype)
    return dtype_name(dtype or mx.float32)


def dtype_name(dtype: mx.Dtype) -> str:
    """``mx.float16`` -> ``"float16"``."""
    return str(dtype).rsplit(".", 1)[-1]
