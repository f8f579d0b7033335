"""Delivering notifications: one bounded queue and one sender task per destination.

``offer`` never blocks and never grows memory: when the queue is full the oldest waiting
notification is dropped and counted. The sender POSTs each one as JSON, retrying failures
with exponential backoff; a receiver that is down or slow only ever delays its own queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from mlx_relay.core.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

OUTCOMES = ("sent", "failed", "dropped")
Sleep = Callable[[float], Awaitable[None]]


class DeliveryQueue:
    """POSTs JSON bodies to ``url``, in order, at most ``queue_size`` waiting.

    Args:
        name: The receiver's name (the ``receiver`` label of the notification counters).
        url: Where to POST.
        timeout: Seconds for one attempt.
        max_attempts: Attempts per notification before it counts as failed.
        retry_backoff: Seconds before the second attempt, doubled for each further one.
        queue_size: Notifications that may wait; past it the oldest is dropped.
        client: The HTTP client to use (one is made, and closed, when not given).
        sleep: The backoff's sleep (tests pass a fake one).
    """

    def __init__(
        self,
        name: str,
        url: str,
        *,
        timeout: float = 10.0,
        max_attempts: int = 3,
        retry_backoff: float = 1.0,
        queue_size: int = 64,
        client: httpx.AsyncClient | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.name = name
        self.url = url
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.retry_backoff = retry_backoff
        self.queue_size = queue_size
        self.counts = dict.fromkeys(OUTCOMES, 0)
        self.last_error: str | None = None
        self.failing = False
        self._queue: deque[Any] = deque()
        self._ready = asyncio.Event()
        self._client = client
        self._owns_client = client is None
        self._sleep = sleep
        self._task: asyncio.Task[None] | None = None

    @property
    def queued(self) -> int:
        return len(self._queue)

    def offer(self, body: Any) -> None:
        """Queue ``body`` for delivery, dropping the oldest waiting one when full."""
        while len(self._queue) >= self.queue_size:
            self._queue.popleft()
            self.counts["dropped"] += 1
        self._queue.append(body)
        self._ready.set()

    def start(self) -> None:
        if self._task is None:
            if self._client is None:
                self._client = httpx.AsyncClient(timeout=self.timeout)
            self._task = asyncio.create_task(self._run(), name=f"alert-delivery-{self.name}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        if self._owns_client and self._client is not None:
            with contextlib.suppress(httpx.HTTPError, RuntimeError):
                await self._client.aclose()
            self._client = None

    async def _run(self) -> None:
        while True:
            await self._ready.wait()
            while self._queue:
                body = self._queue.popleft()
                await self.deliver(body)
            self._ready.clear()

    async def deliver(self, body: Any) -> bool:
        """POST ``body`` with retries; True once a 2xx answer came back."""
        assert self._client is not None, "start() the queue first"
        delay = self.retry_backoff
        for attempt in range(1, self.max_attempts + 1):
            try:
                response = await self._client.post(self.url, json=body, timeout=self.timeout)
                if response.is_success:
                    self.counts["sent"] += 1
                    if self.failing:
                        logger.info("alert notifications to %s are delivered again", self.name)
                    self.failing = False
                    return True
                self.last_error = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
            if attempt < self.max_attempts:
                await self._sleep(delay)
                delay *= 2
        self.counts["failed"] += 1
        # One warning when a receiver starts failing, not one per notification while it is down.
        log = logger.debug if self.failing else logger.warning
        log(
            "alert notification to %s failed after %d attempts: %s",
            self.name,
            self.max_attempts,
            self.last_error,
        )
        self.failing = True
        return False
