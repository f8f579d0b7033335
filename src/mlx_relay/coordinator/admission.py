"""Admission control: a bounded number of running requests and a bounded FIFO queue."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from mlx_relay.core.errors import QueueFull


class Admission:
    """At most ``max_running`` requests run; at most ``max_waiting`` more wait, first in
    first out; past that, :class:`QueueFull` is raised at once (HTTP 429).

    Args:
        max_running: requests allowed to run at the same time.
        max_waiting: requests allowed to wait for a running slot.
        on_change: called with ``(running, waiting)`` whenever either changes.
    """

    def __init__(
        self,
        max_running: int,
        max_waiting: int,
        on_change: Callable[[int, int], None] | None = None,
    ) -> None:
        if max_running < 1 or max_waiting < 0:
            raise ValueError("max_running must be >= 1 and max_waiting >= 0")
        self.max_running = max_running
        self.max_waiting = max_waiting
        self._on_change = on_change
        self._running = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def check(self) -> None:
        """Raise :class:`QueueFull` if a new request could be neither run nor queued now."""
        if self._running >= self.max_running and len(self._waiters) >= self.max_waiting:
            raise QueueFull(
                f"{self._running} requests running and {len(self._waiters)} waiting "
                f"(limits {self.max_running} and {self.max_waiting}); retry later"
            )

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold a running slot for the duration of the ``async with`` block, waiting in the
        queue first if every slot is taken."""
        await self._acquire()
        try:
            yield
        finally:
            self._release()

    async def _acquire(self) -> None:
        if self._running < self.max_running and not self._waiters:
            self._running += 1
            self._changed()
            return
        self.check()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._changed()
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                # The slot was handed over just before the cancellation: pass it on.
                self._release()
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
                self._changed()
            raise

    def _release(self) -> None:
        # Hand the slot straight to the oldest waiter so no newcomer can overtake it.
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._changed()
                return
        self._running -= 1
        self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self._running, len(self._waiters))
