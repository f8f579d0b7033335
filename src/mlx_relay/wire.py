"""The wire codec: the model's values as the gRPC messages carry them, for both roles.

The coordinator encodes token ids and sampling parameters; a worker checks and decodes
tensors, decodes sampling parameters and encodes its output. Tensors travel as raw
little-endian bytes plus dtype and shape (never pickle or JSON).

Validation is pure and reads only the message's header and byte length, so a worker can
reject a malformed tensor on its event loop before anything reaches MLX. Conversion to and
from ``mx.array`` evaluates the array and belongs on the MLX thread.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from mlx_relay.core.errors import InvalidRequest
from mlx_relay.model.sampling import MASK64, SamplingParams
from mlx_relay.proto import relay_pb2 as pb

if TYPE_CHECKING:
    import mlx.core as mx

# numpy has no bfloat16: its bits travel as uint16 and are reinterpreted by MLX.
_WIRE_NUMPY: dict[str, np.dtype] = {
    "int32": np.dtype("<i4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "float32": np.dtype("<f4"),
}

SUPPORTED_DTYPES: tuple[str, ...] = tuple(_WIRE_NUMPY)


class TensorFormatError(InvalidRequest):
    """A tensor message does not match what the receiving stage expects."""


def itemsize(dtype: str) -> int:
    """Bytes per element of a wire dtype.

    Raises:
        TensorFormatError: ``dtype`` is not one of :data:`SUPPORTED_DTYPES`.
    """
    try:
        return _WIRE_NUMPY[dtype].itemsize
    except KeyError:
        supported = ", ".join(SUPPORTED_DTYPES)
        raise TensorFormatError(f"unsupported dtype {dtype!r} (supported: {supported})") from None


def dtype_name(dtype: mx.Dtype) -> str:
    """The wire name of an MLX dtype, e.g. ``mx.bfloat16`` -> ``"bfloat16"``."""
    name = str(dtype).rsplit(".", 1)[-1]
    itemsize(name)
    return name


def check_tensor(
    tensor: pb.Tensor,
    *,
    dtype: str,
    shape: Sequence[int | None],
    what: str = "tensor",
) -> tuple[int, ...]:
    """Check a tensor message against an expected dtype and shape.

    Args:
        tensor: the message to check.
        dtype: the wire dtype the receiver expects.
        shape: the expected shape; ``None`` marks a free dimension, which must be >= 1.
        what: how error messages name the tensor.

    Returns:
        The tensor's shape.

    Raises:
        TensorFormatError: wrong dtype, rank, dimension, or byte length.
    """
    got_shape = tuple(int(d) for d in tensor.shape)
    if tensor.dtype != dtype:
        given = repr(tensor.dtype) if tensor.dtype else "no dtype"
        raise TensorFormatError(f"{what}: expected dtype {dtype}, got {given}")
    if len(got_shape) != len(shape):
        raise TensorFormatError(
            f"{what}: expected shape {_show(shape)}, got {list(got_shape)} "
            f"(rank {len(got_shape)} instead of {len(shape)})"
        )
    for axis, (got, want) in enumerate(zip(got_shape, shape, strict=True)):
        if want is None and got < 1:
            raise TensorFormatError(
                f"{what}: dimension {axis} must be >= 1, got shape {list(got_shape)}"
            )
        if want is not None and got != want:
            raise TensorFormatError(
                f"{what}: expected shape {_show(shape)}, got {list(got_shape)} "
                f"(dimension {axis} is {got}, expected {want})"
            )
    expected = math.prod(got_shape) * itemsize(dtype)
    if len(tensor.data) != expected:
        raise TensorFormatError(
            f"{what}: {len(tensor.data)} data bytes for shape {list(got_shape)} {dtype}, "
            f"expected {expected}"
        )
    return got_shape


def _show(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("L" if d is None else str(d) for d in shape) + "]"


def to_numpy(tensor: pb.Tensor) -> np.ndarray:
    """A read-only numpy view of a checked tensor (bfloat16 comes back as its uint16 bits).

    Raises:
        TensorFormatError: the byte length does not match the shape and dtype.
    """
    itemsize(tensor.dtype)
    np_dtype = _WIRE_NUMPY[tensor.dtype]
    shape = tuple(int(d) for d in tensor.shape)
    if len(tensor.data) != math.prod(shape) * np_dtype.itemsize:
        raise TensorFormatError(
            f"{len(tensor.data)} data bytes do not fit shape {list(shape)} {tensor.dtype}"
        )
    return np.frombuffer(tensor.data, dtype=np_dtype).reshape(shape)


def encode_token_ids(token_ids: Sequence[int]) -> pb.Tensor:
    """Token ids as the first stage's input: int32, shape ``(1, L)``. Needs no MLX."""
    ids = np.asarray(token_ids, dtype=_WIRE_NUMPY["int32"]).reshape(1, -1)
    return pb.Tensor(data=ids.tobytes(), dtype="int32", shape=list(ids.shape))


def decode(tensor: pb.Tensor) -> mx.array:
    """An ``mx.array`` from a tensor message (call on the MLX thread).

    Raises:
        TensorFormatError: unsupported dtype or byte length mismatch.
    """
    import mlx.core as mx

    values = to_numpy(tensor)
    if tensor.dtype == "bfloat16":
        return mx.array(values).view(mx.bfloat16)
    return mx.array(values)


def encode(array: mx.array) -> pb.Tensor:
    """A tensor message from an ``mx.array`` (evaluates it; call on the MLX thread).

    An unevaluated array is evaluated together with its wire view, in one evaluation.

    Raises:
        TensorFormatError: the array's dtype has no wire form.
    """
    name, values = _host_values(array)
    return _tensor(name, values)


def encode_rows(array: mx.array, rows: Sequence[tuple[int, int]]) -> list[pb.Tensor]:
    """Tensor messages of rows of a ``(B, L, ...)`` array: for each ``(row, start)``,
    ``array[row : row + 1, start:]`` (evaluates the array; call on the MLX thread).

    The array is read into host memory once: an MLX slice of each row would be one more
    evaluation each (16 rows of a decode batch: 1.5 ms against 30 us).

    Raises:
        TensorFormatError: the array's dtype has no wire form.
    """
    name, values = _host_values(array)
    return [_tensor(name, values[row : row + 1, start:]) for row, start in rows]


def _host_values(array: mx.array) -> tuple[str, np.ndarray]:
    """The array's wire dtype and its values in host memory (bfloat16 as its uint16 bits),
    in one evaluation."""
    import mlx.core as mx

    name = dtype_name(array.dtype)
    bits = array.view(mx.uint16) if name == "bfloat16" else array
    mx.eval(bits)
    return name, np.asarray(bits).astype(_WIRE_NUMPY[name], copy=False)


def _tensor(name: str, values: np.ndarray) -> pb.Tensor:
    return pb.Tensor(
        data=np.ascontiguousarray(values).tobytes(), dtype=name, shape=list(values.shape)
    )


def encode_sampling(params: SamplingParams) -> pb.SamplingParams:
    """Sampling parameters as the last stage receives them (the seed as an unsigned 64-bit
    integer, ``has_seed`` telling an unset seed from 0)."""
    return pb.SamplingParams(
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        has_seed=params.seed is not None,
        seed=(params.seed or 0) & MASK64,
        top_logprobs=params.top_logprobs,
    )


def decode_sampling(message: pb.SamplingParams) -> SamplingParams:
    """The model layer's sampling parameters from their wire form.

    An unset ``top_p`` (0 on the wire) means 1 (off), so an empty message is greedy.

    Raises:
        InvalidRequest: a parameter is out of range.
    """
    return SamplingParams(
        temperature=float(message.temperature),
        top_p=float(message.top_p) if message.top_p != 0 else 1.0,
        top_k=int(message.top_k),
        seed=int(message.seed) if message.has_seed else None,
        top_logprobs=int(message.top_logprobs),
    )
