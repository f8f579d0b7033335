"""The worker's side of direct links (``network.direct_link``, :mod:`mlx_relay.direct_link`):
``Forward`` calls on plain TCP connections beside the gRPC port.

The worker listens on a second port of the same host (any free one) and names it to each
``ForwardStream`` it takes; a caller opens a link there, says hello with the bearer token
and writes its calls. Each call runs as on the stream
(:class:`~mlx_relay.worker.forward_stream.StreamCalls`: the same checks, compute, relay,
timings, deadline and call limit); its answer goes back on the link. A connection that does
not say the hello, gives a wrong token or sends a frame over ``network.max_message_mb`` is
closed; the worker goes on serving everyone else. Not under TLS: there every call stays on
gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import socket
import time
from typing import TYPE_CHECKING, cast

import grpc

from mlx_relay.direct_link import MAGIC, FrameReader, frame, no_delay
from mlx_relay.proto import relay_pb2 as pb
from mlx_relay.worker.auth import host_peer
from mlx_relay.worker.forward_call import CallFailed
from mlx_relay.worker.forward_stream import StreamCalls, failed_answer

if TYPE_CHECKING:
    from mlx_relay.worker.service import WorkerServicer

logger = logging.getLogger(__name__)

REFUSED = "UNAUTHENTICATED this worker requires network.auth_token in the direct link's hello"
# A connection that has not said its hello by then is closed.
HELLO_TIMEOUT = 10.0
# The largest hello taken (a token): a connection that has not said it buffers no more.
HELLO_LIMIT = 4096
# After a stop's grace, a link whose last bytes the caller does not read is cut this soon.
FLUSH_SECONDS = 1.0


def peer_name(transport: asyncio.BaseTransport) -> str:
    """The caller's address as :func:`~mlx_relay.worker.auth.peer_of` names a gRPC peer
    (``ipv4:10.0.0.5``, ``ipv6:[::1]``; an IPv4-mapped address as IPv4): the session quota
    counts a caller's link and its gRPC calls as one peer."""
    address = transport.get_extra_info("peername")
    if not address:
        return "unknown"
    return host_peer(str(address[0]))


class _Link(asyncio.Protocol):
    """One caller's link: its hello, then its calls. While the caller does not read its
    answers (the transport's write buffer past its high mark), the link reads no more calls."""

    def __init__(self, server: DirectLinkServer) -> None:
        self._server = server
        self._reader = FrameReader(HELLO_LIMIT)
        self._transport: asyncio.Transport | None = None
        self._magic = bytearray()
        self._calls: StreamCalls | None = None
        self._hello_timer: asyncio.TimerHandle | None = None
        self._writable = asyncio.Event()
        self._writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        no_delay(transport)
        self._server.links.add(self)
        self._hello_timer = asyncio.get_running_loop().call_later(
            HELLO_TIMEOUT, self._drop, "no hello"
        )

    def pause_writing(self) -> None:
        self._writable.clear()
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._writable.set()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if len(self._magic) < len(MAGIC):
            wanted = len(MAGIC) - len(self._magic)
            self._magic += data[:wanted]
            data = data[wanted:]
            if not MAGIC.startswith(self._magic):
                self._drop("not a direct link")
                return
            if len(self._magic) < len(MAGIC):
                return
        try:
            frames = self._reader.feed(data)
        except ValueError as exc:
            self._drop(str(exc))
            return
        for payload in frames:
            if self._transport is None or self._transport.is_closing():
                return  # refused or dropped: nothing after it counts
            if self._calls is None:
                self._hello(payload)
                continue
            try:
                call = pb.ForwardCall.FromString(payload)
            except Exception as exc:
                self._drop(f"a frame that is not a ForwardCall ({exc})")
                return
            self._calls.take(call, time.monotonic())

    def _hello(self, token: bytes) -> None:
        assert self._transport is not None
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        expected = self._server.token
        if expected and not hmac.compare_digest(token, expected.encode()):
            self._transport.write(frame(REFUSED.encode()))
            self._drop("wrong token")
            return
        self._reader.limit = self._server.limit
        self._calls = StreamCalls(
            self._server.servicer,
            peer_name(self._transport),
            "",
            self._send,
            self._server.max_calls,
        )
        self._transport.write(frame(b""))

    async def _send(self, answer: pb.ForwardAnswer) -> None:
        await self._writable.wait()
        transport = self._transport
        if transport is None or transport.is_closing():
            raise ConnectionError("the direct link is closed")
        payload = answer.SerializeToString()
        if len(payload) > self._server.limit:  # as gRPC fails a message over the limit
            too_large = CallFailed(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"Sent message larger than max ({len(payload)} vs. {self._server.limit})",
            )
            payload = failed_answer(answer.call_id, too_large).SerializeToString()
        transport.write(frame(payload))

    def _drop(self, why: str) -> None:
        logger.info("direct link from %s closed: %s", self.peer, why)
        if self._transport is not None:
            self._transport.close()

    @property
    def peer(self) -> str:
        return peer_name(self._transport) if self._transport is not None else "unknown"

    def connection_lost(self, exc: Exception | None) -> None:
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        self._writable.set()  # answers waiting to be written find the link closed
        self._server.links.discard(self)
        if self._calls is not None:  # the caller went away: its calls' answers go nowhere
            self._calls.cancel()

    async def close(self, grace: float | None) -> None:
        """Let the calls running finish within ``grace`` seconds, cancel the rest, then
        close (cut after :data:`FLUSH_SECONDS` when the caller does not read)."""
        if self._calls is not None and self._calls.running and grace:
            await asyncio.wait(list(self._calls.running), timeout=grace)
        if self._calls is not None:
            self._calls.cancel()
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.close()
            asyncio.get_running_loop().call_later(FLUSH_SECONDS, transport.abort)


class DirectLinkServer:
    """The direct-link listener of one worker.

    Args:
        servicer: runs the calls.
        token: ``network.auth_token`` (None: no token asked).
        limit: the largest frame taken, in bytes (``network.max_message_mb``).
        max_calls: the most calls one link runs at once.
    """

    def __init__(
        self, servicer: WorkerServicer, token: str | None, limit: int, max_calls: int | None
    ) -> None:
        self.servicer = servicer
        self.token = token
        self.limit = limit
        self.max_calls = max_calls
        self.links: set[_Link] = set()
        self.port = 0
        self._socket: socket.socket | None = None
        self._server: asyncio.Server | None = None

    def bind(self, host: str) -> int:
        """Listen on a free port of ``host`` (the gRPC port's host); returns the port.

        Raises:
            OSError: ``host`` cannot be bound.
        """
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        try:
            # As servers bind (gRPC's own port too): the link's closed connections waiting
            # out TIME_WAIT then do not keep the port from being bound again.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._socket = sock
        self.port = int(sock.getsockname()[1])
        return self.port

    async def start(self) -> None:
        if self._socket is None:
            raise RuntimeError("direct link: bind() before start()")
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Link(self), sock=self._socket
        )

    async def stop(self, grace: float | None) -> None:
        """Take no new links; the calls running get ``grace`` seconds, then every link
        closes (its caller's calls still waiting fail UNAVAILABLE)."""
        if self._server is not None:
            self._server.close()
        elif self._socket is not None:
            self._socket.close()
        if self.links:
            await asyncio.gather(*(link.close(grace) for link in list(self.links)))
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), FLUSH_SECONDS * 2)
