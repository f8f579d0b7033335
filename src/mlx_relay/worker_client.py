"""gRPC client of one worker: one channel, explicit limits, deadlines and retries.

The coordinator calls every stage with it, and a worker calls its next stage with it when it
relays a ``Forward`` (:mod:`mlx_relay.worker.relay`).

Every call has a deadline from ``config.network``. Idempotent calls (``Ping``, ``GetStatus``,
health, ``EndSession``) are retried with exponential backoff when the worker is UNAVAILABLE;
``Forward`` never is, because a retried step would advance a KV cache twice. gRPC failures
leave this module as the typed errors of :mod:`mlx_relay.core.errors`
(:mod:`mlx_relay.rpc_errors`); each call's metrics go to the recorder
(:mod:`mlx_relay.rpc_metrics`).

With ``network.tls`` the channel is TLS: the worker's certificate is verified against the
cluster's CA, and the client presents its own certificate when it has one (mTLS). A failed
handshake is :class:`TLSHandshakeFailed`, which is never retried: waiting does not fix a
certificate.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mlx_relay.core.config import DeviceConfig, NetworkConfig
from mlx_relay.core.errors import RelayError, WorkerUnavailable
from mlx_relay.core.tls_config import TLSMaterial
from mlx_relay.core.tracing import TRACEPARENT
from mlx_relay.direct_link import DirectLink, open_link
from mlx_relay.proto import relay_pb2, relay_pb2_grpc
from mlx_relay.rpc_errors import (
    FAILED_DEVICE_KEY,
    StageError,
    TLSHandshakeFailed,
    WorkerTimedOut,
    answered_error,
    translate_rpc_error,
)
from mlx_relay.rpc_metrics import RpcMetricsInterceptor, RpcRecorder
from mlx_relay.stream_client import STREAM_MAX_BYTES, ForwardStreamClient, StreamUnsupported

logger = logging.getLogger(__name__)

__all__ = [
    "FAILED_DEVICE_KEY",
    "RpcMetricsInterceptor",
    "RpcRecorder",
    "StageError",
    "TLSHandshakeFailed",
    "WorkerClient",
    "WorkerTimedOut",
    "answered_error",
    "channel_credentials",
    "translate_rpc_error",
]

T = TypeVar("T")

# Reconnect quickly after a worker restarts: gRPC's default backoff grows to two minutes.
_RECONNECT_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.enable_retries", 0),
)
_HEALTH_NAMES = {
    health_pb2.HealthCheckResponse.UNKNOWN: "UNKNOWN",
    health_pb2.HealthCheckResponse.SERVING: "SERVING",
    health_pb2.HealthCheckResponse.NOT_SERVING: "NOT_SERVING",
    health_pb2.HealthCheckResponse.SERVICE_UNKNOWN: "SERVICE_UNKNOWN",
}


def channel_credentials(tls: TLSMaterial) -> grpc.ChannelCredentials:
    """TLS credentials of a client: the CA, and its certificate when it has one."""
    if tls.has_identity:
        return grpc.ssl_channel_credentials(tls.ca, tls.key, tls.cert)
    return grpc.ssl_channel_credentials(tls.ca)


class WorkerClient:
    """Calls one worker over a single ``grpc.aio`` channel.

    Create it inside a running event loop. The channel reconnects by itself after the worker
    restarts, so a client outlives its worker's restarts.

    Args:
        device_id: the worker's device id (names it in errors and metrics).
        address: ``host:port`` of its gRPC server.
        network: deadlines, retries, message size limit and auth token.
        recorder: receives per-call metrics (a ``MetricsCollector``), or None.
        tls: the CA and this client's certificate (:func:`~mlx_relay.core.tls_config.tls_material`)
            for a TLS channel; None for plaintext.
    """

    def __init__(
        self,
        device_id: str,
        address: str,
        network: NetworkConfig,
        *,
        recorder: RpcRecorder | None = None,
        tls: TLSMaterial | None = None,
    ) -> None:
        self.device_id = device_id
        self.address = address
        self.network = network
        limit = network.max_message_mb * 1024 * 1024
        options = [
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
            *_RECONNECT_OPTIONS,
        ]
        interceptors = [RpcMetricsInterceptor(device_id, recorder)] if recorder else None
        if tls is None:
            self._channel = grpc.aio.insecure_channel(
                address, options=options, interceptors=interceptors
            )
        else:
            self._channel = grpc.aio.secure_channel(
                address, channel_credentials(tls), options=options, interceptors=interceptors
            )
        self._stub = relay_pb2_grpc.WorkerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._metadata: Sequence[tuple[str, str]] | None = (
            (("authorization", f"Bearer {network.auth_token}"),) if network.auth_token else None
        )
        self._recorder = recorder
        # Forward calls go on the worker's direct link once it names one on the stream
        # (mlx_relay/direct_link.py); not under TLS.
        self._direct = network.direct_link and network.forward_stream and tls is None
        self._link: DirectLink | None = None
        self._opening: asyncio.Task[None] | None = None
        self._refused_port = 0
        self._closed = False
        self._streams: ForwardStreamClient | None = None
        if network.forward_stream:
            self._streams = ForwardStreamClient(
                device_id,
                lambda: self._stub.ForwardStream(metadata=self._metadata),
                self._record_streamed if recorder is not None else None,
            )

    @classmethod
    def for_device(
        cls,
        device: DeviceConfig,
        network: NetworkConfig,
        *,
        recorder: RpcRecorder | None = None,
        tls: TLSMaterial | None = None,
    ) -> WorkerClient:
        return cls(device.id, device.address, network, recorder=recorder, tls=tls)

    async def forward(
        self,
        request: relay_pb2.ForwardRequest,
        *,
        timeout: float | None = None,
        traceparent: str = "",
    ) -> relay_pb2.ForwardResponse:
        """Run one step on the worker's layers. Never retried. ``traceparent`` (W3C trace
        context) goes in the call's metadata; each entry carries its own request's too.
        On the worker's ``ForwardStream`` when ``network.forward_stream`` is on and the call
        is at most :data:`~mlx_relay.stream_client.STREAM_MAX_BYTES`, else unary; on the
        worker's direct link instead of the stream once it is open
        (:mod:`mlx_relay.direct_link`)."""
        timeout = timeout or self.network.request_timeout
        streams = self._streams
        if streams is not None and request.ByteSize() <= STREAM_MAX_BYTES:
            link = self._link
            try:
                if link is not None and not link.failed:
                    answer = await link.forward(request, timeout, traceparent)
                else:
                    answer = await streams.forward(request, timeout, traceparent)
                    if self._direct:
                        self._open_link(streams.direct_port)
            except StreamUnsupported:
                logger.info("worker %s has no ForwardStream: unary calls", self.device_id)
                self._streams = None
            except TimeoutError:
                raise translate_rpc_error(
                    self.device_id,
                    "Forward",
                    grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED),
                    timeout,
                ) from None
            except grpc.aio.AioRpcError as exc:
                raise translate_rpc_error(self.device_id, "Forward", exc, timeout) from None
            else:
                if not answer.code:
                    return answer.response
                raise translate_rpc_error(
                    self.device_id, "Forward", answered_error(answer), timeout
                )
        metadata = self._metadata
        if traceparent:
            metadata = (*(metadata or ()), (TRACEPARENT, traceparent))
        return await self._call("Forward", self._stub.Forward, request, timeout, metadata=metadata)

    def _open_link(self, port: int) -> None:
        """Open the direct link the worker named, beside the stream (a port that cannot
        be opened is not tried again while the worker names it: the calls stay on the
        stream until it names another, after a restart)."""
        if self._closed or not port or port == self._refused_port or self._opening is not None:
            return
        if self._link is not None and not self._link.failed:
            return
        self._opening = asyncio.get_running_loop().create_task(self._open(port))

    async def _open(self, port: int) -> None:
        host = self.address.rsplit(":", 1)[0].strip("[]")
        try:
            link = await open_link(
                host,
                port,
                self.network.auth_token,
                self.network.max_message_mb * 1024 * 1024,
                self._record_streamed if self._recorder is not None else None,
            )
            if self._closed:  # closed while the link opened
                link.close()
                return
            self._link = link
            logger.debug("Forward calls to %s on its direct link (port %d)", self.device_id, port)
        except Exception as exc:  # whatever it was, the calls stay on the stream
            self._refused_port = port
            logger.info(
                "worker %s: its direct link %s:%d cannot be opened (%s); Forward calls stay "
                "on the gRPC stream",
                self.device_id,
                host,
                port,
                exc,
            )
        finally:
            self._opening = None

    def _record_streamed(self, seconds: float, code: str, sent: int, received: int) -> None:
        """A streamed Forward's metrics, as the interceptor records a unary call's."""
        try:
            if self._recorder is not None:
                self._recorder.record_rpc(self.device_id, "Forward", seconds, code, sent, received)
        except Exception:  # a metrics problem must never fail an inference call
            logger.exception("recording Forward call to %s failed", self.device_id)

    async def reshard(
        self,
        phase: relay_pb2.ReshardRequest.Phase,
        start: int = 0,
        end: int = 0,
        *,
        timeout: float | None = None,
    ) -> relay_pb2.ReshardResponse:
        """One step of a live repartition on the worker (``mlx_relay.worker.reshard``): a
        prepare loads layers ``[start, end)``. Never retried."""
        request = relay_pb2.ReshardRequest(phase=phase, layer_start=start, layer_end=end)
        return await self._call(
            "Reshard", self._stub.Reshard, request, timeout or self.network.request_timeout
        )

    async def connected(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the channel to be connected (it reconnects by
        itself, after up to a second's backoff, once a restarted worker is back); True if
        it is. A call made while the channel waits out its backoff fails at once."""
        if self._channel.get_state(try_to_connect=True) == grpc.ChannelConnectivity.READY:
            return True
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except TimeoutError:
            return False
        return True

    async def end_session(self, request_id: str, *, timeout: float | None = None) -> bool:
        """Free the request's KV cache on the worker; True if it held one."""
        response = await self._retrying(
            "EndSession",
            self._stub.EndSession,
            relay_pb2.EndSessionRequest(request_id=request_id),
            timeout or self.network.request_timeout,
        )
        return bool(response.existed)

    async def ping(
        self, payload: bytes = b"", *, timeout: float | None = None, retry: bool = True
    ) -> float:
        """Round-trip time in seconds of a Ping carrying ``payload`` on this channel."""
        request = relay_pb2.PingRequest(payload=payload, sent_at=time.monotonic())
        start = time.perf_counter()
        response = await self._retrying(
            "Ping", self._stub.Ping, request, timeout or self.network.ping_timeout, retry
        )
        rtt = time.perf_counter() - start
        if response.payload != payload:
            raise StageError(self.device_id, "Ping", "DATA_LOSS", "echoed payload differs")
        return rtt

    async def get_status(
        self, *, timeout: float | None = None, retry: bool = True
    ) -> relay_pb2.StatusResponse:
        """The worker's shard, metrics and health."""
        return await self._retrying(
            "GetStatus",
            self._stub.GetStatus,
            relay_pb2.StatusRequest(),
            timeout or self.network.request_timeout,
            retry,
        )

    async def health(self, *, timeout: float | None = None, retry: bool = True) -> str:
        """The worker's overall ``grpc.health.v1`` status: SERVING, NOT_SERVING, ..."""
        response = await self._retrying(
            "Check",
            self._health.Check,
            health_pb2.HealthCheckRequest(service=""),
            timeout or self.network.ping_timeout,
            retry,
        )
        return _HEALTH_NAMES.get(response.status, "UNKNOWN")

    async def wait_serving(self, timeout: float) -> None:
        """Wait until the worker reports SERVING.

        Raises:
            WorkerUnavailable: not SERVING after ``timeout`` seconds; the message carries the
                last status or error seen.
            TLSHandshakeFailed: at once, when the TLS handshake fails.
        """
        deadline = time.monotonic() + timeout
        delay = 0.05
        last = "no answer yet"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerUnavailable(
                    self.device_id,
                    f"not serving at {self.address} after {timeout:g} s (last: {last})",
                )
            try:
                status = await self.health(
                    timeout=min(self.network.ping_timeout, remaining), retry=False
                )
                if status == "SERVING":
                    return
                last = f"health {status}"
            except TLSHandshakeFailed:
                raise
            except RelayError as exc:
                last = str(exc)
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 1.0)

    async def close(self) -> None:
        self._closed = True
        if self._opening is not None:
            self._opening.cancel()
            await asyncio.gather(self._opening, return_exceptions=True)
        if self._link is not None:
            self._link.close()
            self._link = None
        if self._streams is not None:
            await self._streams.close()
        await self._channel.close()

    async def _retrying(
        self,
        method: str,
        fn: Callable[..., Awaitable[T]],
        request: Any,
        timeout: float,
        retry: bool = True,
    ) -> T:
        attempts = 1 + (self.network.retries if retry else 0)
        for attempt in range(attempts):
            try:
                return await self._call(method, fn, request, timeout, translate=False)
            except grpc.aio.AioRpcError as exc:
                error = translate_rpc_error(self.device_id, method, exc, timeout)
                retried = exc.code() == grpc.StatusCode.UNAVAILABLE
                if not retried or isinstance(error, TLSHandshakeFailed) or attempt == attempts - 1:
                    raise error from None
                delay = self.network.retry_backoff * 2**attempt
                logger.debug("%s to %s unavailable, retry in %.2f s", method, self.device_id, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _call(
        self,
        method: str,
        fn: Callable[..., Awaitable[T]],
        request: Any,
        timeout: float,
        *,
        translate: bool = True,
        metadata: Sequence[tuple[str, str]] | None = None,
    ) -> T:
        try:
            return await fn(request, timeout=timeout, metadata=metadata or self._metadata)
        except grpc.aio.AioRpcError as exc:
            if not translate:
                raise
            raise translate_rpc_error(self.device_id, method, exc, timeout) from None
