"""Tensor wire format: exact round trips per dtype and a clear error for every malformation."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_relay import wire
from mlx_relay.core.errors import InvalidRequest
from mlx_relay.model.sampling import SamplingParams
from mlx_relay.proto import relay_pb2 as pb
from mlx_relay.wire import TensorFormatError


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32])
def test_float_round_trip_is_bit_exact(dtype: mx.Dtype) -> None:
    values = mx.random.normal((1, 3, 5), key=mx.random.key(7)).astype(dtype)
    message = wire.encode(values)
    assert message.dtype == wire.dtype_name(dtype)
    assert list(message.shape) == [1, 3, 5]
    assert len(message.data) == 15 * wire.itemsize(message.dtype)
    back = wire.decode(message)
    assert back.dtype == dtype
    assert back.shape == (1, 3, 5)
    assert mx.array_equal(back, values).item()


def test_bfloat16_bytes_are_the_top_half_of_float32() -> None:
    values = mx.array([1.5, -2.25, 0.0], dtype=mx.bfloat16)
    data = wire.encode(values).data
    as_f32 = np.array([1.5, -2.25, 0.0], dtype="<f4").view("<u4") >> 16
    assert data == as_f32.astype("<u2").tobytes()


def test_token_ids_are_little_endian_int32() -> None:
    message = wire.encode_token_ids([1, 258, 70000])
    assert message.dtype == "int32"
    assert list(message.shape) == [1, 3]
    assert message.data == b"\x01\x00\x00\x00\x02\x01\x00\x00\x70\x11\x01\x00"
    assert wire.decode(message).tolist() == [[1, 258, 70000]]


def test_encode_int32_array() -> None:
    ids = mx.array([[5, 6]], dtype=mx.int32)
    assert wire.encode(ids) == wire.encode_token_ids([5, 6])


def test_check_tensor_accepts_free_dimension() -> None:
    message = wire.encode_token_ids([1, 2, 3, 4])
    assert wire.check_tensor(message, dtype="int32", shape=(1, None)) == (1, 4)


@pytest.mark.parametrize(
    ("message", "expected", "fragment"),
    [
        (pb.Tensor(data=b"\0" * 8, dtype="float64", shape=[1, 1]), "int32", "got 'float64'"),
        (pb.Tensor(data=b"\0" * 8, dtype="", shape=[1, 2]), "int32", "got no dtype"),
        (pb.Tensor(data=b"\0" * 8, dtype="int32", shape=[2]), "int32", "rank 1 instead of 2"),
        (pb.Tensor(data=b"\0" * 8, dtype="int32", shape=[2, 1]), "int32", "dimension 0 is 2"),
        (pb.Tensor(data=b"", dtype="int32", shape=[1, 0]), "int32", "dimension 1 must be >= 1"),
        (pb.Tensor(data=b"\0" * 7, dtype="int32", shape=[1, 2]), "int32", "7 data bytes"),
    ],
)
def test_check_tensor_rejects(message: pb.Tensor, expected: str, fragment: str) -> None:
    with pytest.raises(TensorFormatError, match=fragment) as info:
        wire.check_tensor(message, dtype=expected, shape=(1, None), what="ids")
    assert str(info.value).startswith("ids: ")
    assert isinstance(info.value, InvalidRequest)


def test_check_tensor_names_expected_hidden_size() -> None:
    message = pb.Tensor(data=b"\0" * 2 * 6, dtype="float16", shape=[1, 2, 3])
    with pytest.raises(TensorFormatError, match=r"expected shape \[1, L, 64\].*expected 64"):
        wire.check_tensor(message, dtype="float16", shape=(1, None, 64))


def test_unsupported_dtype_lists_supported_ones() -> None:
    with pytest.raises(TensorFormatError, match="int32, float16, bfloat16, float32"):
        wire.itemsize("uint8")
    with pytest.raises(TensorFormatError):
        wire.decode(pb.Tensor(data=b"\0", dtype="uint8", shape=[1]))
    with pytest.raises(TensorFormatError):
        wire.encode(mx.array([1], dtype=mx.uint8))


def test_decode_rejects_byte_length_mismatch() -> None:
    with pytest.raises(TensorFormatError, match="do not fit shape"):
        wire.decode(pb.Tensor(data=b"\0" * 6, dtype="float32", shape=[1, 2]))


def test_sampling_parameters_round_trip_and_an_unset_seed_stays_unset() -> None:
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=40, seed=-1, top_logprobs=3)
    message = wire.encode_sampling(params)
    assert message.has_seed and message.seed == (1 << 64) - 1  # -1 as an unsigned 64-bit seed
    back = wire.decode_sampling(message)
    assert (back.temperature, back.top_k, back.top_logprobs) == (pytest.approx(0.7), 40, 3)
    assert back.top_p == pytest.approx(0.9) and back.seed == (1 << 64) - 1
    unseeded = wire.encode_sampling(SamplingParams(seed=None))
    assert not unseeded.has_seed and wire.decode_sampling(unseeded).seed is None
    assert wire.decode_sampling(pb.SamplingParams()).top_p == 1.0  # empty message: greedy


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_rows_are_encoded_from_one_read_as_each_row_alone(dtype: mx.Dtype) -> None:
    batch = (mx.random.normal((4, 5, 8)) * 100).astype(dtype)
    starts = [(2, 0), (0, 3), (3, 4), (1, 1)]
    tensors = wire.encode_rows(batch, starts)
    assert len(tensors) == len(starts)
    for tensor, (row, start) in zip(tensors, starts, strict=True):
        alone = wire.encode(batch[row : row + 1, start:])
        assert tensor == alone
        back = wire.decode(tensor)
        assert back.dtype == dtype and back.shape == (1, 5 - start, 8)
        assert mx.array_equal(back, batch[row : row + 1, start:]).item()
