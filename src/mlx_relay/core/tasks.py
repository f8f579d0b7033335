"""Ending background asyncio tasks the same way everywhere."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


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
