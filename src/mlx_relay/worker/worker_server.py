"""A worker process's server: binds gRPC, loads its layers, reports health, shuts down cleanly.

Lifecycle: :meth:`WorkerServer.start` binds the port (so ``port`` is known and the health
service answers NOT_SERVING at once) and begins loading this stage's layers on the MLX
thread; :meth:`WorkerServer.wait_until_ready` waits for the load (``start(wait=True)``
does both). Health turns SERVING when the layers are loaded, and NOT_SERVING again while
a health check says the stage cannot serve (a full disk, no file descriptors left; memory
pressure, CPU saturation and unreachable peers are only warnings) or while it stops.

``WorkerServer`` composes separate pieces: the gRPC lifecycle
(:class:`~mlx_relay.worker.grpc_endpoint.WorkerGrpcServer`), model loading
(:mod:`~mlx_relay.worker.stage_loader`), monitoring
(:class:`~mlx_relay.worker.telemetry.WorkerTelemetry`), the health watch
(:class:`~mlx_relay.worker.background.ServingHealthWatch`) and the session sweep
(:class:`~mlx_relay.worker.background.SessionSweep`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

from mlx_relay.core.addresses import exposure_warning, host_port, is_loopback
from mlx_relay.core.config import ClusterConfig
from mlx_relay.core.errors import ConfigError, PipelineNotReady
from mlx_relay.core.tls_config import tls_material
from mlx_relay.core.tracing import otlp_tracer_provider, shutdown_provider, tracer_of
from mlx_relay.core.types import LayerRange
from mlx_relay.worker.background import ServingHealthWatch, SessionSweep
from mlx_relay.worker.executor import MLXExecutor
from mlx_relay.worker.grpc_endpoint import WorkerGrpcServer, concurrent_rpc_limit
from mlx_relay.worker.relay import PeerClients
from mlx_relay.worker.reshard import StageReshard
from mlx_relay.worker.service import WorkerServicer, WorkerState
from mlx_relay.worker.stage_loader import blas_threads, find_placement, load_stage, thread_policy
from mlx_relay.worker.step_threads import StepThreads
from mlx_relay.worker.telemetry import WorkerTelemetry

logger = logging.getLogger(__name__)

# Longest pause between two serving-health verdicts, seconds.
HEALTH_WATCH_MAX_INTERVAL = 1.0


class WorkerServer:
    """One pipeline stage served over gRPC (``mlxrelay.v1.Worker`` + ``grpc.health.v1``).

    Args:
        config_path: a cluster YAML file, or an already validated :class:`ClusterConfig`.
        device_id: which worker of the config to run; None runs the first worker.
        enable_monitoring: run a MetricsCollector and HealthMonitor for this worker (also
            off when ``monitoring.enabled`` is false in the config).
        tracer_provider: where this worker's spans go (an OpenTelemetry SDK
            ``TracerProvider``; the caller owns it). By default one exporting to
            ``tracing.otlp_endpoint`` when that is set, else no spans (the stage still
            reports its timings to the coordinator's trace store).

    Attributes:
        device_id: this worker's id in the config.
        stage: its index among the config's workers (pipeline order).
        port: the bound port (0 until :meth:`start`; the real one when the config says 0).
        telemetry: the worker's monitoring, or None without it.
        health_watch: keeps ``grpc.health.v1`` true to the stage (with monitoring, once the
            layers are loaded).
        session_sweep: frees idle KV sessions.

    Raises:
        ConfigError: the file is invalid, ``device_id`` is not a worker of it, or a TLS file
            it names cannot be read.
    """

    def __init__(
        self,
        config_path: str | Path | ClusterConfig,
        device_id: str | None = None,
        enable_monitoring: bool = True,
        *,
        tracer_provider: Any | None = None,
    ) -> None:
        config = (
            config_path
            if isinstance(config_path, ClusterConfig)
            else ClusterConfig.from_yaml(config_path)
        )
        workers = config.workers
        device = workers[0] if device_id is None else config.device(device_id)
        if device.role != "worker":
            raise ConfigError(f"device {device.id!r} is the coordinator, not a worker")
        self.config = config
        self.device = device
        self.device_id = device.id
        self.stage = config.stage_index(device.id)  # replicas of a stage share it
        self.port = 0
        self.monitoring_enabled = enable_monitoring and config.monitoring.enabled
        self.telemetry = (
            WorkerTelemetry(config, device.id, self.stage) if self.monitoring_enabled else None
        )
        self._executor = MLXExecutor(name=f"mlx-{device.id}")
        self._state = WorkerState(device.id, self.stage, self._executor)
        if isinstance(device.layers, LayerRange):
            self._state.layer_range = device.layers
        if self.telemetry is not None:
            self._state.collector = self.telemetry.collector
            self._state.health = self.telemetry.health
        self._owned_provider = None
        if tracer_provider is None and config.tracing.enabled:
            tracer_provider = self._owned_provider = otlp_tracer_provider(
                config.tracing, "mlx-relay-worker", device.id
            )
        if config.tracing.enabled:
            self._state.tracer = tracer_of(tracer_provider)
        stages = config.stages
        following = [w.id for w in stages[self.stage + 1]] if self.stage + 1 < len(stages) else []
        self.tls = tls_material(config, device.id)
        self._state.peers = PeerClients(
            device.id, following, config.network, recorder=self._state.collector, tls=self.tls
        )
        calls = concurrent_rpc_limit(config)
        self._grpc = WorkerGrpcServer(
            device.id,
            config.network,
            WorkerServicer(self._state, max_stream_calls=calls),
            tls=self.tls,
            maximum_concurrent_rpcs=calls,
        )
        interval = min(config.monitoring.collection_interval, HEALTH_WATCH_MAX_INTERVAL)
        self.health_watch = ServingHealthWatch(self._state, self._grpc, self._report, interval)
        self.session_sweep = SessionSweep(self._state, config.inference.session_ttl_seconds)
        self._load_task: asyncio.Task[None] | None = None
        self._started = False
        self._stopped = False

    @property
    def collector(self) -> Any:
        """The MetricsCollector, or None without monitoring."""
        return self.telemetry.collector if self.telemetry is not None else None

    @property
    def health(self) -> Any:
        """The HealthMonitor, or None without monitoring."""
        return self.telemetry.health if self.telemetry is not None else None

    @property
    def layer_range(self) -> LayerRange:
        """The layers ``[start, end)`` this worker holds.

        Raises:
            PipelineNotReady: the config says ``auto`` and the model has not been read yet.
        """
        if self._state.layer_range is None:
            raise PipelineNotReady(
                f"worker {self.device_id}: layers are 'auto' and the model is not read yet"
            )
        return self._state.layer_range

    @property
    def blas_threads(self) -> int:
        """BLAS threads for this worker: see :func:`~mlx_relay.worker.stage_loader.blas_threads`."""
        return blas_threads(self.config, self.device)

    @property
    def ready(self) -> bool:
        """Whether the layers are loaded and the worker serves Forward."""
        return self._state.runtime is not None and not self._stopped

    @property
    def kv_sessions(self) -> int:
        return self._state.kv_sessions

    @property
    def batched_rows(self) -> int:
        """KV sessions whose positions sit in a decode batch group."""
        runtime = self._state.runtime
        return len(runtime.batches) if runtime is not None else 0

    @property
    def address(self) -> str:
        return host_port(self.device.host, self.port)

    async def start(self, *, wait: bool = False) -> None:
        """Bind the gRPC port, answer health NOT_SERVING, and begin loading the layers.

        Args:
            wait: also wait until the layers are loaded (see :meth:`wait_until_ready`).

        Raises:
            WorkerUnavailable: the port cannot be bound.
            RuntimeError: the server was already started.
        """
        if self._started:
            raise RuntimeError(f"worker {self.device_id} was already started")
        self._started = True
        await self._grpc.set_serving(False)
        self.port = self._grpc.bind(self.device.address)
        self._warn_if_exposed()
        if self.telemetry is not None:
            await self.telemetry.start()
        await self._grpc.start()
        logger.info(
            "worker %s (stage %d) listening on %s", self.device_id, self.stage, self.address
        )
        self._load_task = asyncio.create_task(self._load(), name=f"load-{self.device_id}")
        self.session_sweep.start()
        if wait:
            await self.wait_until_ready()

    @property
    def direct_link_port(self) -> int:
        """The port of this worker's direct link (0: none: under TLS, switched off, or not
        started; mlx_relay/worker/direct_link.py)."""
        direct = self._grpc.direct
        return direct.port if direct is not None else 0

    def _warn_if_exposed(self) -> str | None:
        # The same warning as the HTTP side's: nothing but the network guards this port
        # (TLS without client certificates encrypts, but lets anyone call).
        tls = self.tls
        encrypted = tls is not None
        message = exposure_warning(
            self.device.host,
            bool(self.config.network.auth_token) or (tls is not None and tls.require_client_cert),
            f"run worker {self.device_id}'s layers and read its metrics "
            f"(gRPC, {'TLS' if encrypted else 'unencrypted'})",
            "Set network.auth_token in the cluster file (the coordinator sends it)"
            + ("" if encrypted else " and network.tls (see `mlx-relay certs`)"),
        )
        if message is None and not encrypted and not is_loopback(self.device.host):
            message = (
                f"binding {self.device.host} without TLS: the auth token, hidden states and "
                "tokens cross the network unencrypted. Set network.tls (see `mlx-relay certs`)."
            )
        if message:
            logger.warning("%s", message)
        return message

    async def wait_until_ready(self, timeout: float | None = None) -> None:
        """Wait until the layers are loaded (health is SERVING from then on unless the
        HealthMonitor reports CRITICAL).

        Raises:
            RelayError: loading failed (e.g. ModelNotFound, ShardMismatch).
            TimeoutError: ``timeout`` seconds passed first.
            RuntimeError: the server was not started.
        """
        if self._load_task is None:
            raise RuntimeError(f"worker {self.device_id} is not started")
        await asyncio.wait_for(asyncio.shield(self._load_task), timeout)

    async def stop(self, grace: float | None = 2.0) -> None:
        """Stop serving (in-flight calls get ``grace`` seconds), free the sessions, stop
        monitoring and the MLX thread. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._state.stopping = True
        await self.health_watch.stop()
        await self.session_sweep.stop()
        loading = self._load_task is not None and not self._load_task.done()
        if self._load_task is not None:
            self._load_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._load_task
        await self._grpc.stop(grace)
        if self._state.peers is not None:
            await self._state.peers.close()
        # A stop during the load does not wait for it (the MLX thread is a daemon).
        await self._executor.shutdown(wait=not loading)
        if self._state.runtime is not None:
            self._state.runtime.sessions.clear()
        if self.telemetry is not None:
            self.telemetry.health.set_service_state(
                False, self._state.runtime is not None, "stopped"
            )
            await self.telemetry.stop()
        await shutdown_provider(self._owned_provider)
        logger.info("worker %s stopped", self.device_id)

    async def __aenter__(self) -> WorkerServer:
        try:
            await self.start(wait=True)
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _load(self) -> None:
        state = self._state
        try:
            placement = await find_placement(
                self.config, self.device_id, self._executor, state.layer_range
            )
            state.model_info = placement.info
            state.layer_range = placement.layer_range
            self._report(model_loaded=False)
            if self.telemetry is not None:
                info = placement.info
                self.telemetry.collector.set_model_info(
                    info.name, info.quantization, info.num_layers, len(self.config.workers)
                )
            threads = self.blas_threads
            state.runtime = await load_stage(
                self.config, self._executor, placement, threads, self.device
            )
            state.threads = StepThreads(thread_policy(self.config, self.device))
        except Exception as exc:
            state.load_error = exc
            logger.error("worker %s failed to load its model: %s", self.device_id, exc)
            self._report(model_loaded=False, last_error=str(exc))
            raise
        reshard = StageReshard(state, self.config, self.device, self.blas_threads, self._moved)
        reshard.placement = placement
        state.reshard = reshard
        engine = state.runtime.engine
        self._report(
            model_loaded=True,
            backend=engine.backend,
            compute=engine.compute,
            blas=engine.blas,
            blas_threads=state.blas_threads,
        )
        state.report_sessions()
        await self.health_watch.refresh()
        if self.telemetry is not None:
            self.health_watch.start()
        logger.info("worker %s serving layers %s", self.device_id, placement.layer_range)

    def _moved(self, layers: LayerRange) -> None:
        # A live repartition moved the stage: its status shows the range it serves now.
        self._report(model_loaded=True)

    def _report(self, **fields: Any) -> None:
        if self.telemetry is not None:
            self.telemetry.report(self._state.layer_range, **fields)
