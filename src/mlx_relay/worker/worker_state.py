"""What a worker's service reads and its lifecycle writes: the stage's runtime once loaded,
its peers, collector, tracer and health, shared on the worker's event loop."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from mlx_relay.core.types import LayerRange
from mlx_relay.monitoring.health_rules import serving_blockers
from mlx_relay.worker.executor import MLXExecutor
from mlx_relay.worker.relay import PeerClients
from mlx_relay.worker.stage import StageRuntime
from mlx_relay.worker.step_threads import StepThreads


@dataclass
class WorkerState:
    """What the service reads and the worker's lifecycle writes, shared on the event loop."""

    device_id: str
    stage: int
    executor: MLXExecutor
    collector: Any = None
    health: Any = None
    layer_range: LayerRange | None = None
    model_info: Any = None
    runtime: StageRuntime | None = None
    peers: PeerClients | None = None
    tracer: Any = None  # an OpenTelemetry Tracer when this worker records spans
    threads: StepThreads | None = None
    load_error: BaseException | None = None
    reshard: Any = None  # worker.reshard.StageReshard, once the first range is loaded
    stopping: bool = False
    started_at: float = field(default_factory=time.monotonic)
    _reported_sessions: int = -1

    @property
    def blas_threads(self) -> int:
        """The BLAS threads of a step that computes alone (0: no BLAS library loaded)."""
        if self.runtime is None or self.runtime.engine.blas_threads == 0:
            return 0
        return self.threads.policy.most if self.threads else self.runtime.engine.blas_threads

    @property
    def kv_sessions(self) -> int:
        return len(self.runtime.sessions) if self.runtime is not None else 0

    def report_sessions(self) -> None:
        """Tell the collector the session count when it changed."""
        count = self.kv_sessions
        if self.collector is not None and count != self._reported_sessions:
            self.collector.set_kv_sessions(count)
        self._reported_sessions = count

    def health_status(self) -> str:
        if self.health is None:
            return "unknown"
        status = self.health.overall_status
        return str(getattr(status, "value", status))

    def takes_traffic(self) -> bool:
        """False while a health check says this stage cannot serve: a full disk, a process out
        of file descriptors, or a CRITICAL check other than memory, CPU and peers (see
        :func:`~mlx_relay.monitoring.health_rules.serving_blockers`).

        Memory pressure and a saturated CPU are warnings: holding layers in memory and
        computing flat out are what a serving worker does. They still show as CRITICAL in
        the health summary.
        """
        if self.health is None:
            return True
        return not serving_blockers(self.health.get_health_summary()["checks"])
