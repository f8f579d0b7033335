"""The coordinator's engine: connects to the stages and runs requests through them.

``DistributedOrchestrator`` holds the tokenizer, one :class:`WorkerClient` per stage,
admission control and (optionally) the coordinator's monitoring. Each request runs in its
own :class:`~mlx_relay.coordinator.pipeline.RequestRun`, so requests interleave on the stages.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from mlx_relay.coordinator.admission import Admission
from mlx_relay.coordinator.client import WorkerClient
from mlx_relay.coordinator.cluster import ClusterMonitor
from mlx_relay.coordinator.pipeline import RequestRun, RunTracker, Stage
from mlx_relay.coordinator.prepare import PromptLimits, prepare_request
from mlx_relay.coordinator.requests import InferenceRequest, InferenceResponse, TokenEvent
from mlx_relay.core.config import ClusterConfig
from mlx_relay.core.errors import PipelineNotReady, RelayError, ShardMismatch, WorkerUnavailable
from mlx_relay.model.load import ModelInfo, read_model_info, resolve_model_dir
from mlx_relay.model.partition import assign_layers
from mlx_relay.model.tokenizer import eos_token_ids, load_tokenizer

__all__ = [
    "DistributedOrchestrator",
    "InferenceRequest",
    "InferenceResponse",
    "Stage",
    "WorkersUnreachable",
]

logger = logging.getLogger(__name__)


class WorkersUnreachable(WorkerUnavailable):
    """Some workers were not SERVING within ``network.connect_timeout``.

    Attributes:
        failures: ``(device_id, address, last error)`` of each worker that failed.
    """

    def __init__(self, failures: list[tuple[str, str, str]], total: int) -> None:
        listed = "; ".join(f"{d} at {a} ({e})" for d, a, e in failures)
        RelayError.__init__(self, f"{len(failures)} of {total} workers unreachable: {listed}")
        self.device_id = failures[0][0]
        self.failures = failures


class DistributedOrchestrator:
    """Drives requests through the cluster's pipeline of workers.

    Args:
        config: the validated cluster configuration.
        enable_monitoring: record metrics and health (also off when ``monitoring.enabled`` is
            false in the config). Off: no collector, no background task, nothing recorded.
        metrics_collector: use this collector instead of creating one (its owner starts and
            stops it).
        health_monitor: likewise for the health monitor.

    Attributes:
        tokenizer: the model's tokenizer (after :meth:`initialize`).
        model_info: the model's facts (after :meth:`initialize`).
        stages: the pipeline in order (after :meth:`initialize`).
        metrics_collector: the coordinator's MetricsCollector, or None.
        health_monitor: the coordinator's HealthMonitor, or None.
        cluster_monitor: polls every worker (None without monitoring).
    """

    def __init__(
        self,
        config: ClusterConfig,
        enable_monitoring: bool = True,
        *,
        metrics_collector: Any | None = None,
        health_monitor: Any | None = None,
    ) -> None:
        self.config = config
        self.enable_monitoring = enable_monitoring and config.monitoring.enabled
        self.tokenizer: Any = None
        self.model_info: ModelInfo | None = None
        self.stages: list[Stage] = []
        self.metrics_collector: Any | None = None
        self.health_monitor: Any | None = None
        self.cluster_monitor: ClusterMonitor | None = None
        self._owned: list[Any] = []
        self._clients: list[WorkerClient] = []
        self._eos_ids: set[int] = set()
        self._limits: PromptLimits | None = None
        self._admission = Admission(
            config.inference.max_running_requests,
            config.inference.max_waiting_requests,
            on_change=self._admission_changed,
        )
        self._tracker = RunTracker()
        self._ready = False
        self._closed = False
        if self.enable_monitoring:
            self._create_monitoring(metrics_collector, health_monitor)

    @property
    def device_id(self) -> str:
        coordinator = self.config.coordinator
        return coordinator.id if coordinator is not None else "coordinator"

    @property
    def ready(self) -> bool:
        return self._ready and not self._closed

    @property
    def running_requests(self) -> int:
        return self._admission.running

    @property
    def waiting_requests(self) -> int:
        return self._admission.waiting

    def _create_monitoring(self, collector: Any | None, health: Any | None) -> None:
        from mlx_relay.monitoring import HealthMonitor, MetricsCollector

        monitoring = self.config.monitoring
        if collector is None:
            collector = MetricsCollector(
                self.device_id,
                monitoring.collection_interval,
                role="coordinator",
                retention_seconds=monitoring.retention_seconds,
            )
            self._owned.append(collector)
        if health is None:
            health = HealthMonitor(
                self.device_id,
                thresholds=monitoring.thresholds,
                metrics_collector=collector,
                check_interval=monitoring.health_check_interval,
            )
            self._owned.append(health)
        self.metrics_collector = collector
        self.health_monitor = health

    async def initialize(self) -> None:
        """Load the tokenizer and model facts (not the weights), connect to every worker and
        wait until all are SERVING, check their shards, then start monitoring.

        Raises:
            WorkersUnreachable: workers not SERVING within ``network.connect_timeout``.
            ShardMismatch: the stages' layers differ from the assignment.
            ModelError: the model directory or tokenizer cannot be read.
        """
        if self._ready:
            return
        if self._closed:
            raise PipelineNotReady("the orchestrator has been shut down")
        model_dir = await asyncio.to_thread(resolve_model_dir, self.config.model, False)
        self.tokenizer = await asyncio.to_thread(load_tokenizer, model_dir)
        info = read_model_info(model_dir, self.config.model.name)
        self.model_info = info
        self._eos_ids = eos_token_ids(self.tokenizer)
        assignment = assign_layers(self.config, info.num_layers)
        workers = self.config.workers
        self.stages = [Stage(i, w.id, w.address, assignment[w.id]) for i, w in enumerate(workers)]
        max_context = info.max_context
        if self.config.model.max_context is not None:
            max_context = min(max_context, self.config.model.max_context)
        self._limits = PromptLimits(
            self.config.inference.max_prompt_tokens, max_context, info.vocab_size
        )
        self._clients = [
            WorkerClient.for_device(w, self.config.network, recorder=self.metrics_collector)
            for w in workers
        ]
        try:
            await self._wait_serving()
            await self._check_shards(info.num_layers)
            await self._start_monitoring(info)
        except BaseException:
            await self._close_clients()
            raise
        self._ready = True
        logger.info(
            "pipeline ready: %s over %d stages (%s)",
            info.name,
            len(self.stages),
            ", ".join(f"{s.device_id} {s.layer_range}" for s in self.stages),
        )

    async def _wait_serving(self) -> None:
        timeout = self.config.network.connect_timeout
        results = await asyncio.gather(
            *(client.wait_serving(timeout) for client in self._clients), return_exceptions=True
        )
        failures: list[tuple[str, str, str]] = []
        for client, result in zip(self._clients, results, strict=True):
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, BaseException):
                message = str(result)
                if isinstance(result, WorkerUnavailable):
                    message = message.split(": ", 1)[-1]
                failures.append((client.device_id, client.address, message))
        if failures:
            raise WorkersUnreachable(failures, len(self._clients))

    async def _check_shards(self, num_layers: int) -> None:
        statuses = await asyncio.gather(*(client.get_status() for client in self._clients))
        for stage, status in zip(self.stages, statuses, strict=True):
            served = (status.layer_start, status.layer_end)
            expected = (stage.layer_range.start, stage.layer_range.end)
            if status.num_layers != num_layers or served != expected:
                raise ShardMismatch(
                    f"stage {stage.index} ({stage.device_id}) serves layers "
                    f"[{served[0]}, {served[1]}) of {status.num_layers}; the coordinator "
                    f"expects {stage.layer_range} of {num_layers} (same model and layer "
                    f"assignment on every node?)"
                )

    async def _start_monitoring(self, info: ModelInfo) -> None:
        collector, health = self.metrics_collector, self.health_monitor
        if collector is None or health is None:
            return
        collector.set_model_info(info.name, info.quantization, info.num_layers, len(self.stages))
        for stage in self.stages:
            collector.add_peer(stage.device_id)
            collector.update_device_status(
                stage.device_id,
                model_loaded=True,
                assigned_layers=stage.layer_range.as_list(),
                role="worker",
                stage=stage.index,
            )
        health.set_service_state(True, True, "pipeline ready")
        for component in self._owned:
            await component.start()
        self.cluster_monitor = ClusterMonitor(
            self.stages,
            self._clients,
            collector,
            health,
            poll_interval=self.config.monitoring.poll_interval,
            timeout=self.config.network.ping_timeout,
            source=self.device_id,
        )
        await self.cluster_monitor.start()

    def stream_request(self, request: InferenceRequest) -> AsyncIterator[TokenEvent]:
        """Start a request and return its token events.

        The request is validated at once (so errors come before any event); it runs when
        iteration begins. The last event has ``finish_reason`` and ``usage``. Closing the
        iterator early (``aclose``, or cancelling the consuming task) aborts the request:
        finish reason ``abort``, EndSession on every stage.

        Raises:
            InvalidRequest: a parameter is invalid (the error names it).
            QueueFull: too many requests running and waiting (also possible at the first
                iteration, if the queue filled up meanwhile).
            PipelineNotReady: not initialised, or shut down.
        """
        return self._new_run(request).events()

    async def process_request(self, request: InferenceRequest) -> InferenceResponse:
        """Run a request to completion and return the whole response.

        Raises:
            InvalidRequest, QueueFull, PipelineNotReady: as :meth:`stream_request`.
            WorkerUnavailable: a stage failed or missed its deadline (the error names it).
        """
        run = self._new_run(request)
        async with aclosing(run.events()) as events:
            async for _ in events:
                pass
        return run.response()

    def _new_run(self, request: InferenceRequest) -> RequestRun:
        if not self.ready or self._limits is None:
            raise PipelineNotReady(
                "the coordinator is shutting down" if self._closed else "call initialize() first"
            )
        prepared = prepare_request(request, self.tokenizer, self._limits)
        self._admission.check()
        return RequestRun(
            prepared,
            self.stages,
            self._clients,
            self.tokenizer,
            self._eos_ids,
            self._admission,
            self.metrics_collector,
            self._tracker,
        )

    def _admission_changed(self, running: int, waiting: int) -> None:
        if self.metrics_collector is not None:
            self.metrics_collector.set_waiting(waiting)

    async def stage_health(self) -> list[tuple[str, str]]:
        """Each stage's ``(device_id, status)``: SERVING, NOT_SERVING or UNREACHABLE."""

        async def one(client: WorkerClient) -> tuple[str, str]:
            try:
                status = await client.health(retry=False)
            except RelayError:
                return client.device_id, "UNREACHABLE"
            return client.device_id, "SERVING" if status == "SERVING" else "NOT_SERVING"

        return list(await asyncio.gather(*(one(client) for client in self._clients)))

    async def shutdown(self) -> None:
        """Stop taking requests, end the sessions of requests still running (they fail at
        their next step), stop monitoring and close the channels."""
        if self._closed:
            return
        self._closed = True
        live = list(self._tracker.runs)
        for run in live:
            run.stop("the coordinator is shutting down")
        pending = [asyncio.ensure_future(run.end_sessions()) for run in live]
        pending += self._tracker.cleanups
        if pending:
            await asyncio.wait(pending, timeout=self.config.network.request_timeout)
        if self.cluster_monitor is not None:
            await self.cluster_monitor.stop()
        for component in reversed(self._owned):
            await component.stop()
        await self._close_clients()
        logger.info("coordinator shut down")

    async def _close_clients(self) -> None:
        clients, self._clients = self._clients, []
        await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)
