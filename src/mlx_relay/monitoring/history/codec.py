"""Packing a block of samples into a few bytes: the on-disk format of the history store.

A block is a handful of equal-length numeric columns (timestamps as integer offsets, values
as floats). Each column is delta-encoded where that helps (timestamps), its bytes are
shuffled (all first bytes of every item, then all second bytes, ...) so that the slowly
changing high bytes of numbers sit side by side, and the whole is zlib-compressed. A regular
1 s series of a slowly moving gauge costs a byte or two per sample; a noisy float64 about six.

Pure functions, no I/O; ``decode(encode(x)) == x`` exactly for every column.
"""

from __future__ import annotations

import struct
import zlib
from array import array
from collections.abc import Sequence

FORMAT_VERSION = 1
_HEADER = struct.Struct("<BBI")  # version, number of columns, items per column
_COMPRESSION_LEVEL = 6
# Column type codes: 'q' int64 (delta-encoded), 'I' uint32, 'f' float32, 'd' float64.
_DELTA = "q"


class CodecError(ValueError):
    """A block that cannot be decoded (wrong version or corrupt bytes)."""


def _shuffle(raw: bytes, itemsize: int) -> bytes:
    if itemsize == 1:
        return raw
    return b"".join(raw[i::itemsize] for i in range(itemsize))


def _unshuffle(raw: bytes, itemsize: int) -> bytes:
    if itemsize == 1:
        return raw
    count = len(raw) // itemsize
    out = bytearray(len(raw))
    for i in range(itemsize):
        out[i::itemsize] = raw[i * count : (i + 1) * count]
    return bytes(out)


def deltas(values: Sequence[int]) -> list[int]:
    """``[v0, v1 - v0, v2 - v1, ...]``."""
    return [b - a for a, b in zip((0, *values), values, strict=False)]


def undeltas(values: Sequence[int]) -> list[int]:
    """Inverse of :func:`deltas`."""
    out: list[int] = []
    total = 0
    for value in values:
        total += value
        out.append(total)
    return out


def float_column(values: Sequence[float], *, exact: bool) -> array[float]:
    """A float32 column when that loses nothing (or when ``exact`` is false), else float64."""
    narrow = array("f", values)
    if not exact or list(narrow) == list(values):
        return narrow
    return array("d", values)


def encode(columns: Sequence[tuple[str, Sequence[float] | Sequence[int]]]) -> bytes:
    """Pack ``(typecode, values)`` columns of equal length; ``'q'`` columns are delta-coded."""
    if not columns:
        raise ValueError("a block needs at least one column")
    length = len(columns[0][1])
    header = bytearray(_HEADER.pack(FORMAT_VERSION, len(columns), length))
    body: list[bytes] = []
    for code, values in columns:
        if len(values) != length:
            raise ValueError("block columns differ in length")
        items = deltas([int(v) for v in values]) if code == _DELTA else values
        column = array(code, items)  # type: ignore[arg-type]
        header += code.encode("ascii")
        body.append(_shuffle(column.tobytes(), column.itemsize))
    return zlib.compress(bytes(header) + b"".join(body), _COMPRESSION_LEVEL)


def decode(blob: bytes) -> list[list[float] | list[int]]:
    """The columns :func:`encode` packed, in order."""
    try:
        raw = zlib.decompress(blob)
        version, ncolumns, length = _HEADER.unpack_from(raw)
    except (zlib.error, struct.error) as exc:
        raise CodecError(f"corrupt history block: {exc}") from None
    if version != FORMAT_VERSION:
        raise CodecError(f"history block format {version} is not supported")
    offset = _HEADER.size
    codes = raw[offset : offset + ncolumns].decode("ascii")
    offset += ncolumns
    columns: list[list[float] | list[int]] = []
    for code in codes:
        column = array(code)
        size = column.itemsize * length
        chunk = raw[offset : offset + size]
        if len(chunk) != size:
            raise CodecError("truncated history block")
        column.frombytes(_unshuffle(chunk, column.itemsize))
        offset += size
        values = column.tolist()
        columns.append(undeltas(values) if code == _DELTA else values)
    return columns
