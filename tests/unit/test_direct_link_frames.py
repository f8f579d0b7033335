"""The direct link's framing, its answer over the size limit, and the peer names the
session quota counts (mlx_relay/direct_link.py, mlx_relay/worker/direct_link.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from mlx_relay.direct_link import HEADER, MAGIC, FrameReader, frame
from mlx_relay.proto import relay_pb2 as pb
from mlx_relay.worker.auth import host_peer
from mlx_relay.worker.direct_link import HELLO_LIMIT, DirectLinkServer, _Link


def test_frames_split_anywhere_come_out_whole() -> None:
    payloads = [b"", b"a", bytes(range(256)) * 3, b"last"]
    stream = b"".join(frame(p) for p in payloads)
    for cut in (1, 3, 4, 5, 100, len(stream) - 1):
        reader = FrameReader(1 << 20)
        assert reader.feed(stream[:cut]) + reader.feed(stream[cut:]) == payloads


def test_a_frame_over_the_limit_is_refused_from_its_header() -> None:
    reader = FrameReader(10)
    assert reader.feed(frame(b"x" * 10)) == [b"x" * 10]
    with pytest.raises(ValueError, match="11 bytes is over the 10-byte limit"):
        reader.feed(HEADER.pack(11))  # before any of its bytes arrive


@pytest.mark.parametrize(
    ("host", "peer"),
    [
        ("10.0.0.5", "ipv4:10.0.0.5"),
        ("::1", "ipv6:[::1]"),
        ("::ffff:10.0.0.5", "ipv4:10.0.0.5"),  # a dual-stack socket's IPv4 caller
        ("fe80::1", "ipv6:[fe80::1]"),
    ],
)
def test_peers_are_named_alike_on_both_transports(host: str, peer: str) -> None:
    assert host_peer(host) == peer


class Transport:
    """What a link writes, in place of a socket."""

    def __init__(self) -> None:
        self.written = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 5) if name == "peername" else None

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


async def taken_link(limit: int, token: str | None = None) -> tuple[_Link, Transport]:
    server = DirectLinkServer(servicer=None, token=token, limit=limit, max_calls=None)  # type: ignore[arg-type]
    link = _Link(server)
    transport = Transport()
    link.connection_made(transport)  # type: ignore[arg-type]
    link.data_received(MAGIC + frame((token or "").encode()))
    assert transport.written == frame(b"")  # taken
    transport.written = b""
    return link, transport


async def test_an_answer_over_the_limit_is_refused_as_grpc_refuses_it() -> None:
    link, transport = await taken_link(limit=1000)
    big = pb.ForwardResponse(device_id="x" * 2000)
    await link._send(pb.ForwardAnswer(call_id=7, response=big))
    (payload,) = FrameReader(1000).feed(transport.written)
    answer = pb.ForwardAnswer.FromString(payload)
    assert answer.call_id == 7 and answer.code == "RESOURCE_EXHAUSTED"
    assert "larger than max" in answer.detail  # what the caller's error reads
    link.connection_lost(None)


async def test_nothing_after_a_refused_hello_counts() -> None:
    server = DirectLinkServer(servicer=None, token="s3cret", limit=1 << 20, max_calls=None)  # type: ignore[arg-type]
    link = _Link(server)
    transport = Transport()
    link.connection_made(transport)  # type: ignore[arg-type]
    # A wrong token, then the right one and a call, in one read.
    link.data_received(MAGIC + frame(b"wrong") + frame(b"s3cret") + frame(b"\x08\x01"))
    (refusal,) = FrameReader(1 << 20).feed(transport.written)
    assert refusal.startswith(b"UNAUTHENTICATED ") and transport.closed
    link.connection_lost(None)
    await asyncio.sleep(0)


async def test_a_connection_buffers_no_more_than_a_hello_before_it_is_taken() -> None:
    server = DirectLinkServer(servicer=None, token=None, limit=1 << 20, max_calls=None)  # type: ignore[arg-type]
    link = _Link(server)
    transport = Transport()
    link.connection_made(transport)  # type: ignore[arg-type]
    link.data_received(MAGIC + HEADER.pack(HELLO_LIMIT + 1))
    assert transport.closed and transport.written == b""
    link.connection_lost(None)
