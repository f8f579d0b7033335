"""Tokenizer files (tokenizer.json, tokenizer_config.json, ...) from a GGUF file's metadata.

A GGUF ``gpt2`` tokenizer is a byte-level BPE: its vocabulary and merges are stored as
strings, and the tokens of type 3 (control) are the special tokens. We rebuild it with the
``tokenizers`` library so that mlx-lm's loader (transformers' fast tokenizer) reads it back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from mlx_relay.core.errors import ModelError

# llama.cpp's token types; control tokens are what Hugging Face calls special tokens.
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# llama.cpp pre-tokenizer names we can rebuild exactly: GPT-2's split rules, and the same
# after splitting every digit on its own ("smollm"). Others (llama3, qwen2, ...) use other
# rules; importing them approximately would change token ids, so they are refused.
_DIGIT_SPLITTING_PRE = {"smollm"}
_GPT2_STYLE_PRE = {"gpt-2", *_DIGIT_SPLITTING_PRE}


def write_tokenizer_files(
    metadata: dict[str, Any], out_dir: Path, max_length: int
) -> dict[str, int]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json.

    Args:
        metadata: The GGUF metadata as returned by ``mx.load(..., return_metadata=True)``.
        out_dir: The model directory being written.
        max_length: The model's context length (``model_max_length``).

    Returns:
        The special token ids found (``bos_token_id``, ``eos_token_id``, ...), for config.json.

    Raises:
        ModelError: The GGUF holds no tokenizer, or one that is not byte-level BPE.
    """
    kind = metadata.get("tokenizer.ggml.model")
    if kind is None:
        raise ModelError("the GGUF file holds no tokenizer (tokenizer.ggml.model is missing)")
    if kind != "gpt2":
        raise ModelError(
            f"the GGUF tokenizer model {kind!r} is not supported; only byte-level BPE "
            "('gpt2') tokenizers can be imported"
        )
    pre = str(metadata.get("tokenizer.ggml.pre", "gpt-2"))
    if pre not in _GPT2_STYLE_PRE:
        raise ModelError(
            f"the GGUF pre-tokenizer {pre!r} is not supported "
            f"(supported: {', '.join(sorted(_GPT2_STYLE_PRE))})"
        )
    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    types = _as_list(metadata.get("tokenizer.ggml.token_type"), default=[1] * len(tokens))
    special = [
        i for i, t in enumerate(types) if t in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED)
    ]

    bpe = models.BPE(
        vocab={tok: i for i, tok in enumerate(tokens)},
        merges=merges,
        fuse_unk=False,
        byte_fallback=False,
    )
    tokenizer = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLITTING_PRE:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    add_bos = bool(_scalar(metadata.get("tokenizer.ggml.add_bos_token", False)))
    bos_id = metadata.get("tokenizer.ggml.bos_token_id")
    post: list[Any] = [processors.ByteLevel(trim_offsets=False)]
    if add_bos and bos_id is not None:
        bos = tokens[int(_scalar(bos_id))]
        post.append(
            processors.TemplateProcessing(
                single=f"{bos} $A",
                pair=f"{bos} $A {bos} $B",
                special_tokens=[(bos, int(_scalar(bos_id)))],
            )
        )
    tokenizer.post_processor = post[0] if len(post) == 1 else processors.Sequence(post)
    tokenizer.add_special_tokens(
        [
            AddedToken(tokens[i], special=types[i] == _TOKEN_TYPE_CONTROL, normalized=False)
            for i in special
        ]
    )
    tokenizer.save(str(out_dir / "tokenizer.json"))

    ids = {
        name: int(_scalar(metadata[f"tokenizer.ggml.{key}"]))
        for name, key in (
            ("bos_token_id", "bos_token_id"),
            ("eos_token_id", "eos_token_id"),
            ("pad_token_id", "padding_token_id"),
            ("unk_token_id", "unknown_token_id"),
        )
        if f"tokenizer.ggml.{key}" in metadata
    }
    special_map = {
        name.removesuffix("_id"): tokens[token_id]
        for name, token_id in ids.items()
        if 0 <= token_id < len(tokens)
    }
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": bool(_scalar(metadata.get("tokenizer.ggml.add_eos_token", False))),
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        **special_map,
        "added_tokens_decoder": {
            str(i): {
                "content": tokens[i],
                "special": types[i] == _TOKEN_TYPE_CONTROL,
                "normalized": False,
                "lstrip": False,
                "rstrip": False,
                "single_word": False,
            }
            for i in special
        },
    }
    template = metadata.get("tokenizer.chat_template")
    if isinstance(template, str):
        config["chat_template"] = template
    _write_json(out_dir / "tokenizer_config.json", config)
    _write_json(out_dir / "special_tokens_map.json", special_map)
    return ids


def _scalar(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _as_list(value: Any, default: list[int]) -> list[int]:
    if value is None:
        return default
    return [int(v) for v in (value.tolist() if hasattr(value, "tolist") else value)]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
