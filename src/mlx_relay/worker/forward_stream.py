"""The worker's side of ``ForwardStream``: many ``Forward`` calls on one long-lived gRPC
stream, each answered when it is done.

Each :class:`~mlx_relay.proto.relay_pb2.ForwardCall` runs as a unary ``Forward`` would (the
same checks, compute, relay, timings and spans; :meth:`WorkerServicer.serve_forward`), with
its deadline from the call's ``timeout_seconds`` counted from its arrival. Its answer carries
its ``call_id``, and either the response or the status the unary call would have ended with.
One failing call does not end the stream; the stream ends when its caller closes it, or
with the status of a failure of the stream itself (a dropped connection).

A stream holds at most ``max_calls`` calls at once (``network.maximum_concurrent_rpcs``, as
the server counts unary calls): past it a call is answered RESOURCE_EXHAUSTED at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import grpc

from mlx_relay.proto import relay_pb2 as pb
from mlx_relay.stream_client import ACCEPTED_KEY, DIRECT_PORT_KEY
from mlx_relay.worker.auth import peer_of
from mlx_relay.worker.forward_call import CallFailed, ForwardCallInfo
from mlx_relay.worker.tracing import metadata_traceparent

if TYPE_CHECKING:
    from mlx_relay.worker.service import WorkerServicer

logger = logging.getLogger(__name__)

# What grpc itself answers past maximum_concurrent_rpcs; the client reads the same words.
CALL_LIMIT_DETAIL = "Concurrent RPC limit exceeded: {limit} Forward calls on this stream"


class StreamCalls:
    """The calls of one stream (``ForwardStream``, or a direct link:
    :mod:`mlx_relay.worker.direct_link`) being answered, each in its own task.

    Args:
        servicer: runs each call (:meth:`WorkerServicer.serve_forward`).
        peer: who sent them (the session quota's peer).
        parent: the stream's trace context, for calls that carry none.
        send: writes one answer on the stream.
        max_calls: the most calls running at once (None: no limit).
    """

    def __init__(
        self,
        servicer: WorkerServicer,
        peer: str,
        parent: str,
        send: Callable[[pb.ForwardAnswer], Awaitable[None]],
        max_calls: int | None,
    ) -> None:
        self._servicer = servicer
        self._peer = peer
        self._parent = parent
        self._send = send
        self._max_calls = max_calls
        self.running: set[asyncio.Task[None]] = set()

    @property
    def full(self) -> bool:
        """``max_calls`` calls are running: the next is refused."""
        return self._max_calls is not None and len(self.running) >= self._max_calls

    async def refuse(self, call: pb.ForwardCall) -> None:
        """Answer ``call`` RESOURCE_EXHAUSTED, as gRPC answers a call past its limit."""
        limited = CallFailed(
            grpc.StatusCode.RESOURCE_EXHAUSTED, CALL_LIMIT_DETAIL.format(limit=self._max_calls)
        )
        await self._deliver(failed_answer(call.call_id, limited))

    def take(self, call: pb.ForwardCall, received: float) -> None:
        """Start answering ``call`` (got at ``received``, ``time.monotonic()``); past
        ``max_calls`` it is refused (:meth:`refuse`)."""
        loop = asyncio.get_running_loop()
        if self.full:
            task = loop.create_task(self.refuse(call))
        else:
            task = loop.create_task(self._answer(call, received))
        self.running.add(task)
        task.add_done_callback(self.running.discard)

    async def drain(self) -> None:
        """Wait until every call taken is answered."""
        while self.running:
            await asyncio.gather(*self.running, return_exceptions=True)

    def cancel(self) -> None:
        for task in list(self.running):
            task.cancel()

    async def _answer(self, call: pb.ForwardCall, received: float) -> None:
        info = ForwardCallInfo(
            peer=self._peer,
            traceparent=call.traceparent or self._parent,
            deadline=received + call.timeout_seconds if call.timeout_seconds > 0 else None,
        )
        try:
            response = await self._servicer.serve_forward(call.request, info)
            reply = pb.ForwardAnswer(call_id=call.call_id, response=response)
        except CallFailed as failed:
            reply = failed_answer(call.call_id, failed)
        except Exception as exc:  # a bug: the call fails, the stream and the others go on
            logger.exception("streamed Forward failed")
            reply = failed_answer(
                call.call_id, CallFailed(grpc.StatusCode.INTERNAL, f"forward failed: {exc}")
            )
        await self._deliver(reply)

    async def _deliver(self, reply: pb.ForwardAnswer) -> None:
        try:
            await self._send(reply)
        except Exception as exc:  # the stream is gone: nobody waits for this answer
            logger.debug("answer to streamed Forward %d not sent: %s", reply.call_id, exc)


async def serve_stream(
    servicer: WorkerServicer,
    calls: AsyncIterator[pb.ForwardCall],
    context: grpc.aio.ServicerContext,
    max_calls: int | None = None,
) -> None:
    """Answer every call of one stream; return once the caller closed it and every call is
    answered. Cancelled (the caller went away): the calls still running are cancelled."""
    # The caller writes its first call once it has this (mlx_relay/stream_client.py), and
    # opens the worker's direct link when it names one (mlx_relay/direct_link.py).
    accepted = [(ACCEPTED_KEY, "1")]
    if servicer.direct_port:
        accepted.append((DIRECT_PORT_KEY, str(servicer.direct_port)))
    await context.send_initial_metadata(tuple(accepted))
    writing = asyncio.Lock()

    async def send(answer: pb.ForwardAnswer) -> None:
        async with writing:
            await context.write(answer)

    stream = StreamCalls(
        servicer,
        peer_of(context),
        metadata_traceparent(context.invocation_metadata()),
        send,
        max_calls,
    )
    try:
        async for call in calls:
            if stream.full:  # answered before the next is read, as gRPC refuses a call
                await stream.refuse(call)
                continue
            stream.take(call, time.monotonic())
        await stream.drain()
    finally:
        stream.cancel()


def failed_answer(call_id: int, failed: CallFailed) -> pb.ForwardAnswer:
    return pb.ForwardAnswer(
        call_id=call_id,
        code=failed.code.name,
        detail=failed.detail,
        failed_device=failed.failed_device,
    )
