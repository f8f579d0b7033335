"""The bundled SmolLM2-135M-Instruct, imported from its GGUF: it matches the file's metadata,
answers a question correctly, tokenizes like llama.cpp, splits into stages exactly on both
compute paths, and its dense float32 path picks the quantized path's greedy tokens.

A quantized decode step costs ~170 ms on a CI core, so generations here stay short.
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


DECODE = [7042, 30, 2]
COMPUTE = ["quantized", "float32"]


def _run(stages: list[Shard], inputs: list[mx.array]) -> list[mx.array]:
    caches = [s.make_cache() for s in stages]
    out = []
    for x in inputs:
        for stage, cache in zip(stages, caches, strict=True):
            x = stage(x, cache)
        out.append(x)
    mx.eval(out)
    return out


@pytest.fixture(scope="module")
def models(bundled_model_dir: Path, full_model: Any) -> dict[str, Any]:
    """The whole model per compute path (stages below share its arrays: loading each
    stage's share on its own is tested with workers and in tests/unit/test_backend.py)."""
    return {"quantized": full_model, "float32": load_model(bundled_model_dir, compute="float32")}


@pytest.fixture(scope="module")
def whole_model_logits(models: dict[str, Any], prompt: list[int]) -> dict[str, list[mx.array]]:
    """The whole model as one stage, per compute path: prompt logits, then decode steps."""
    inputs = [mx.array([prompt]), *(mx.array([[t]]) for t in DECODE)]
    return {
        compute: _run([Shard(models[compute], LayerRange(0, 30))], inputs) for compute in COMPUTE
    }


@pytest.mark.parametrize("compute", COMPUTE)
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
    models: dict[str, Any],
    prompt: list[int],
    whole_model_logits: dict[str, list[mx.array]],
    split: list[LayerRange],
    compute: str,
) -> None:
    stages = [Shard(models[compute], r) for r in split]
    inputs = [mx.array([prompt]), *(mx.array([[t]]) for t in DECODE)]
    got = _run(stages, inputs)
    for step, expected in enumerate(whole_model_logits[compute]):
        assert mx.array_equal(got[step], expected).item(), f"step {step} differs"
    assert all(s.dtype == mx.float32 for s in stages)
    assert {s.compute for s in stages} == {compute}


@pytest.mark.parametrize("compute", COMPUTE)
def test_a_stage_computes_what_mlx_lm_computes(
    models: dict[str, Any],
    prompt: list[int],
    whole_model_logits: dict[str, list[mx.array]],
    compute: str,
) -> None:
    # mlx-lm's own forward: the prompt exactly; compiled decode steps attend over the used
    # positions rounded up to an attention window, the tail masked, so they agree to float32
    # rounding.
    model = models[compute]
    cache = make_prompt_cache(model)
    expected = [model(mx.array([prompt]), cache=cache)]
    expected += [model(mx.array([[t]]), cache=cache) for t in DECODE]
    got = whole_model_logits[compute]
    assert mx.array_equal(got[0], expected[0]).item()
    for step in range(1, len(expected)):
        assert mx.allclose(got[step], expected[step], atol=1e-3).item(), f"step {step}"
        assert mx.argmax(got[step][0, -1]).item() == mx.argmax(expected[step][0, -1]).item()


CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a CPU does.",
    "List three fruits.",
]


def test_float32_compute_picks_the_quantized_greedy_tokens(
    models: dict[str, Any], full_model: Any, tokenizer: Any
) -> None:
    dense = models["float32"]
    assert Shard(dense, LayerRange(0, 30)).compute == "float32"
    assert Shard(full_model, LayerRange(0, 30)).compute == "quantized"
    for chat in CHATS:
        ids = encode_prompt(tokenizer, chat)
        quantized = [t.token_id for t in generate_tokens(full_model, ids, 24)]
        assert len(quantized) == 24
        assert [t.token_id for t in generate_tokens(dense, ids, 24)] == quantized, chat


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
