"""The bundled SmolLM2-135M-Instruct, imported from its GGUF: it matches the file's metadata,
answers a question correctly, tokenizes like llama.cpp, and splits into stages exactly.

A decode step costs ~170 ms on a CI core, so generations here stay short.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache

from mlx_relay.core.types import LayerRange
from mlx_relay.model.generate import generate_tokens
from mlx_relay.model.gguf import read_gguf
from mlx_relay.model.load import BUNDLED_MODEL_NAME, bundled_gguf_path, load_model, read_model_info
from mlx_relay.model.shard import Shard, parameter_arrays
from mlx_relay.model.tokenizer import encode_prompt, eos_token_ids, load_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def full_model(bundled_model_dir: Path) -> Any:
    return load_model(bundled_model_dir)


@pytest.fixture(scope="module")
def tokenizer(bundled_model_dir: Path) -> Any:
    return load_tokenizer(bundled_model_dir)


def test_import_matches_the_gguf_metadata(bundled_model_dir: Path) -> None:
    _, metadata = read_gguf(bundled_gguf_path())
    info = read_model_info(bundled_model_dir)
    assert info.name == BUNDLED_MODEL_NAME
    assert info.model_type == "llama"
    assert info.num_layers == metadata["llama.block_count"].item() == 30
    assert info.hidden_size == metadata["llama.embedding_length"].item() == 576
    assert info.vocab_size == len(metadata["tokenizer.ggml.tokens"]) == 49152
    assert info.max_context == metadata["llama.context_length"].item() == 8192
    assert info.quantization == "4bit"
    config = json.loads((bundled_model_dir / "config.json").read_text())
    assert config["num_attention_heads"] == metadata["llama.attention.head_count"].item()
    assert config["num_key_value_heads"] == metadata["llama.attention.head_count_kv"].item()
    assert config["intermediate_size"] == metadata["llama.feed_forward_length"].item()
    assert config["rope_theta"] == metadata["llama.rope.freq_base"].item()
    assert config["rope_traditional"] is True
    assert config["tie_word_embeddings"] is True
    assert config["quantization"] == {
        "group_size": 32,
        "bits": 4,
        "model.embed_tokens": {"group_size": 32, "bits": 8},
    }


def test_greedy_chat_answers_paris(full_model: Any, tokenizer: Any) -> None:
    ids = encode_prompt(tokenizer, "What is the capital of France?")
    eos = eos_token_ids(tokenizer)
    tokens = [t.token_id for t in generate_tokens(full_model, ids, 12, eos_ids=eos)]
    assert tokens[-1] in eos
    text = tokenizer.decode(tokens[:-1])
    assert "Paris" in text
    assert text == "The capital of France is Paris."


def test_tokenizer_round_trips_text_and_special_tokens(tokenizer: Any) -> None:
    tok = tokenizer
    text = "héllo wörld — 東京 🚀"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode("<|im_start|>") == [1]
    assert tok.decode([1]) == "<|im_start|>"
    assert tok.encode("<|im_end|>\n") == [2, 198]
    # Digits are split one by one (tokenizer.ggml.pre = "smollm"), and no BOS is added.
    assert tok.encode("12345") == [33, 34, 35, 36, 37]
    assert eos_token_ids(tok) == {2}
    chat = encode_prompt(tok, "What is the capital of France?")
    assert chat[:3] == [1, 9690, 198]  # <|im_start|>system\n from the GGUF's chat template
    assert tok.decode(chat).endswith("<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def prompt(tokenizer: Any) -> list[int]:
    return list(tokenizer.encode("The capital of France is"))


@pytest.fixture(scope="module")
def reference_logits(full_model: Any, prompt: list[int]) -> list[mx.array]:
    cache = make_prompt_cache(full_model)
    out = [full_model(mx.array([prompt]), cache=cache)]
    for token in DECODE:
        out.append(full_model(mx.array([[token]]), cache=cache))
    mx.eval(out)
    return out


DECODE = [7042, 30, 2]


@pytest.mark.parametrize(
    "split",
    [
        [LayerRange(0, 7), LayerRange(7, 30)],
        [LayerRange(0, 22), LayerRange(22, 30)],
        [LayerRange(0, 10), LayerRange(10, 20), LayerRange(20, 30)],
    ],
    ids=["7+23", "22+8", "10+10+10"],
)
def test_stages_reproduce_the_full_forward(
    bundled_model_dir: Path,
    prompt: list[int],
    reference_logits: list[mx.array],
    split: list[LayerRange],
) -> None:
    stages = [Shard.load(bundled_model_dir, r) for r in split]
    caches = [s.make_cache() for s in stages]
    inputs = [mx.array([prompt]), *(mx.array([[t]]) for t in DECODE)]
    for step, (x, expected) in enumerate(zip(inputs, reference_logits, strict=True)):
        for stage, cache in zip(stages, caches, strict=True):
            x = stage(x, cache)
        assert mx.array_equal(x, expected).item(), f"step {step} differs"
    assert all(s.dtype == mx.float32 for s in stages)


def test_stage_loads_only_its_share(bundled_model_dir: Path, full_model: Any) -> None:
    middle = load_model(bundled_model_dir, LayerRange(10, 20))
    layers = full_model.model.layers

    def nbytes(module: Any) -> int:
        return sum(a.nbytes for a in parameter_arrays(module))

    assert all(middle.model.layers[i] is None for i in (*range(10), *range(20, 30)))
    assert "embed_tokens" not in middle.model
    per_layer = nbytes(layers[0])
    assert nbytes(middle) == 10 * per_layer
    assert nbytes(middle) < nbytes(full_model) / 3  # the embedding stays with the end stages
