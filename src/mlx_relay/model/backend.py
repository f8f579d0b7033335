"""Which device MLX computes on, whether its CPU matmuls use a real BLAS, and which weights
(quantized as stored, or dense float32) a stage computes with.

On the CPU backend MLX's quantized matmul is a scalar loop, while dense float32 matmuls go
to the BLAS: ``auto`` picks float32 there when the dense weights fit, and keeps the stored
(quantized) weights on GPU backends, whose quantized kernels are fast.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mlx_relay.core.blas import BlasLibrary, defining_file, loaded_blas, loaded_in_process

logger = logging.getLogger(__name__)

Compute = Literal["quantized", "float32"]


@dataclass(frozen=True)
class ComputeChoice:
    """The weights a stage computes with, and why (for the one INFO line at load)."""

    compute: Compute
    reason: str


def backend_name() -> str:
    """``cpu``, ``metal`` or ``cuda``: where MLX computes by default in this process."""
    if mx.default_device().type == mx.DeviceType.cpu:
        return "cpu"
    return "metal" if mx.metal.is_available() else "cuda"


def choose_compute(
    setting: str,
    backend: str,
    dense_bytes: int,
    available_bytes: int,
    share: float,
    quantized: bool,
) -> ComputeChoice:
    """Resolve ``model.compute`` for one stage (pure).

    Args:
        setting: ``auto``, ``quantized`` or ``float32``.
        backend: From :func:`backend_name`.
        dense_bytes: This stage's weights as dense float32.
        available_bytes: Memory available on this machine.
        share: The most of ``available_bytes`` dense weights may take under ``auto``.
        quantized: Whether the stored weights are quantized at all.
    """
    if setting == "quantized":
        return ComputeChoice("quantized", "model.compute is 'quantized'")
    if setting == "float32":
        return ComputeChoice("float32", "model.compute is 'float32'")
    if backend != "cpu":
        return ComputeChoice("quantized", f"the {backend} backend has fast quantized kernels")
    if not quantized:
        return ComputeChoice("float32", "the stored weights are not quantized")
    budget = int(available_bytes * share)
    gib = 1024**3
    if dense_bytes <= budget:
        return ComputeChoice(
            "float32",
            f"CPU backend: dense float32 weights ({dense_bytes / gib:.2f} GiB) fit "
            f"{share:.0%} of the available memory ({available_bytes / gib:.1f} GiB)",
        )
    return ComputeChoice(
        "quantized",
        f"CPU backend: dense float32 weights ({dense_bytes / gib:.2f} GiB) exceed "
        f"{share:.0%} of the available memory ({available_bytes / gib:.1f} GiB)",
    )


def is_quantized(model: nn.Module) -> bool:
    """Whether any layer of ``model`` holds quantized weights."""
    return any(
        isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding) for _, m in model.named_modules()
    )


def dense_bytes(model: nn.Module) -> int:
    """Bytes ``model``'s parameters take as dense float32 (nothing is evaluated)."""
    total = 0
    quantized_params: set[int] = set()
    for _, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear | nn.QuantizedEmbedding):
            out_dim, packed = module.weight.shape
            total += out_dim * packed * 32 // module.bits * 4
            quantized_params.update(
                id(module[k]) for k in ("weight", "scales", "biases") if k in module
            )
    flat: list[tuple[str, object]] = tree_flatten(model.parameters())  # type: ignore[assignment]
    for _, value in flat:
        if isinstance(value, mx.array) and id(value) not in quantized_params:
            total += value.size * 4
    return total


def to_float32(model: nn.Module) -> nn.Module:
    """Dequantize ``model``'s layers and cast every float parameter to float32 (lazily)."""
    from mlx_lm.utils import dequantize_model

    model = dequantize_model(model)
    model.update(
        tree_map(
            lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p,
            model.parameters(),
        )
    )
    return model


# The alignment :func:`align_weights` gives dense weights: a cache line, the width of the
# router's vectors on AVX-512 machines.
WEIGHT_ALIGNMENT = 64


def align_weights(model: nn.Module) -> int:
    """Move ``model``'s evaluated float32 matrices to memory starting on a cache line; returns
    how many moved.

    MLX's CPU arrays start 8 bytes past a 16-byte boundary, so every vector load of a row
    spans two cache lines: the BLAS router's kernel then runs at about two thirds of its speed
    at 16 rows and half at 128 (the bundled model's shapes). Each matrix is copied into a
    buffer a cache line longer, at the offset where it starts aligned, and the model keeps a
    view of it (same values, same shape). One matrix at a time, the old one released before
    the next is copied: memory grows by one matrix at most. A matrix is left as it is when
    the copy does not land in place.
    """
    moved = 0
    for name in [name for name, _ in _parameters(model)]:
        value = dict(_parameters(model))[name]
        if (
            not isinstance(value, mx.array)
            or value.ndim < 2
            or value.dtype != mx.float32
            or value.size < 4096
        ):
            continue
        out = _aligned_copy(value)
        if out is not value:
            model.update(tree_unflatten([(name, out)]))
            moved += 1
        del value, out
    return moved


def _parameters(model: nn.Module) -> list[tuple[str, object]]:
    flat: list[tuple[str, object]] = tree_flatten(model.parameters())  # type: ignore[assignment]
    return flat


def data_address(array: mx.array) -> int:
    """Where an evaluated, contiguous array's first element lies in memory."""
    import numpy as np

    return int(np.asarray(array).__array_interface__["data"][0])


def _aligned_copy(value: mx.array) -> mx.array:
    if data_address(value) % WEIGHT_ALIGNMENT == 0:
        return value
    extra = WEIGHT_ALIGNMENT // value.itemsize
    buffer = mx.zeros((value.size + extra,), value.dtype)
    mx.eval(buffer)
    start = data_address(buffer)
    shift = (-start % WEIGHT_ALIGNMENT) // value.itemsize
    # The update writes into the buffer itself (its only reference is the graph's).
    buffer = mx.slice_update(buffer, value.reshape(-1), mx.array([shift]), axes=(0,))
    mx.eval(buffer)
    if data_address(buffer) != start:
        return value
    out = buffer[shift : shift + value.size].reshape(value.shape)
    mx.eval(out)
    return out


def blas_in_use(library: BlasLibrary | None = None) -> str:
    """The BLAS MLX's float32 matmuls really run on: the loaded library's name (``openblas``,
    ``blis``, or ``openblas+router`` behind the router) when it was loaded before MLX, is
    mapped into this process and is where ``cblas_sgemm`` resolves, else
    ``bundled`` (with one warning when a library was loaded but MLX does not use it)."""
    library = library or loaded_blas()
    if library is None or library.path is None:
        return library.name if library is not None else "bundled"
    problem = ""
    if not library.before_mlx:
        problem = "it was loaded after mlx.core"
    elif not loaded_in_process(library.path):
        problem = "it is not mapped into this process"
    elif defining_file("cblas_sgemm") != library.path.resolve():
        problem = f"cblas_sgemm resolves to {defining_file('cblas_sgemm')}"
    if problem:
        logger.warning("MLX does not compute with %s: %s", library.path, problem)
        return "bundled"
    return library.name
