"""A worker's two background loops: the serving-health watch and the idle-session sweep.

Both are :class:`~mlx_relay.core.tasks.PeriodicTask`: each counts its rounds (``rounds``), so
a test can wait for rounds that ran instead of sleeping and hoping, and a round that raises
is logged and the loop goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from mlx_relay.core.tasks import PeriodicTask
from mlx_relay.worker.grpc_endpoint import WorkerGrpcServer
from mlx_relay.worker.service import WorkerState

logger = logging.getLogger(__name__)


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
