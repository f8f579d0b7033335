"""Server-sent events for streamed completions, and what ends a request when its client leaves.

The coordinator's token stream is consumed by :class:`EventPump` in a task of its own, so that
closing it (which aborts the request and frees every stage's KV cache) runs as ordinary asyncio
cancellation, never under the cancel scope Starlette uses when a client disconnects (that scope
would cancel the cleanup's own RPCs as well). The pump is closed from three places, whichever
comes first: the SSE generator's ``finally``, a disconnect seen between chunks, and the
response's background task, which Starlette runs even after a disconnect.

Backpressure: the pump holds one event at a time, so a client that stops reading stops the
pump, and its request pauses in the coordinator once ``inference.stream_buffer_tokens`` events
wait unread. A client that takes no chunk for ``http.stream_stall_timeout`` seconds is dropped
(:class:`PacedStreamingResponse`): its stream closes, which ends its request on every stage.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

from fastapi import Request
from pydantic import BaseModel
from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse
from starlette.types import Send

from mlx_relay.coordinator.requests import TokenEvent, Usage
from mlx_relay.core.errors import RelayError
from mlx_relay.server.openai.errors import OpenAIError, from_relay_error

logger = logging.getLogger(__name__)

T = TypeVar("T")

_END = object()
# Pump tasks still cleaning up after their response is gone (asyncio holds tasks weakly).
_closing: set[asyncio.Task[None]] = set()


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class ChunkFormatter(Protocol):
    def opening(self) -> list[BaseModel]: ...

    def chunks(self, event: TokenEvent) -> list[BaseModel]: ...

    def usage_chunk(self, usage: Usage) -> BaseModel: ...


class EventPump:
    """Consumes an async iterator of token events in its own task.

    Args:
        events: The coordinator's stream; closed (``aclose``) when the pump ends or is closed.
    """

    def __init__(self, events: AsyncIterator[TokenEvent]) -> None:
        self._events = events
        # One event at a time: the pump reads the stream only as fast as the client does.
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=1)
        self._task = asyncio.create_task(self._run())
        _closing.add(self._task)
        self._task.add_done_callback(_closing.discard)

    async def _run(self) -> None:
        try:
            async for event in self._events:
                await self._queue.put(event)
            await self._queue.put(_END)
        except Exception as exc:
            await self._queue.put(exc)
        finally:
            closer = getattr(self._events, "aclose", None)
            if closer is not None:
                await closer()

    async def next(self) -> TokenEvent | None:
        """The next event, or None at the end; re-raises what the stream raised."""
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)
            return None
        if isinstance(item, BaseException):
            raise item
        event: TokenEvent = item
        return event

    async def aclose(self) -> None:
        """Stop consuming: the coordinator aborts the request if it is still running. Does not
        wait for the cleanup, which goes on in the pump's task."""
        if not self._task.done():
            self._task.cancel()


async def until_disconnected(request: Request) -> None:
    """Return once the client has disconnected (the request body must already be read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it and raising :class:`ClientGone` if the client leaves first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(until_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise ClientGone()
    return task.result()


class PacedStreamingResponse(StreamingResponse):
    """A streamed response whose client must take each chunk within ``stall_timeout``
    seconds. One that takes nothing for that long is dropped: the body iterator is closed
    (which ends the request behind it) and the connection with it."""

    def __init__(self, content: AsyncIterator[bytes], *, stall_timeout: float, **kwargs: Any):
        super().__init__(content, **kwargs)
        self.stall_timeout = stall_timeout

    async def stream_response(self, send: Send) -> None:
        body = self.body_iterator
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            async for chunk in body:
                message = {"type": "http.response.body", "body": chunk, "more_body": True}
                try:
                    await asyncio.wait_for(send(message), self.stall_timeout)
                except TimeoutError:
                    logger.warning(
                        "a streaming client read nothing for %.0f s; dropping its stream",
                        self.stall_timeout,
                    )
                    return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            closer = getattr(body, "aclose", None)
            if closer is not None:
                await closer()


def sse(payload: BaseModel | dict[str, Any] | str, *, exclude: set[str] | None = None) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line."""
    if isinstance(payload, BaseModel):
        data = payload.model_dump_json(exclude=exclude)
    elif isinstance(payload, dict):
        data = json.dumps(payload, separators=(",", ":"))
    else:
        data = payload
    return f"data: {data}\n\n".encode()


async def _events(
    request: Request,
    pump: EventPump,
    first: TokenEvent | None,
    formatter: ChunkFormatter,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    # Chunks carry "usage": null only when the client asked for a usage chunk, as OpenAI's do.
    exclude = None if include_usage else {"usage"}
    usage: Usage | None = None
    try:
        for chunk in formatter.opening():
            yield sse(chunk, exclude=exclude)
        event = first
        while event is not None:
            usage = event.usage or usage
            failed = event.finish_reason in ("abort", "error")
            if failed:
                event = dataclasses.replace(event, finish_reason=None)
            for chunk in formatter.chunks(event):
                yield sse(chunk, exclude=exclude)
            if failed:
                yield sse(OpenAIError(500, "the generation was interrupted").body())
                break
            if await request.is_disconnected():
                logger.info("client left mid-stream; ending its request")
                return
            event = await pump.next()
        else:
            if include_usage and usage is not None:
                yield sse(formatter.usage_chunk(usage))
    except RelayError as exc:
        # Headers are sent: the error travels as an event, which OpenAI's clients raise.
        yield sse(from_relay_error(exc).body())
    except Exception:
        logger.exception("streamed generation failed")
        yield sse(OpenAIError(500, "internal server error").body())
    finally:
        await pump.aclose()
    yield b"data: [DONE]\n\n"


async def open_stream(
    request: Request,
    start: Callable[[], AsyncIterator[TokenEvent]],
    formatter: ChunkFormatter,
    *,
    include_usage: bool,
    stall_timeout: float,
    headers: dict[str, str] | None = None,
) -> StreamingResponse:
    """Start a streamed generation and answer with its event stream.

    A client that takes no chunk for ``stall_timeout`` seconds is dropped.

    The first token is awaited before the response starts, so that errors raised on admission
    (invalid parameters, a full queue, no pipeline) still get their HTTP status.

    Raises:
        RelayError: The request was refused before its first token.
        ClientGone: The client left before the first token.
    """
    pump = EventPump(start())
    try:
        first = await unless_disconnected(request, pump.next())
    except BaseException:
        await pump.aclose()
        raise
    return PacedStreamingResponse(
        _events(request, pump, first, formatter, include_usage),
        stall_timeout=stall_timeout,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})},
        background=BackgroundTask(pump.aclose),
    )
