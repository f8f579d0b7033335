"""One ``Forward`` as the service handles it, whether it came as a unary call or on the
stream (``ForwardStream``): who sent it, its trace context and deadline, and how it fails.

A failing step raises :class:`CallFailed` with the status a unary ``Forward`` ends with; the
unary handler aborts its call with it, the stream answers that one call with it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc

from mlx_relay.worker.auth import peer_of
from mlx_relay.worker.tracing import metadata_traceparent
from mlx_relay.worker_client import FAILED_DEVICE_KEY


class CallFailed(Exception):
    """The status one Forward ends with. ``failed_device``: a relayed failure's stage (goes
    in the trailing metadata of a unary call, in the answer on the stream)."""

    def __init__(self, code: grpc.StatusCode, detail: str, failed_device: str = "") -> None:
        super().__init__(f"{code.name}: {detail}")
        self.code = code
        self.detail = detail
        self.failed_device = failed_device

    async def abort(self, context: grpc.aio.ServicerContext) -> None:
        """End a unary call with this status."""
        if self.failed_device:
            context.set_trailing_metadata(((FAILED_DEVICE_KEY, self.failed_device),))
        await context.abort(self.code, self.detail)


@dataclass(frozen=True)
class ForwardCallInfo:
    """What a Forward needs of its call. ``deadline``: ``time.monotonic()`` by which the
    caller wants its answer (None: no deadline)."""

    peer: str
    traceparent: str
    deadline: float | None

    @classmethod
    def of_unary(cls, context: grpc.aio.ServicerContext) -> ForwardCallInfo:
        remaining = context.time_remaining()
        return cls(
            peer=peer_of(context),
            traceparent=metadata_traceparent(context.invocation_metadata()),
            deadline=None if remaining is None else time.monotonic() + remaining,
        )

    def time_remaining(self) -> float | None:
        """Seconds left before the deadline (None: no deadline)."""
        return None if self.deadline is None else self.deadline - time.monotonic()
