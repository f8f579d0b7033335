"""Tiny random-weight models for tests: a real mlx-lm model directory in well under a second.

The weights come from mlx-lm's own ``Model`` class of the architecture, the tokenizer is a
byte-level BPE trained in-process on a few sentences, with ChatML-style special tokens and
chat template.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")

# The model variants shard and batching tests run (keyword arguments of make_tiny_model_dir).
VARIANTS: dict[str, dict[str, Any]] = {
    "llama": {"arch": "llama"},
    "mistral": {"arch": "mistral"},
    "qwen2": {"arch": "qwen2"},
    "qwen3": {"arch": "qwen3"},
    "llama-4bit": {"arch": "llama", "quantize": True},
    "qwen3-4bit": {"arch": "qwen3", "quantize": True},
    # Alternating sliding-window layers with a window shorter than the prompts: stages must
    # rebuild both masks and the rotating caches exactly as the full model does.
    "llama-sliding": {
        "arch": "llama",
        "config_overrides": {
            "layer_types": ["sliding_attention", "full_attention"] * 2,
            "sliding_window": 4,
        },
    },
}

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS_TOKEN = "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Distributed inference splits the layers of a model across several devices.",
    "Each worker holds a contiguous range of transformer layers and its own cache.",
    "Hello, world! Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 1234.",
    "héllo wörld, naïve café, 東京, emoji 🚀 and punctuation: (a, b) [c] {d}.",
]


def make_tiny_model_dir(
    path: Path,
    arch: str = "llama",
    num_layers: int = 4,
    seed: int = 0,
    hidden_size: int = 64,
    quantize: bool = False,
    config_overrides: dict[str, Any] | None = None,
) -> Path:
    """Write a tiny random-weight model directory that mlx-relay and mlx-lm can load.

    Args:
        path: The directory to write (created if missing).
        arch: One of ``llama``, ``mistral``, ``qwen2``, ``qwen3``.
        num_layers: Transformer layers.
        seed: Seed of the random weights.
        hidden_size: Model width (a multiple of 32 when ``quantize``).
        quantize: Quantize linear layers and the embedding to 4 bits (group size 32).
        config_overrides: Extra config.json entries (e.g. sliding-window layer types).

    Returns:
        ``path``.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer()
    vocab_size = tokenizer.get_vocab_size()
    config = _config(arch, num_layers, hidden_size, vocab_size)
    config["eos_token_id"] = tokenizer.token_to_id(EOS_TOKEN)
    config.update(config_overrides or {})

    module = importlib.import_module(f"mlx_lm.models.{'llama' if arch == 'mistral' else arch}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    # Random norm weights make every layer's contribution distinct, so a skipped or repeated
    # layer changes the logits.
    for _, module in model.named_modules():
        if isinstance(module, nn.RMSNorm):
            module.weight = 1.0 + 0.1 * mx.random.normal(module.weight.shape)
    if quantize:
        nn.quantize(model, group_size=32, bits=4)
        config["quantization"] = {"group_size": 32, "bits": 4}
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    _write_tokenizer(tokenizer, path)
    return path


def _config(arch: str, num_layers: int, hidden_size: int, vocab_size: int) -> dict[str, Any]:
    heads = 4
    config: dict[str, Any] = {
        "model_type": arch,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "intermediate_size": hidden_size * 2,
        "num_attention_heads": heads,
        "num_key_value_heads": 2,
        "head_dim": hidden_size // heads,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab_size,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "rope_traditional": False,
        # Untied heads for llama/mistral, tied embeddings for the qwen variants: both paths.
        "tie_word_embeddings": arch in ("qwen2", "qwen3"),
        "bos_token_id": 1,
    }
    return config


def _train_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer)
    return tokenizer


def _write_tokenizer(tokenizer: Tokenizer, path: Path) -> None:
    tokenizer.save(str(path / "tokenizer.json"))
    special = {
        "bos_token": "<|im_start|>",
        "eos_token": EOS_TOKEN,
        "unk_token": "<|endoftext|>",
        "pad_token": EOS_TOKEN,
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 512,
        "chat_template": CHAT_TEMPLATE,
        **special,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")


_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def _interleave(weight: mx.array, heads: int) -> mx.array:
    """llama.cpp's q/k row order: each head's two rotary halves interleaved."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(
    model_dir: Path,
    out: Path,
    arch: str = "llama",
    extra: dict[str, Any] | None = None,
    metadata_overrides: dict[str, Any] | None = None,
) -> Path:
    """Write the unquantized llama-family model in ``model_dir`` as llama.cpp would.

    q/k rows are permuted for interleaved rotary embeddings and the tokenizer goes into the
    ``tokenizer.ggml.*`` metadata. ``arch`` names the GGUF architecture; ``extra`` adds
    tensors and ``metadata_overrides`` replaces metadata (to test what the importer does
    with them).
    """
    config = json.loads((model_dir / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    weights = mx.load(str(model_dir / "model.safetensors"))
    tensors: dict[str, mx.array] = {}
    for name, value in weights.items():
        module, param = name.rsplit(".", 1)
        if module in _TOP_NAMES:
            tensors[f"{_TOP_NAMES[module]}.{param}"] = value
            continue
        _, _, index, rest = module.split(".", 3)
        if rest == "self_attn.q_proj":
            value = _interleave(value, heads)
        elif rest == "self_attn.k_proj":
            value = _interleave(value, kv_heads)
        tensors[f"blk.{index}.{_LAYER_NAMES[rest]}.{param}"] = value
    tensors.update(extra or {})

    tok = json.loads((model_dir / "tokenizer.json").read_text())
    vocab: dict[str, int] = tok["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.__getitem__)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    special = {t["id"] for t in tok["added_tokens"] if t["special"]}
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())

    def u32(v: int) -> mx.array:
        return mx.array(v, dtype=mx.uint32)

    def f32(v: float) -> mx.array:
        return mx.array(v, dtype=mx.float32)

    metadata: dict[str, Any] = {
        "general.architecture": arch,
        "general.name": "tiny test model",
        f"{arch}.embedding_length": u32(config["hidden_size"]),
        f"{arch}.block_count": u32(config["num_hidden_layers"]),
        f"{arch}.feed_forward_length": u32(config["intermediate_size"]),
        f"{arch}.attention.head_count": u32(heads),
        f"{arch}.attention.head_count_kv": u32(kv_heads),
        f"{arch}.attention.layer_norm_rms_epsilon": f32(config["rms_norm_eps"]),
        f"{arch}.context_length": u32(config["max_position_embeddings"]),
        f"{arch}.rope.freq_base": f32(config["rope_theta"]),
        f"{arch}.rope.dimension_count": u32(config["head_dim"]),
        f"{arch}.vocab_size": u32(len(tokens)),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": mx.array(
            [3 if i in special else 1 for i in range(len(tokens))], dtype=mx.int32
        ),
        "tokenizer.ggml.bos_token_id": u32(vocab["<|im_start|>"]),
        "tokenizer.ggml.eos_token_id": u32(vocab["<|im_end|>"]),
        "tokenizer.ggml.padding_token_id": u32(vocab["<|im_end|>"]),
        "tokenizer.ggml.unknown_token_id": u32(vocab["<|endoftext|>"]),
        "tokenizer.ggml.add_bos_token": mx.array(False),
        "tokenizer.chat_template": tok_config["chat_template"],
    }
    metadata.update(metadata_overrides or {})
    mx.save_gguf(str(out), tensors, metadata)
    return out
