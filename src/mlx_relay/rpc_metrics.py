"""Per-call metrics of a worker client: each call's latency, payload bytes and status code
go to a recorder (``MetricsCollector.record_rpc``)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import grpc
import grpc.aio

logger = logging.getLogger(__name__)


class RpcRecorder(Protocol):
    """Where per-call metrics go (``MetricsCollector.record_rpc``)."""

    def record_rpc(
        self,
        peer: str,
        method: str,
        seconds: float,
        code: str,
        sent_bytes: int = 0,
        received_bytes: int = 0,
    ) -> None: ...


class RpcMetricsInterceptor(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Records each unary call's latency, payload bytes and status code.

    Args:
        peer: the device id of the worker at the other end of the channel.
        recorder: receives one ``record_rpc`` per finished call.
    """

    def __init__(self, peer: str, recorder: RpcRecorder) -> None:
        self.peer = peer
        self.recorder = recorder

    async def intercept_unary_unary(
        self,
        continuation: Callable[[Any, Any], Awaitable[Any]],
        client_call_details: Any,
        request: Any,
    ) -> Any:
        method = _short_method(client_call_details.method)
        sent = request.ByteSize()
        start = time.perf_counter()
        call = await continuation(client_call_details, request)
        try:
            response = await call
        except grpc.aio.AioRpcError as exc:
            self._record(method, time.perf_counter() - start, exc.code().name, sent, 0)
            raise
        except asyncio.CancelledError:
            self._record(method, time.perf_counter() - start, "CANCELLED", sent, 0)
            raise
        self._record(method, time.perf_counter() - start, "OK", sent, response.ByteSize())
        return response

    def _record(self, method: str, seconds: float, code: str, sent: int, received: int) -> None:
        try:
            self.recorder.record_rpc(self.peer, method, seconds, code, sent, received)
        except Exception:  # a metrics problem must never fail an inference call
            logger.exception("recording %s call to %s failed", method, self.peer)


def _short_method(method: str | bytes) -> str:
    name = method.decode() if isinstance(method, bytes) else method
    return name.rsplit("/", 1)[-1]
