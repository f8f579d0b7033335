"""Waiting for a background loop's rounds instead of sleeping and hoping."""

from __future__ import annotations

import asyncio
import time

from mlx_relay.core.tasks import PeriodicTask


async def wait_rounds(task: PeriodicTask, count: int, timeout: float = 20.0) -> None:
    """Wait until ``count`` more rounds of ``task`` completed (fails after ``timeout``)."""
    target = task.rounds + count
    deadline = time.monotonic() + timeout
    while task.rounds < target:
        assert time.monotonic() < deadline, f"only {task.rounds} of {target} rounds ran"
        await asyncio.sleep(0.02)
