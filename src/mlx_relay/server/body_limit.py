"""A cap on request bodies: past ``http.max_body_bytes``, 413 in OpenAI's error shape.

A body announced larger (``Content-Length``) is refused before any of it is read; a chunked
one is read up to the cap and refused as soon as it passes it. Either way nothing reaches
the routes, so a multi-megabyte body is never parsed, validated or tokenized.
"""

from __future__ import annotations

from typing import Literal

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlx_relay.server.openai.errors import OpenAIError

ReadOutcome = Literal["complete", "too_large", "gone"]


def too_large(limit: int) -> OpenAIError:
    return OpenAIError(
        413,
        f"the request body is larger than {limit} bytes (http.max_body_bytes)",
        code="request_too_large",
    )


class BodySizeLimit:
    """ASGI middleware refusing HTTP request bodies over ``limit`` bytes.

    Args:
        app: the wrapped ASGI app.
        limit: the most bytes a body may have.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        announced = Headers(scope=scope).get("content-length")
        if announced is not None and announced.isdigit() and int(announced) > self.limit:
            await too_large(self.limit).response()(scope, receive, send)
            return
        outcome, body = await self._read(receive)
        if outcome == "too_large":
            await too_large(self.limit).response()(scope, receive, send)
            return
        if outcome == "gone":
            return  # the client left before its body was read: nobody to answer
        replayed = False

        async def replay() -> Message:
            # The whole body once, then the client's own messages (a disconnect).
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read(self, receive: Receive) -> tuple[ReadOutcome, bytes]:
        """The body, or ``too_large`` as soon as it passes the limit (it is not read any
        further), or ``gone`` if the client disconnected first."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return "gone", b""
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return "too_large", b""
            chunks.append(chunk)
            if not message.get("more_body", False):
                return "complete", b"".join(chunks)
