"""GGUF import on a tiny model written the way llama.cpp writes one (q/k rows permuted for
interleaved rotary embeddings, byte-level BPE vocabulary and merges in the metadata): the
imported directory gives the original model's logits and token ids, is written atomically
and is imported only once."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache

from mlx_relay.core.config import ModelConfig
from mlx_relay.core.errors import ModelError, ModelNotFound, UnsupportedArchitecture
from mlx_relay.model import import_cache
from mlx_relay.model.load import (
    import_gguf,
    load_model,
    read_model_info,
    resolve_model_dir,
)
from mlx_relay.model.tokenizer import encode_prompt, eos_token_ids, load_tokenizer
from tests.support.tiny_model import make_tiny_model_dir, write_gguf


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("gguf-source"), arch="llama", seed=3)


@pytest.fixture(scope="module")
def gguf_file(source_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gguf(source_dir, tmp_path_factory.mktemp("gguf") / "tiny-llama.Q0.gguf")


@pytest.fixture(scope="module")
def imported(gguf_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return import_gguf(gguf_file, tmp_path_factory.mktemp("imported") / "tiny", progress=False)


def test_imported_config_describes_the_gguf(imported: Path, source_dir: Path) -> None:
    config = json.loads((imported / "config.json").read_text())
    source = json.loads((source_dir / "config.json").read_text())
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "max_position_embeddings",
        "rope_theta",
        "rms_norm_eps",
    ):
        assert config[key] == source[key], key
    assert config["model_type"] == "llama"
    assert config["rope_traditional"] is True
    assert config["tie_word_embeddings"] is False
    assert "quantization" not in config
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    info = read_model_info(imported)
    assert (info.name, info.num_layers, info.quantization, info.dtype) == (
        "tiny-llama.Q0",
        4,
        "none",
        "float32",
    )


def test_imported_model_gives_the_original_logits(imported: Path, source_dir: Path) -> None:
    original, converted = load_model(source_dir), load_model(imported)
    names = {n for n, _ in tree_flatten(converted.parameters())}
    assert names == {n for n, _ in tree_flatten(original.parameters())}
    caches = make_prompt_cache(original), make_prompt_cache(converted)
    inputs = [mx.array([[5, 17, 42, 3, 99, 7]]), mx.array([[8]]), mx.array([[120]])]
    for x in inputs:
        expected, got = original(x, cache=caches[0]), converted(x, cache=caches[1])
        # Same math; only the order of the q.k sums within a head differs.
        assert mx.allclose(got, expected, atol=1e-4, rtol=1e-4).item()
        assert mx.array_equal(mx.argmax(got, axis=-1), mx.argmax(expected, axis=-1)).item()


def test_imported_tokenizer_matches_the_original(imported: Path, source_dir: Path) -> None:
    original, converted = load_tokenizer(source_dir), load_tokenizer(imported)
    for text in [
        "héllo wörld — 東京 🚀",
        "The capital of France is Paris. 42 1234",
        "a<|im_end|>b",
    ]:
        assert converted.encode(text) == original.encode(text)
        assert converted.decode(converted.encode(text)) == text
    prompt = encode_prompt(converted, "What is the capital of France?")
    assert prompt == encode_prompt(original, "What is the capital of France?")
    assert eos_token_ids(converted) == eos_token_ids(original) == {2}
    assert converted.convert_tokens_to_ids("<|im_start|>") == 1


def test_resolve_imports_a_gguf_once(
    gguf_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = ModelConfig(path=str(gguf_file), cache_dir=str(tmp_path / "cache"))
    model_dir = resolve_model_dir(model, progress=False)
    assert model_dir == tmp_path / "cache" / "tiny-llama.Q0"
    assert read_model_info(model_dir).num_layers == 4

    def fail(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("imported again")

    monkeypatch.setattr(import_cache, "convert_gguf", fail)
    assert resolve_model_dir(model, progress=False) == model_dir

    # The same file touched, or copied to another path (another checkout sharing the cache):
    # not imported again.
    stat = gguf_file.stat()
    os.utime(gguf_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert resolve_model_dir(model, progress=False) == model_dir
    copy = tmp_path / "elsewhere" / gguf_file.name
    copy.parent.mkdir()
    shutil.copyfile(gguf_file, copy)
    moved = ModelConfig(path=str(copy), cache_dir=str(tmp_path / "cache"))
    assert resolve_model_dir(moved, progress=False) == model_dir

    # A changed source file is imported again.
    calls: list[Path] = []
    monkeypatch.setattr(import_cache, "convert_gguf", _recording_convert(calls))
    with copy.open("ab") as fh:
        fh.write(bytes(64))
    assert resolve_model_dir(moved, progress=False) == model_dir
    assert calls == [copy]
    assert (model_dir / "config.json").is_file()
    assert sorted(p.name for p in model_dir.parent.iterdir()) == ["tiny-llama.Q0"]


def _recording_convert(calls: list[Path]) -> Any:
    from mlx_relay.model.gguf import convert_gguf

    def convert(gguf: Path, out_dir: Path, step: Any = None) -> dict[str, Any]:
        calls.append(gguf)
        return convert_gguf(gguf, out_dir, step=step)

    return convert


def test_failed_import_leaves_nothing_behind(
    gguf_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(gguf: Path, out_dir: Path, step: Any = None) -> None:
        (out_dir / "config.json").write_text("{}")
        raise ModelError("disk full")

    monkeypatch.setattr(import_cache, "convert_gguf", broken)
    with pytest.raises(ModelError, match="disk full"):
        import_gguf(gguf_file, tmp_path / "out" / "model", progress=False)
    assert list((tmp_path / "out").iterdir()) == []


def test_import_replaces_a_previous_import_but_nothing_else(
    gguf_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "model"
    assert import_gguf(gguf_file, out, progress=False) == out
    (out / "leftover.txt").write_text("from the previous import")
    assert import_gguf(gguf_file, out, progress=False) == out
    assert not (out / "leftover.txt").exists()
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ModelError, match="is not a model imported by mlx-relay"):
        import_gguf(gguf_file, mine, progress=False)
    assert (mine / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (import_gguf(gguf_file, empty, progress=False) / "config.json").is_file()


def test_unsupported_gguf_architecture(source_dir: Path, tmp_path: Path) -> None:
    gguf = write_gguf(source_dir, tmp_path / "odd.gguf", arch="gptneox")
    with pytest.raises(UnsupportedArchitecture, match=r"'gptneox' is not supported.*llama"):
        import_gguf(gguf, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_unknown_tensor_is_reported(source_dir: Path, tmp_path: Path) -> None:
    gguf = write_gguf(source_dir, tmp_path / "extra.gguf", extra={"rope_freqs.weight": mx.ones(8)})
    with pytest.raises(ModelError, match=r"'rope_freqs.weight' has no counterpart"):
        import_gguf(gguf, tmp_path / "out", progress=False)


def test_missing_or_invalid_gguf(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="GGUF file not found"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "out", progress=False)
    with pytest.raises(ModelNotFound, match="GGUF file not found"):
        resolve_model_dir(ModelConfig(path=str(tmp_path / "missing.gguf")), progress=False)
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelError, match="cannot read GGUF file"):
        import_gguf(bogus, tmp_path / "out", progress=False)


def test_bos_is_added_when_the_gguf_asks_for_it(source_dir: Path, tmp_path: Path) -> None:
    gguf = write_gguf(
        source_dir,
        tmp_path / "bos.gguf",
        metadata_overrides={"tokenizer.ggml.add_bos_token": mx.array(True)},
    )
    tokenizer = load_tokenizer(import_gguf(gguf, tmp_path / "out", progress=False))
    ids = tokenizer.encode("hello world")
    assert ids[0] == 1
    assert tokenizer.decode(ids[1:]) == "hello world"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hello world"


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"tokenizer.ggml.pre": "llama-bpe"}, "pre-tokenizer 'llama-bpe' is not supported"),
        ({"tokenizer.ggml.model": "llama"}, "tokenizer model 'llama' is not supported"),
    ],
)
def test_tokenizers_that_cannot_be_rebuilt_exactly_are_refused(
    source_dir: Path, tmp_path: Path, metadata: dict[str, str], message: str
) -> None:
    gguf = write_gguf(source_dir, tmp_path / "t.gguf", metadata_overrides=metadata)
    with pytest.raises(ModelError, match=message):
        import_gguf(gguf, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
