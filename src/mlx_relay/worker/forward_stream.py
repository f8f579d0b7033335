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
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from mlx_relay.proto import relay_pb2 as pb
from mlx_relay.stream_client import ACCEPTED_KEY
from mlx_relay.worker.auth import peer_of
from mlx_relay.worker.forward_call import CallFailed, ForwardCallInfo
from mlx_relay.worker.tracing import metadata_traceparent

if TYPE_CHECKING:
    from mlx_relay.worker.service import WorkerServicer

logger = logging.getLogger(__name__)

# What grpc itself answers past maximum_concurrent_rpcs; the client reads the same words.
CALL_LIMIT_DETAIL = "Concurrent RPC limit exceeded: {limit} Forward calls on this stream"


async def serve_stream(
    servicer: WorkerServicer,
    calls: AsyncIterator[pb.ForwardCall],
    context: grpc.aio.ServicerContext,
    max_calls: int | None = None,
) -> None:
    """Answer every call of one stream; return once the caller closed it and every call is
    answered. Cancelled (the caller went away): the calls still running are cancelled."""
    # The caller writes its first call once it has this (mlx_relay/stream_client.py).
    await context.send_initial_metadata(((ACCEPTED_KEY, "1"),))
    peer = peer_of(context)
    stream_parent = metadata_traceparent(context.invocation_metadata())
    writing = asyncio.Lock()
    running: set[asyncio.Task[None]] = set()

    async def send(answer: pb.ForwardAnswer) -> None:
        async with writing:
            await context.write(answer)

    async def answer(call: pb.ForwardCall, received: float) -> None:
        info = ForwardCallInfo(
            peer=peer,
            traceparent=call.traceparent or stream_parent,
            deadline=received + call.timeout_seconds if call.timeout_seconds > 0 else None,
        )
        try:
            response = await servicer.serve_forward(call.request, info)
            reply = pb.ForwardAnswer(call_id=call.call_id, response=response)
        except CallFailed as failed:
            reply = failed_answer(call.call_id, failed)
        except Exception as exc:  # a bug: the call fails, the stream and the others go on
            logger.exception("streamed Forward failed")
            reply = failed_answer(
                call.call_id, CallFailed(grpc.StatusCode.INTERNAL, f"forward failed: {exc}")
            )
        try:
            await send(reply)
        except Exception as exc:  # the stream is gone: nobody waits for this answer
            logger.debug("answer to streamed Forward %d not sent: %s", call.call_id, exc)

    try:
        async for call in calls:
            received = time.monotonic()
            if max_calls is not None and len(running) >= max_calls:
                limited = CallFailed(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, CALL_LIMIT_DETAIL.format(limit=max_calls)
                )
                await send(failed_answer(call.call_id, limited))
                continue
            task = asyncio.get_running_loop().create_task(answer(call, received))
            running.add(task)
            task.add_done_callback(running.discard)
        if running:
            await asyncio.gather(*running, return_exceptions=True)
    finally:
        for task in list(running):
            task.cancel()


def failed_answer(call_id: int, failed: CallFailed) -> pb.ForwardAnswer:
    return pb.ForwardAnswer(
        call_id=call_id,
        code=failed.code.name,
        detail=failed.detail,
        failed_device=failed.failed_device,
    )
