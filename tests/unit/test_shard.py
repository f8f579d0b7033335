"""Shards: stages run one after another give exactly mlx-lm's full-model logits, for the
prompt and for cached decode steps, and a stage loads only its own part of the weights."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models.cache import make_prompt_cache

from mlx_relay.core.errors import ShardMismatch
from mlx_relay.core.types import LayerRange
from mlx_relay.model.load import load_model
from mlx_relay.model.shard import (
    ATTENTION_WINDOW_STEP,
    Shard,
    attention_window,
    parameter_arrays,
)
from tests.support.tiny_model import VARIANTS, make_tiny_model_dir

PROMPT = [5, 17, 42, 3, 99, 7, 250, 11, 64]
DECODE = [8, 120, 33, 2]

SPLITS = [
    [LayerRange(0, 1), LayerRange(1, 4)],
    [LayerRange(0, 2), LayerRange(2, 4)],
    [LayerRange(0, 3), LayerRange(3, 4)],
    [LayerRange(0, 1), LayerRange(1, 3), LayerRange(3, 4)],
]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shard-models")
    return {
        name: make_tiny_model_dir(root / name, num_layers=4, seed=i, **kwargs)  # type: ignore[arg-type]
        for i, (name, kwargs) in enumerate(VARIANTS.items())
    }


def _mlx_lm_logits(path: Path, compute: str) -> list[mx.array]:
    model = load_model(path, compute=compute)
    cache = make_prompt_cache(model)
    logits = [model(mx.array([PROMPT]), cache=cache)]
    for token in DECODE:
        logits.append(model(mx.array([[token]]), cache=cache))
    mx.eval(logits)
    return logits


@pytest.fixture(scope="module")
def reference(model_dirs: dict[str, Path]) -> dict[str, list[mx.array]]:
    """mlx-lm's own full forward: prompt logits, then one set of logits per decode token."""
    return {name: _mlx_lm_logits(path, "quantized") for name, path in model_dirs.items()}


@pytest.fixture(scope="module")
def dense_reference(model_dirs: dict[str, Path]) -> dict[str, list[mx.array]]:
    """The same with the quantized variants dequantized to float32 (``model.compute``)."""
    return {name: _mlx_lm_logits(model_dirs[name], "float32") for name in QUANTIZED}


QUANTIZED = [name for name, kwargs in VARIANTS.items() if kwargs.get("quantize")]
# Every variant as stored; the quantized ones also on the dense float32 path.
COMPUTE_CASES = [(v, "quantized") for v in VARIANTS] + [(v, "float32") for v in QUANTIZED]


def _run_pipeline(stages: list[Shard], caches: list[list[object]], x: mx.array) -> mx.array:
    for stage, cache in zip(stages, caches, strict=True):
        x = stage(x, cache)
    return x


@pytest.mark.parametrize(("variant", "compute"), COMPUTE_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("split", SPLITS, ids=lambda s: "+".join(str(len(r)) for r in s))
def test_stages_reproduce_the_full_forward(
    variant: str,
    compute: str,
    split: list[LayerRange],
    model_dirs: dict[str, Path],
    reference: dict[str, list[mx.array]],
    dense_reference: dict[str, list[mx.array]],
) -> None:
    stages = [Shard.load(model_dirs[variant], r, compute) for r in split]
    caches = [s.make_cache() for s in stages]
    expected = (reference if compute == "quantized" else dense_reference)[variant]
    if variant in QUANTIZED:
        assert {s.compute for s in stages} == {compute}

    got = _run_pipeline(stages, caches, mx.array([PROMPT]))
    assert got.shape == (1, len(PROMPT), stages[-1].vocab_size)
    assert mx.array_equal(got, expected[0]).item()
    for step, token in enumerate(DECODE, start=1):
        got = _run_pipeline(stages, caches, mx.array([[token]], dtype=mx.int32))
        assert mx.array_equal(got, expected[step]).item(), f"decode step {step} differs"
    assert Shard.cache_offset(caches[-1]) == len(PROMPT) + len(DECODE)


def test_stage_properties_and_hidden_states(model_dirs: dict[str, Path]) -> None:
    first = Shard.load(model_dirs["llama"], LayerRange(0, 1))
    middle = Shard.load(model_dirs["llama"], LayerRange(1, 3))
    last = Shard.load(model_dirs["llama"], LayerRange(3, 4))
    assert (first.is_first, first.is_last) == (True, False)
    assert (middle.is_first, middle.is_last) == (False, False)
    assert (last.is_first, last.is_last) == (False, True)
    assert {s.num_layers for s in (first, middle, last)} == {4}
    assert first.hidden_size == 64
    assert first.dtype == mx.float32
    assert len(middle.make_cache()) == 2

    hidden = first(mx.array([PROMPT[:3]]), first.make_cache())
    assert hidden.shape == (1, 3, 64)
    assert hidden.dtype == first.dtype
    hidden = middle(hidden, middle.make_cache())
    assert hidden.shape == (1, 3, 64)
    assert last(hidden, last.make_cache()).shape == (1, 3, last.vocab_size)


@pytest.mark.parametrize("variant", ["llama", "qwen3-4bit"])
def test_last_position_only_gives_the_last_row_of_the_logits(
    variant: str, model_dirs: dict[str, Path], reference: dict[str, list[mx.array]]
) -> None:
    stages = [Shard.load(model_dirs[variant], r) for r in SPLITS[1]]
    caches = [s.make_cache() for s in stages]
    hidden = stages[0](mx.array([PROMPT]), caches[0])
    got = stages[1](hidden, caches[1], last_position_only=True)
    assert got.shape == (1, 1, stages[1].vocab_size)
    assert mx.allclose(got[0, -1], reference[variant][0][0, -1], atol=1e-5).item()
    # The cache still holds every position, so decoding goes on exactly as before.
    hidden = stages[0](mx.array([[DECODE[0]]], dtype=mx.int32), caches[0])
    got = stages[1](hidden, caches[1], last_position_only=True)
    assert mx.array_equal(got, reference[variant][1]).item()


def test_a_later_stage_casts_hidden_states_of_another_float_type(
    model_dirs: dict[str, Path],
) -> None:
    first = Shard.load(model_dirs["llama"], LayerRange(0, 2))
    last = Shard.load(model_dirs["llama"], LayerRange(2, 4))
    hidden = first(mx.array([PROMPT]), first.make_cache())
    as_f32 = last(hidden, last.make_cache())
    as_f16 = last(hidden.astype(mx.float16), last.make_cache())
    assert as_f16.dtype == mx.float32
    assert mx.array_equal(
        as_f16, last(hidden.astype(mx.float16).astype(mx.float32), last.make_cache())
    ).item()
    assert mx.allclose(as_f16, as_f32, atol=0.05).item()


def _parameter_names(module: nn.Module) -> set[str]:
    from mlx.utils import tree_flatten

    return {name for name, _ in tree_flatten(module.parameters())}


def _bytes(module: nn.Module) -> int:
    return sum(a.nbytes for a in parameter_arrays(module))


def test_partial_load_materialises_only_the_stage(model_dirs: dict[str, Path]) -> None:
    path = model_dirs["llama"]  # untied: separate lm_head
    full = load_model(path)
    middle = load_model(path, LayerRange(1, 3))

    assert middle.model.layers[0] is None and middle.model.layers[3] is None
    names = _parameter_names(middle)
    assert names, "the stage's own layers must be loaded"
    assert all(n.startswith(("model.layers.1.", "model.layers.2.")) for n in names)
    assert _bytes(middle) == _bytes(full.model.layers[1]) + _bytes(full.model.layers[2])

    first = load_model(path, LayerRange(0, 1))
    assert {n.split(".")[1] for n in _parameter_names(first)} == {"embed_tokens", "layers"}
    assert "lm_head" not in first and "norm" not in first.model

    last = load_model(path, LayerRange(3, 4))
    tops = {".".join(n.split(".")[:2]) for n in _parameter_names(last)}
    assert tops == {"model.layers", "model.norm", "lm_head.weight"}
    assert "embed_tokens" not in last.model

    # Every layer is held by exactly one stage; the embedding and head by one each.
    assert _bytes(first) + _bytes(middle) + _bytes(last) == _bytes(full)


def test_last_stage_keeps_a_tied_embedding_as_its_head(model_dirs: dict[str, Path]) -> None:
    path = model_dirs["qwen3-4bit"]  # tied embeddings, quantized
    last = load_model(path, LayerRange(2, 4))
    assert "embed_tokens" in last.model and "lm_head" not in last
    middle = load_model(path, LayerRange(1, 3))
    assert "embed_tokens" not in middle.model
    full = load_model(path)
    embedding = _bytes(full.model.embed_tokens)
    assert _bytes(last) == embedding + _bytes(full.model.norm) + sum(
        _bytes(full.model.layers[i]) for i in (2, 3)
    )


def test_stage_rejects_inputs_that_do_not_fit(model_dirs: dict[str, Path]) -> None:
    first = Shard.load(model_dirs["llama"], LayerRange(0, 2))
    last = Shard.load(model_dirs["llama"], LayerRange(2, 4))
    with pytest.raises(ShardMismatch, match="integer token ids"):
        first(mx.zeros((1, 3, 64)), first.make_cache())
    with pytest.raises(ShardMismatch, match=r"takes hidden states \(B, L, 64\), got \(1, 3, 32\)"):
        last(mx.zeros((1, 3, 32)), last.make_cache())
    with pytest.raises(ShardMismatch, match=r"takes hidden states"):
        last(mx.array([[1, 2, 3]]), last.make_cache())
    with pytest.raises(ShardMismatch, match="expected 2 caches, got 1"):
        last(mx.zeros((1, 3, 64)), last.make_cache()[:1])


def test_stage_refuses_layers_that_are_missing_or_out_of_range(
    model_dirs: dict[str, Path],
) -> None:
    model = load_model(model_dirs["llama"], LayerRange(0, 2))
    with pytest.raises(ShardMismatch, match=r"layers \[2, 3\] of \[1, 4\) were not loaded"):
        Shard(model, LayerRange(1, 4))
    with pytest.raises(ShardMismatch, match="do not fit a model with 4 layers"):
        Shard(model, LayerRange(0, 5))
    with pytest.raises(ShardMismatch, match="do not fit a model with 4 layers"):
        load_model(model_dirs["llama"], LayerRange(2, 6))


@pytest.mark.parametrize("compute", ["quantized", "float32"])
def test_compiled_decode_steps_across_attention_windows_match_mlx_lm(
    model_dirs: dict[str, Path], compute: str
) -> None:
    # Positions 62..66 cross the first attention window of the compiled step (64 positions)
    # inside one 256-position KV buffer: every step gives mlx-lm's logits exactly.
    variant = QUANTIZED[0]
    prompt = [(7 * i + 3) % 200 + 1 for i in range(ATTENTION_WINDOW_STEP - 2)]
    model = load_model(model_dirs[variant], compute=compute)
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([prompt]), cache=cache))
    stage = Shard.load(model_dirs[variant], LayerRange(0, 4), compute)
    assert stage.compiled
    stage_cache = stage.make_cache()
    mx.eval(stage(mx.array([prompt]), stage_cache))
    for token in [8, 120, 33, 2, 77]:
        step = mx.array([[token]], dtype=mx.int32)
        expected, got = model(step, cache=cache), stage(step, stage_cache)
        assert mx.array_equal(got, expected).item(), f"position {Shard.cache_offset(stage_cache)}"
    assert stage_cache[0].keys.shape[2] == 256
    assert attention_window(ATTENTION_WINDOW_STEP + 1) == 2 * ATTENTION_WINDOW_STEP
