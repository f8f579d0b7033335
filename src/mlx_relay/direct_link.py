"""Direct links: ``Forward`` calls on a plain TCP connection beside the gRPC port
(``network.direct_link``), the caller's side and the framing both sides share.

A decode step's call carries a few kilobytes, and on loopback a gRPC stream's round trip is
mostly gRPC's own machinery: its polling thread wakes, then the event loop, on each side of
each message (0.62 ms a round trip after 20 ms idle on a 2-core machine, against 0.28 ms
for the same bytes on a TCP connection read by the event loop itself,
``bench/link_floor.py``). A 2-stage token makes two round trips.

The link carries the same messages as ``ForwardStream`` (:class:`ForwardCall` out,
:class:`ForwardAnswer` back, matched by ``call_id``) and keeps each call's contract: its
deadline travels with it, the worker checks the bearer token once per link (in the hello),
a frame over ``network.max_message_mb`` ends the link, failures are the same statuses, and
each call is recorded as ``Forward`` in the caller's metrics. Without TLS only: under
``network.tls`` every call stays on gRPC.

How a caller finds the link: a worker that has one names its port in the initial metadata
of every ``ForwardStream`` it takes
(:data:`~mlx_relay.stream_client.DIRECT_PORT_KEY`); the client then opens the
link beside the stream and sends its next calls there. A link that cannot be opened (a
firewall that lets only the gRPC port through) leaves the calls on the stream.

Wire format (the call path: docs/architecture.md, step 6): the caller writes :data:`MAGIC` then a
hello frame (the bearer token, UTF-8, empty without one); the worker answers a frame, empty
when it takes the link, else ``CODE detail`` and it closes the link. Then each frame is one
serialized message. A frame is a 4-byte big-endian length and that many bytes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import struct
import time
from collections.abc import Callable
from typing import cast

import grpc
import grpc.aio

from mlx_relay.proto import relay_pb2 as pb

logger = logging.getLogger(__name__)

MAGIC = b"MLXRLNK1"
HEADER = struct.Struct(">I")
# How long a caller waits for a new link to be taken before it leaves the calls on gRPC.
OPEN_TIMEOUT = 2.0


def frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload)) + payload


def no_delay(transport: asyncio.BaseTransport) -> None:
    """Send each frame at once (a decode step's frame is small: Nagle would hold it;
    asyncio's and uvloop's TCP transports set this themselves, other transports may not),
    and have the system probe an idle link, so that one whose other end went away without
    a word (a machine switched off) is closed after the system's keepalive time (two hours
    by default, as gRPC's own pings) instead of held forever."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


class FrameReader:
    """Splits the bytes of a connection into frames of at most ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """The frames complete with ``data``.

        Raises:
            ValueError: a frame announces more than ``limit`` bytes.
        """
        buffer = self._buffer
        buffer += data
        frames: list[bytes] = []
        start = 0
        while len(buffer) - start >= HEADER.size:
            (size,) = HEADER.unpack_from(buffer, start)
            if size > self.limit:
                raise ValueError(f"a frame of {size} bytes is over the {self.limit}-byte limit")
            end = start + HEADER.size + size
            if len(buffer) < end:
                break
            frames.append(bytes(buffer[start + HEADER.size : end]))
            start = end
        if start:
            del buffer[:start]
        return frames


def _error(code: grpc.StatusCode, detail: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, details=detail)


class _LinkProtocol(asyncio.Protocol):
    """The caller's end of one link: the hello's answer, then answers by call id."""

    def __init__(self, limit: int) -> None:
        self.reader = FrameReader(limit)
        self.transport: asyncio.Transport | None = None
        self.welcome: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.pending: dict[int, asyncio.Future[pb.ForwardAnswer]] = {}
        self.failed: grpc.aio.AioRpcError | None = None
        # Clear while the worker does not read (the write buffer past its high mark).
        self.writable = asyncio.Event()
        self.writable.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        no_delay(transport)

    def data_received(self, data: bytes) -> None:
        try:
            for payload in self.reader.feed(data):
                if not self.welcome.done():
                    self.welcome.set_result(payload)
                    continue
                answer = pb.ForwardAnswer.FromString(payload)
                future = self.pending.get(answer.call_id)
                if future is not None and not future.done():
                    future.set_result(answer)
        except Exception as exc:  # a frame too large or not an answer: the link is unusable
            self.fail(_error(grpc.StatusCode.UNAVAILABLE, f"direct link broken ({exc})"))
            if self.transport is not None:
                self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        why = f" ({exc})" if exc else ""
        self.fail(_error(grpc.StatusCode.UNAVAILABLE, f"connection lost (direct link closed{why})"))

    def fail(self, error: grpc.aio.AioRpcError) -> None:
        """The link is over: its calls fail with ``error`` (the first failure stays)."""
        if self.failed is None:
            self.failed = error
        self.writable.set()  # calls waiting to write find the link failed
        if not self.welcome.done():
            self.welcome.set_exception(self.failed)
            self.welcome.exception()  # retrieved: nobody may be waiting any more
        for future in self.pending.values():
            if not future.done():
                future.set_exception(self.failed)


def _retrieve(future: asyncio.Future[pb.ForwardAnswer]) -> None:
    if not future.cancelled():
        future.exception()  # an answer nobody awaits any more is not an unhandled error


class DirectLink:
    """One open link to a worker: :meth:`forward` as
    :meth:`~mlx_relay.stream_client.ForwardStreamClient.forward` answers.

    Args:
        protocol: the taken link (:func:`open_link`).
        record: ``(seconds, code, sent_bytes, received_bytes)`` of each finished call, or None.
    """

    def __init__(
        self,
        protocol: _LinkProtocol,
        record: Callable[[float, str, int, int], None] | None = None,
    ) -> None:
        self._protocol = protocol
        self._record = record
        self._ids = itertools.count(1)

    @property
    def failed(self) -> bool:
        return self._protocol.failed is not None

    async def forward(
        self, request: pb.ForwardRequest, timeout: float, traceparent: str = ""
    ) -> pb.ForwardAnswer:
        """The answer to one call (its ``code`` empty when it succeeded).

        Raises:
            TimeoutError: no answer within ``timeout`` seconds.
            grpc.aio.AioRpcError: the link failed (UNAVAILABLE).
        """
        protocol = self._protocol
        if protocol.failed is not None:
            raise protocol.failed
        call_id = next(self._ids)
        future: asyncio.Future[pb.ForwardAnswer] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieve)
        protocol.pending[call_id] = future
        started = time.perf_counter()
        payload = pb.ForwardCall(
            call_id=call_id, request=request, timeout_seconds=timeout, traceparent=traceparent
        ).SerializeToString()
        code, received = "CANCELLED", 0
        transport = protocol.transport
        assert transport is not None
        try:
            async with asyncio.timeout(timeout):
                await protocol.writable.wait()
                if protocol.failed is not None:
                    raise protocol.failed
                if transport.is_closing():  # uvloop raises on a write there
                    raise _error(grpc.StatusCode.UNAVAILABLE, "the direct link was closed")
                transport.write(frame(payload))
                answer = await future
            code = answer.code or "OK"
            received = answer.ByteSize()
            return answer
        except TimeoutError:
            code = "DEADLINE_EXCEEDED"
            if transport.get_write_buffer_size() > 0:
                # Its frame may still be here, to reach the worker after the deadline and
                # run a step its caller gave up on: the link goes, as a stream whose write
                # was cut off does.
                self.close()
            raise
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
            raise
        finally:
            protocol.pending.pop(call_id, None)
            if self._record is not None:
                self._record(time.perf_counter() - started, code, len(payload), received)

    def close(self) -> None:
        """End the link now: calls on it fail UNAVAILABLE."""
        protocol = self._protocol
        protocol.fail(_error(grpc.StatusCode.UNAVAILABLE, "the direct link was closed"))
        if protocol.transport is not None:
            protocol.transport.close()


async def open_link(
    host: str,
    port: int,
    token: str | None,
    limit: int,
    record: Callable[[float, str, int, int], None] | None = None,
    timeout: float = OPEN_TIMEOUT,
) -> DirectLink:
    """Open and say hello on a link to the worker at ``host:port``.

    Raises:
        OSError: no connection.
        TimeoutError: the worker did not answer the hello within ``timeout``.
        grpc.aio.AioRpcError: the worker refused the link (e.g. UNAUTHENTICATED).
    """
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        transport, protocol = await loop.create_connection(lambda: _LinkProtocol(limit), host, port)
        try:
            transport.write(MAGIC + frame((token or "").encode()))
            answer = await protocol.welcome
        except BaseException:
            transport.abort()
            raise
    if answer:
        transport.close()
        name, _, detail = answer.decode("utf-8", "replace").partition(" ")
        code = getattr(grpc.StatusCode, name, grpc.StatusCode.UNKNOWN)
        raise _error(code, detail)
    return DirectLink(protocol, record)
