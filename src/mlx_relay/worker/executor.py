"""The one thread of a worker process that touches MLX.

Loading, tensor conversion and every forward pass run here, in submission order, so MLX
state is never shared between threads and the asyncio loop never waits on ``mx.eval``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


class MLXExecutor:
    """Runs callables on a single dedicated thread and awaits them from asyncio.

    Args:
        name: prefix of the thread's name (shows in logs and debuggers).
    """

    def __init__(self, name: str = "mlx") -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._closed = False

    async def run(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` on the MLX thread and return its result.

        Raises:
            RuntimeError: the executor was shut down.
        """
        if self._closed:
            raise RuntimeError("the MLX executor is shut down")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    @property
    def closed(self) -> bool:
        return self._closed

    async def shutdown(self) -> None:
        """Finish the running job, drop queued ones, and stop the thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        # Joining the thread may wait for a long forward pass: keep the loop free meanwhile.
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)
        logger.debug("MLX thread stopped")
