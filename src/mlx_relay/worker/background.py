"""A worker's two background loops: the serving-health watch and the idle-session sweep.

Each counts its completed rounds (``rounds``), so a test can wait for rounds that ran
instead of sleeping and hoping.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from mlx_relay.core.tasks import cancel_and_wait
from mlx_relay.worker.grpc_endpoint import WorkerGrpcServer
from mlx_relay.worker.service import WorkerState

logger = logging.getLogger(__name__)


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


class ServingHealthWatch(PeriodicTask):
    """Keeps ``grpc.health.v1`` true to the stage: SERVING while its layers are loaded and no
    health check says it cannot serve (:meth:`WorkerState.takes_traffic`), NOT_SERVING
    otherwise.

    Args:
        state: the worker's shared state (runtime, health monitor, stopping).
        grpc_server: whose health service answers.
        report: called with ``model_loaded=`` after each verdict (the worker's own status).
        interval: seconds between verdicts.
    """

    def __init__(
        self,
        state: WorkerState,
        grpc_server: WorkerGrpcServer,
        report: Callable[..., None],
        interval: float,
    ) -> None:
        super().__init__(f"health-watch-{state.device_id}", interval, self.refresh)
        self._state = state
        self._grpc = grpc_server
        self._report = report

    async def refresh(self) -> None:
        """One verdict, now."""
        state = self._state
        loaded = state.runtime is not None
        if state.health is not None:
            # The gRPC server is up: this feeds the monitor's own service check, which must
            # not depend on the verdict below or CRITICAL would latch.
            state.health.set_service_state(True, loaded)
        serving = loaded and state.takes_traffic() and not state.stopping
        self._report(model_loaded=loaded)
        await self._grpc.set_serving(serving)


class SessionSweep(PeriodicTask):
    """Frees KV sessions idle for longer than ``ttl`` seconds (checked every quarter TTL,
    between 0.05 and 10 seconds)."""

    def __init__(self, state: WorkerState, ttl: float) -> None:
        super().__init__(
            f"session-sweep-{state.device_id}", max(0.05, min(ttl / 4, 10.0)), self.sweep
        )
        self._state = state
        self.ttl = ttl

    async def sweep(self) -> None:
        runtime = self._state.runtime
        if runtime is None:
            return
        expired = runtime.sessions.expire()
        if expired:
            logger.info("freed %d idle session(s) after %.0fs", len(expired), self.ttl)
            self._state.report_sessions()
