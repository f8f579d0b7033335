"""Background asyncio tasks: ending them the same way everywhere, and a periodic loop that
survives a failed round."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger(__name__)


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel every given task, then wait until each has ended (``None`` entries are skipped).

    A task's own :class:`asyncio.CancelledError` is absorbed; any other exception it ended
    with propagates.
    """
    live = [task for task in tasks if task is not None]
    for task in live:
        task.cancel()
    for task in live:
        with contextlib.suppress(asyncio.CancelledError):
            await task


class PeriodicTask:
    """Runs ``step`` every ``interval`` seconds in the background until stopped.

    A step that raises is logged with its traceback and counted in ``failures``; the loop
    goes on with the next round.

    Attributes:
        rounds: steps run since :meth:`start` (failed ones included).
        failures: steps that raised.
    """

    def __init__(self, name: str, interval: float, step: Callable[[], Awaitable[None]]) -> None:
        self.name = name
        self.interval = interval
        self.rounds = 0
        self.failures = 0
        self._step = step
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self._step()
            except Exception:
                # One failed round must not end the loop: the next one may well succeed.
                self.failures += 1
                logger.exception(
                    "%s: round failed; the next runs in %.2fs", self.name, self.interval
                )
            self.rounds += 1
