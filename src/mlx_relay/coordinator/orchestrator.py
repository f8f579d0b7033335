"""The coordinator's engine: connects to the stages and runs requests through them.

``DistributedOrchestrator`` holds the tokenizer, one :class:`WorkerClient` per stage,
admission control and the step loop that batches every running request's steps
(:mod:`mlx_relay.coordinator.step_loop`); each request is a
:class:`~mlx_relay.coordinator.pipeline.RequestRun` in that loop.
Monitoring is handed in (a :class:`~mlx_relay.coordinator.telemetry.CoordinatorTelemetry`):
the orchestrator records into it and tells it when the pipeline is up and down.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from typing import Any

from mlx_relay.coordinator.admission import Admission
from mlx_relay.coordinator.client import WorkerClient
from mlx_relay.coordinator.connect import (
    WorkersUnreachable,
    check_shards,
    pipeline_stages,
    prompt_limits,
    scheduler_settings,
    stage_states,
    wait_serving,
    worker_clients,
)
from mlx_relay.coordinator.pipeline import RequestRun, RunTracker, Stage
from mlx_relay.coordinator.prepare import PreparedRequest, PromptLimits, prepare_request
from mlx_relay.coordinator.repartition import (
    RepartitionBusy,
    RepartitionResult,
    RepartitionSettings,
    check_split,
    repartition,
    restore_ranges,
)
from mlx_relay.coordinator.replicas import ReplicaRouter
from mlx_relay.coordinator.requests import InferenceRequest, InferenceResponse, TokenEvent
from mlx_relay.coordinator.stage_health import StageHealthPoll
from mlx_relay.coordinator.telemetry import CoordinatorTelemetry
from mlx_relay.coordinator.tracing import CoordinatorTracing
from mlx_relay.core.config import ClusterConfig
from mlx_relay.core.errors import PipelineNotReady
from mlx_relay.core.tracing import shutdown_provider
from mlx_relay.core.types import LayerRange
from mlx_relay.model.load import ModelInfo, read_model_info, resolve_model_dir
from mlx_relay.model.tokenizer import eos_token_ids, load_tokenizer
from mlx_relay.monitoring.traces import TraceStore

__all__ = [
    "DistributedOrchestrator",
    "InferenceRequest",
    "InferenceResponse",
    "Stage",
    "WorkersUnreachable",
]

logger = logging.getLogger(__name__)

# Name prefix of the thread that tokenizes prompts and renders chat templates.
TOKENIZER_THREAD = "mlx-relay-tokenizer"


class DistributedOrchestrator:
    """Drives requests through the cluster's pipeline of workers.

    Args:
        config: the validated cluster configuration.
        enable_monitoring: record metrics and health (also off when ``monitoring.enabled`` is
            false in the config). Off: no collector, no background task, nothing recorded.
        telemetry: the monitoring to record into, built by the composition root; by default
            (monitoring enabled) one built from ``config`` with
            :meth:`CoordinatorTelemetry.from_config`.
        metrics_collector: with the default telemetry, use this collector instead of
            building one (its owner starts and stops it).
        health_monitor: likewise for the health monitor.
        tracer_provider: where the coordinator's spans go (an OpenTelemetry SDK
            ``TracerProvider``; the caller owns it). By default one exporting to
            ``tracing.otlp_endpoint`` when that is set, else no spans. Either way, with
            ``tracing.enabled`` the last ``tracing.max_traces`` traces are kept in
            :attr:`traces`.

    Attributes:
        tokenizer: the model's tokenizer (after :meth:`initialize`).
        model_info: the model's facts (after :meth:`initialize`).
        stages: the pipeline in order (after :meth:`initialize`).
        telemetry: the coordinator's monitoring, or None without it.
        traces: the last requests' traces (None with ``tracing.enabled`` false).
    """

    def __init__(
        self,
        config: ClusterConfig,
        enable_monitoring: bool = True,
        *,
        telemetry: CoordinatorTelemetry | None = None,
        metrics_collector: Any | None = None,
        health_monitor: Any | None = None,
        tracer_provider: Any | None = None,
    ) -> None:
        self.config = config
        self.enable_monitoring = enable_monitoring and config.monitoring.enabled
        if telemetry is None and self.enable_monitoring:
            telemetry = CoordinatorTelemetry.from_config(
                config, collector=metrics_collector, health=health_monitor
            )
        self.telemetry = telemetry if self.enable_monitoring else None
        self.tokenizer: Any = None
        self.model_info: ModelInfo | None = None
        self.stages: list[Stage] = []
        self._clients: list[WorkerClient] = []
        self._eos_ids: set[int] = set()
        self._limits: PromptLimits | None = None
        # What GET /health answers: each stage's state as of the last poll.
        self.health_poll = StageHealthPoll(self.stage_health, config.monitoring.poll_interval)
        # Tokenizing and chat templating run here, never on the event loop (one thread: the
        # tokenizer is not shared between threads).
        self._tokenizing = ThreadPoolExecutor(1, thread_name_prefix=TOKENIZER_THREAD)
        self._arriving = 0  # requests being tokenized now
        self._admission = Admission(
            config.inference.max_running_requests,
            config.inference.max_waiting_requests,
            on_change=self._admission_changed,
        )
        self._tracker = RunTracker()
        self._tracing, self._owned_provider = CoordinatorTracing.from_config(
            config, tracer_provider
        )
        self.traces: TraceStore | None = self._tracing.store if self._tracing else None
        self._router: ReplicaRouter | None = None
        self._repartitioning = asyncio.Lock()
        self._ready = False
        self._closed = False

    @property
    def device_id(self) -> str:
        return self.config.coordinator_id

    @property
    def metrics_collector(self) -> Any | None:
        """The coordinator's MetricsCollector, or None without monitoring."""
        return self.telemetry.collector if self.telemetry is not None else None

    @property
    def health_monitor(self) -> Any | None:
        """The coordinator's HealthMonitor, or None without monitoring."""
        return self.telemetry.health if self.telemetry is not None else None

    @property
    def cluster_monitor(self) -> Any | None:
        """The worker poll while the pipeline is up (None without monitoring)."""
        return self.telemetry.cluster_monitor if self.telemetry is not None else None

    @property
    def ready(self) -> bool:
        return self._ready and not self._closed

    @property
    def running_requests(self) -> int:
        return self._admission.running

    @property
    def waiting_requests(self) -> int:
        return self._admission.waiting

    async def wait_idle(self) -> None:
        """Wait until no request is admitted and no micro-batch is in flight on any path
        (a cancelled request's last step may still be out when its stream has ended)."""
        while self._admission.running or self._admission.waiting:
            await asyncio.sleep(0.005)
        if self._router is not None:
            for loop in self._router.loops:
                await loop.drained()

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
        self.stages = pipeline_stages(self.config, info.num_layers)
        self._limits = prompt_limits(self.config, info)
        self._clients = worker_clients(self.config, self.metrics_collector)
        self._router = ReplicaRouter(
            self.stages,
            self._clients,
            scheduler_settings(self.config),
            self.metrics_collector,
            traced=self._tracing is not None,
            recovery_timeout=self.config.network.recovery_timeout,
            restore=self._restore_ranges,
            arrivals=lambda: self._arriving,
        )
        if self._tracing is not None:
            self._tracing.attach(info.name, [stage.device_id for stage in self.stages])
        try:
            await wait_serving(self._clients, self.config.network.connect_timeout)
            await check_shards(self.stages, self._clients, info.num_layers)
            if self.telemetry is not None:
                await self.telemetry.attach(self.stages, self._clients, info)
            await self.health_poll.refresh()
        except BaseException:
            await self._close_clients()
            raise
        self.health_poll.start()
        self._ready = True
        logger.info(
            "pipeline ready: %s over %d stages (%s)",
            info.name,
            len(self.stages),
            ", ".join(f"{s.device_id} {s.layer_range}" for s in self.stages),
        )

    def stream_request(self, request: InferenceRequest) -> AsyncIterator[TokenEvent]:
        """Start a request and return its token events.

        The request is validated and its prompt tokenized at once, on the calling thread (so
        errors come before any event); :meth:`start_stream` does the same off the event
        loop. It runs when iteration begins. The last event has ``finish_reason`` and
        ``usage``. Closing the iterator early (``aclose``, or cancelling the consuming task)
        aborts the request: finish reason ``abort``, EndSession on every stage.

        Raises:
            InvalidRequest: a parameter is invalid (the error names it).
            QueueFull: too many requests running and waiting (also possible at the first
                iteration, if the queue filled up meanwhile).
            PipelineNotReady: not initialised, or shut down.
        """
        prepared = prepare_request(request, self.tokenizer, self._ready_limits())
        return self._new_run(prepared).events()

    async def start_stream(self, request: InferenceRequest) -> AsyncIterator[TokenEvent]:
        """As :meth:`stream_request`, with the prompt tokenized (and the chat template
        rendered) on the tokenizer's thread: a huge prompt does not stall the event loop,
        so every other stream goes on meanwhile.

        Raises:
            InvalidRequest, QueueFull, PipelineNotReady: as :meth:`stream_request`.
        """
        return self._new_run(await self._prepare(request)).events()

    async def process_request(self, request: InferenceRequest) -> InferenceResponse:
        """Run a request to completion and return the whole response (the prompt tokenized
        off the event loop, as :meth:`start_stream`).

        Raises:
            InvalidRequest, QueueFull, PipelineNotReady: as :meth:`stream_request`.
            WorkerUnavailable: a stage failed or missed its deadline (the error names it).
        """
        run = self._new_run(await self._prepare(request))
        async with aclosing(run.events()) as events:
            async for _ in events:
                pass
        return run.response()

    def _ready_limits(self) -> PromptLimits:
        if not self.ready or self._limits is None:
            raise PipelineNotReady(
                "the coordinator is shutting down" if self._closed else "call initialize() first"
            )
        return self._limits

    async def _prepare(self, request: InferenceRequest) -> PreparedRequest:
        limits = self._ready_limits()
        loop = asyncio.get_running_loop()
        self._arriving += 1
        try:
            return await loop.run_in_executor(
                self._tokenizing, prepare_request, request, self.tokenizer, limits
            )
        finally:
            self._arriving -= 1
            if not self._arriving and self._router is not None:
                # After this request has joined (the caller goes on without awaiting).
                loop.call_soon(self._router.arrived)

    def _new_run(self, prepared: PreparedRequest) -> RequestRun:
        self._ready_limits()  # the coordinator may have shut down while tokenizing
        self._admission.check()
        assert self._router is not None
        return RequestRun(
            prepared,
            self._router,
            self.tokenizer,
            self._eos_ids,
            self._admission,
            self.metrics_collector,
            self._tracker,
            self.config.inference.stream_buffer_tokens,
            self._tracing,
        )

    async def repartition(
        self,
        split: Sequence[LayerRange],
        on_phase: Callable[[str, str], None] = lambda phase, detail: None,
    ) -> RepartitionResult:
        """Move the pipeline to ``split`` (one range per stage) without restarting a worker:
        drain, load, switch, release (:mod:`mlx_relay.coordinator.repartition`).

        Raises:
            PartitionError: the split does not cover the model's layers in order.
            RepartitionBusy: another repartition is under way.
            RepartitionFailed: nothing changed; the message names the worker and why.
            PipelineNotReady: not initialised, or shut down.
        """
        self._ready_limits()
        assert self._router is not None and self.model_info is not None
        loop = self._router.only_loop()
        checked = check_split(split, self.model_info.num_layers, len(self.stages))
        if self._repartitioning.locked():
            raise RepartitionBusy("a repartition is under way")
        async with self._repartitioning:
            result = await repartition(
                self.stages,
                self._clients,
                loop,
                checked,
                RepartitionSettings.from_config(self.config),
                cleanups=lambda: self._tracker.cleanups,
                on_drained=self._refresh_view,
                on_phase=on_phase,
            )
            if result.changed and self.telemetry is not None:
                self.telemetry.moved(self.stages)
                await self._refresh_view()
        return result

    async def _restore_ranges(self) -> None:
        """Before a replay: a worker restarted with its configured layers after a live
        repartition gets the range the pipeline routes to it back."""
        await restore_ranges(
            self.stages, self._clients, RepartitionSettings.from_config(self.config)
        )

    async def _refresh_view(self) -> None:
        """Poll every worker now, so the cluster view is up to date."""
        monitor = self.cluster_monitor
        if monitor is not None:
            await monitor.poll_once()

    def _admission_changed(self, running: int, waiting: int) -> None:
        if self.metrics_collector is not None:
            self.metrics_collector.set_waiting(waiting)

    async def stage_health(self) -> list[tuple[str, str]]:
        """Each stage's ``(device_id, status)``: SERVING, NOT_SERVING or UNREACHABLE, asked
        now (one health RPC per worker); :attr:`health_poll` keeps the last answer."""
        states = await stage_states(self._clients)
        if self._router is not None:
            self._router.update(states)  # a replica serving again takes requests again
        return states

    async def shutdown(self) -> None:
        """Stop taking requests, end the sessions of requests still running (they fail at
        their next step), stop monitoring and close the channels."""
        if self._closed:
            return
        self._closed = True
        live = list(self._tracker.runs)
        await self.health_poll.stop()
        if self._router is not None:
            await self._router.stop("the coordinator is shutting down")
        pending = [asyncio.ensure_future(run.end_sessions()) for run in live]
        pending += self._tracker.cleanups
        if pending:
            await asyncio.wait(pending, timeout=self.config.network.request_timeout)
        if self.telemetry is not None:
            await self.telemetry.detach()
        await self._close_clients()
        self._tokenizing.shutdown(wait=False, cancel_futures=True)
        await shutdown_provider(self._owned_provider)
        logger.info("coordinator shut down")

    async def _close_clients(self) -> None:
        clients, self._clients = self._clients, []
        await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)
