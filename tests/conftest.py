"""Shared fixtures: a tiny random-weight model made once per session, and the bundled model."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlx_relay.core.blas import load_blas

# Before anything imports mlx.core, so that the tests' float32 matmuls use the system BLAS
# as the worker and CLI processes do.
load_blas()


@pytest.fixture(scope="session", autouse=True)
def _state_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep the default history store (``$XDG_STATE_HOME``) out of the user's home."""
    previous = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state"))
    yield
    if previous is None:
        os.environ.pop("XDG_STATE_HOME", None)
    else:
        os.environ["XDG_STATE_HOME"] = previous


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer random-weight llama model directory (config, safetensors, tokenizer)."""
    from tests.support.tiny_model import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"), arch="llama", num_layers=4)


@pytest.fixture(scope="session")
def bundled_model_dir() -> Path:
    """The bundled SmolLM2-135M-Instruct, imported into the cache on first use."""
    from mlx_relay.core.config import ModelConfig
    from mlx_relay.model.load import resolve_model_dir

    return resolve_model_dir(ModelConfig(), progress=False)


@pytest.fixture
def output_dir(request: pytest.FixtureRequest) -> Path:
    """A per-test directory under test-output/ for screenshots and logs kept after the run."""
    root = Path(__file__).resolve().parent.parent / "test-output"
    path = root / request.node.nodeid.replace("/", "_").replace("::", "__")
    path.mkdir(parents=True, exist_ok=True)
    return path
