"""Live updates for WebSocket clients: one payload per tick, one sender per client.

One ticker task builds the JSON payload once per interval and offers it to every client's
bounded queue; when a queue is full its oldest message is dropped. Each client has its own
sender task, so a slow or stalled client only ever delays itself. The ticker runs while at
least one client is connected, so the broadcaster needs no start-up or shut-down hook.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from starlette.websockets import WebSocket, WebSocketDisconnect

from mlx_relay.core.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

# How a send or receive ends when the peer has gone (uvicorn's ClientDisconnected is an OSError).
_EXPECTED_CLOSE_ERRORS = (WebSocketDisconnect, OSError, RuntimeError)

# Close code for a client past the cap (RFC 6455 registry: "Try Again Later").
TRY_AGAIN_LATER = 1013

PayloadBuilder = Callable[[str, int], str]
"""Builds one message: ``(kind, sequence) -> JSON text``; kind is 'snapshot' or 'update'."""


@dataclass
class ClientStats:
    """What the broadcaster knows about one connected client."""

    client_id: int
    peer: str
    sent: int
    dropped: int
    queued: int


class LiveClient:
    """One connected WebSocket: its bounded queue and its sender."""

    def __init__(self, client_id: int, websocket: WebSocket, queue_size: int) -> None:
        self.client_id = client_id
        self.websocket = websocket
        self.queue: asyncio.Queue[str] = asyncio.Queue(maxsize=queue_size)
        self.sent = 0
        self.dropped = 0

    def offer(self, message: str) -> None:
        """Queue ``message``, dropping the oldest queued one when the queue is full."""
        while self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(message)

    async def send_forever(self) -> None:
        while True:
            message = await self.queue.get()
            await self.websocket.send_text(message)
            self.sent += 1

    async def receive_until_closed(self) -> None:
        # The page sends nothing; reading detects the disconnect (and drains pings/closes).
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                return

    def stats(self) -> ClientStats:
        client = self.websocket.client
        peer = f"{client.host}:{client.port}" if client else "unknown"
        return ClientStats(self.client_id, peer, self.sent, self.dropped, self.queue.qsize())


class SnapshotBroadcaster:
    """Pushes a fresh payload to every connected client each ``interval`` seconds.

    Args:
        build_payload: ``(kind, sequence) -> JSON text``; called once per tick, and once per
            new client for its initial snapshot.
        interval: Seconds between updates (the collection interval).
        queue_size: Messages a client may have pending before the oldest is dropped.
        max_clients: Clients served at once; one more is closed with
            :data:`TRY_AGAIN_LATER` right after its handshake. None: no cap.
    """

    def __init__(
        self,
        build_payload: PayloadBuilder,
        interval: float,
        *,
        queue_size: int = 4,
        max_clients: int | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self._build_payload = build_payload
        self.interval = interval
        self._queue_size = queue_size
        self.max_clients = max_clients
        self._clients: dict[int, LiveClient] = {}
        self._next_id = 0
        self._sequence = 0
        self._ticker: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def sequence(self) -> int:
        return self._sequence

    def clients(self) -> list[ClientStats]:
        return [client.stats() for client in self._clients.values()]

    async def serve(self, websocket: WebSocket) -> None:
        """Run one accepted WebSocket until it disconnects: initial snapshot, then updates."""
        if self._closed:
            await websocket.close(code=1001)
            return
        # No await between this check and the registration below: the cap holds exactly.
        if self.max_clients is not None and len(self._clients) >= self.max_clients:
            logger.warning("refusing a WebSocket client: %d connected already", len(self._clients))
            await websocket.close(code=TRY_AGAIN_LATER, reason="too many live clients")
            return
        self._next_id += 1
        client = LiveClient(self._next_id, websocket, self._queue_size)
        client.offer(self._build_payload("snapshot", self._sequence))
        self._clients[client.client_id] = client
        self._ensure_ticker()
        sender = asyncio.create_task(client.send_forever(), name=f"ws-send-{client.client_id}")
        receiver = asyncio.create_task(
            client.receive_until_closed(), name=f"ws-recv-{client.client_id}"
        )
        try:
            done, _ = await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                error = task.exception()
                if error is not None and not isinstance(error, _EXPECTED_CLOSE_ERRORS):
                    logger.warning("WebSocket client %s failed: %r", client.client_id, error)
        finally:
            self._clients.pop(client.client_id, None)
            for task in (sender, receiver):
                task.cancel()
            for task in (sender, receiver):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            logger.debug("WebSocket client %s left (%s)", client.client_id, client.stats())

    def _ensure_ticker(self) -> None:
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.create_task(self._tick_while_clients(), name="ws-broadcast")

    async def _tick_while_clients(self) -> None:
        while self._clients and not self._closed:
            await asyncio.sleep(self.interval)
            if not self._clients:
                break
            self._sequence += 1
            try:
                payload = self._build_payload("update", self._sequence)
            except Exception:
                # A failed build skips this tick; the next one tries again.
                logger.exception("building the live update failed")
                continue
            for client in list(self._clients.values()):
                client.offer(payload)

    async def close(self) -> None:
        """Stop updates and close every client (used when the server stops)."""
        self._closed = True
        for client in list(self._clients.values()):
            try:
                await asyncio.wait_for(client.websocket.close(code=1001), timeout=1.0)
            except (*_EXPECTED_CLOSE_ERRORS, TimeoutError) as exc:
                # The client went away first or does not answer: shutdown goes on without it.
                logger.debug("closing WebSocket client %s: %r", client.client_id, exc)
        ticker, self._ticker = self._ticker, None
        await cancel_and_wait(ticker)
