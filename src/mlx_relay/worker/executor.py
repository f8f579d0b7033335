"""The one thread of a worker process that touches MLX.

Loading, tensor conversion and every forward pass run here, in submission order, so MLX
state is never shared between threads and the asyncio loop never waits on ``mx.eval``.

The thread is a daemon: a worker stopped while it is still loading its layers (Ctrl-C
during a load of many seconds) exits at once instead of waiting for the load to finish.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

_Job = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class _DaemonThread(Executor):
    """One daemon thread running submitted jobs in order (a ``concurrent.futures`` executor,
    so asyncio's ``run_in_executor`` drives it)."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        with self._lock:
            if self._closed:
                raise RuntimeError("the MLX executor is shut down")
            future: Future[T] = Future()
            self._jobs.put((future, fn, args, kwargs))
            return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                if cancel_futures:
                    self._cancel_queued()
                self._jobs.put(None)
        if wait:
            self._thread.join()
            _wait_for_native_exit(self._thread)

    def _cancel_queued(self) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job[0].cancel()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args, kwargs = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # the caller sees every failure, as with a pool
                future.set_exception(exc)


def _wait_for_native_exit(thread: threading.Thread, timeout: float = 2.0) -> None:
    """Wait until a joined thread is gone from the OS too (Linux: its ``/proc`` entry).

    ``join`` returns before the thread's C++ thread-local destructors run, and MLX's
    compile cache is one of them: it takes the GIL to drop the compiled functions. Should
    the process begin to exit in that window, the interpreter ends the thread inside the
    destructor and the C++ runtime aborts the process ("terminate called without an active
    exception", exit -6 after a clean stop).
    """
    native = thread.native_id
    task = Path(f"/proc/self/task/{native}")
    if native is None or not task.parent.exists():
        return
    deadline = time.monotonic() + timeout
    while task.exists() and time.monotonic() < deadline:
        time.sleep(0.001)


class MLXExecutor:
    """Runs callables on a single dedicated thread and awaits them from asyncio.

    Args:
        name: prefix of the thread's name (shows in logs and debuggers).
    """

    def __init__(self, name: str = "mlx") -> None:
        self._pool = _DaemonThread(name=f"{name}_0")
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

    async def shutdown(self, wait: bool = True) -> None:
        """Drop queued jobs and stop the thread (idempotent).

        Args:
            wait: wait for the running job to finish (a forward pass); without it the
                thread finishes that job on its own, or is dropped when the process exits
                (a load abandoned by a stop).
        """
        if self._closed:
            return
        self._closed = True
        if not wait:
            self._pool.shutdown(wait=False, cancel_futures=True)
            logger.debug("MLX thread left to finish its job")
            return
        # Joining the thread may wait for a long forward pass: keep the loop free meanwhile.
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)
        logger.debug("MLX thread stopped")
