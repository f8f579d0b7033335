"""A worker process's server: binds gRPC, loads its layers, reports health, shuts down cleanly.

Lifecycle: :meth:`WorkerServer.start` binds the port (so ``port`` is known and the health
service answers NOT_SERVING at once) and begins loading this stage's layers on the MLX
thread; :meth:`WorkerServer.wait_until_ready` waits for the load (``start(wait=True)``
does both). Health turns SERVING when the layers are loaded, and NOT_SERVING again while
a CRITICAL health check says the stage cannot serve (CPU saturation alone does not) or while
it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from mlx_relay.core.addresses import exposure_warning
from mlx_relay.core.blas import default_threads, same_host, set_threads
from mlx_relay.core.config import ClusterConfig
from mlx_relay.core.errors import ConfigError, PipelineNotReady, ShardMismatch, WorkerUnavailable
from mlx_relay.core.types import LayerRange
from mlx_relay.proto import relay_pb2_grpc as pb_grpc
from mlx_relay.worker.executor import MLXExecutor
from mlx_relay.worker.service import (
    SERVICE_NAME,
    BearerTokenInterceptor,
    WorkerServicer,
    WorkerState,
)
from mlx_relay.worker.stage import StageLimits, StageRuntime

logger = logging.getLogger(__name__)

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class WorkerServer:
    """One pipeline stage served over gRPC (``mlxrelay.v1.Worker`` + ``grpc.health.v1``).

    Args:
        config_path: a cluster YAML file, or an already validated :class:`ClusterConfig`.
        device_id: which worker of the config to run; None runs the first worker.
        enable_monitoring: run a MetricsCollector and HealthMonitor for this worker (also
            off when ``monitoring.enabled`` is false in the config).

    Attributes:
        device_id: this worker's id in the config.
        stage: its index among the config's workers (pipeline order).
        port: the bound port (0 until :meth:`start`; the real one when the config says 0).
        collector: the MetricsCollector, or None without monitoring.
        health: the HealthMonitor, or None without monitoring.

    Raises:
        ConfigError: the file is invalid, or ``device_id`` is not a worker of it.
    """

    def __init__(
        self,
        config_path: str | Path | ClusterConfig,
        device_id: str | None = None,
        enable_monitoring: bool = True,
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
        self.stage = next(i for i, w in enumerate(workers) if w.id == device.id)
        self.port = 0
        self.monitoring_enabled = enable_monitoring and config.monitoring.enabled
        self.collector: Any = None
        self.health: Any = None
        self._executor = MLXExecutor(name=f"mlx-{device.id}")
        self._state = WorkerState(device.id, self.stage, self._executor)
        if isinstance(device.layers, LayerRange):
            self._state.layer_range = device.layers
        self._health_service = health_aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._load_task: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._stopped = False

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
        """BLAS threads for this worker: ``model.blas_threads``, else this host's cores
        divided among the workers configured on it."""
        if self.config.model.blas_threads is not None:
            return self.config.model.blas_threads
        here = [w for w in self.config.workers if same_host(w.host, self.device.host)]
        return default_threads(len(here))

    @property
    def ready(self) -> bool:
        """Whether the layers are loaded and the worker serves Forward."""
        return self._state.runtime is not None and not self._stopped

    @property
    def kv_sessions(self) -> int:
        return self._state.kv_sessions

    @property
    def address(self) -> str:
        return f"{self.device.host}:{self.port}"

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
        network = self.config.network
        limit = network.max_message_mb * 1024 * 1024
        interceptors = [BearerTokenInterceptor(network.auth_token)] if network.auth_token else []
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
            ],
        )
        pb_grpc.add_WorkerServicer_to_server(WorkerServicer(self._state), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health_service, server)
        await self._set_health(_NOT_SERVING)
        address = self.device.address
        try:
            self.port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise WorkerUnavailable(self.device_id, f"cannot bind {address}: {exc}") from None
        self._warn_if_exposed()
        if self.monitoring_enabled:
            await self._start_monitoring()
        await server.start()
        self._server = server
        logger.info(
            "worker %s (stage %d) listening on %s", self.device_id, self.stage, self.address
        )
        self._load_task = asyncio.create_task(self._load(), name=f"load-{self.device_id}")
        self._tasks.append(asyncio.create_task(self._sweep_sessions(), name="session-sweep"))
        if wait:
            await self.wait_until_ready()

    def _warn_if_exposed(self) -> str | None:
        # The same warning as the HTTP side's: nothing but the network guards this port.
        message = exposure_warning(
            self.device.host,
            bool(self.config.network.auth_token),
            f"run worker {self.device_id}'s layers and read its metrics (gRPC, unencrypted)",
            "Set network.auth_token in the cluster file (the coordinator sends it)",
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
        await self._health_service.enter_graceful_shutdown()
        tasks = [*self._tasks, *([self._load_task] if self._load_task else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            await self._server.stop(grace)
        await self._executor.shutdown()
        if self._state.runtime is not None:
            self._state.runtime.sessions.clear()
        if self.health is not None:
            self.health.set_service_state(False, self._state.runtime is not None, "stopped")
        await self._stop_monitoring()
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
        from mlx_relay.model.load import read_model_info, resolve_model_dir
        from mlx_relay.model.partition import assign_layers

        state = self._state
        try:
            model_dir = await self._executor.run(resolve_model_dir, self.config.model, False)
            info = await self._executor.run(read_model_info, model_dir, self.config.model.name)
            state.model_info = info
            layer_range = (
                state.layer_range or assign_layers(self.config, info.num_layers)[self.device_id]
            )
            if layer_range.end > info.num_layers:
                raise ShardMismatch(
                    f"worker {self.device_id}: layers {layer_range} do not fit {info.name}, "
                    f"which has {info.num_layers} layers"
                )
            state.layer_range = layer_range
            self._report(model_loaded=False)
            if self.collector is not None:
                self.collector.set_model_info(
                    info.name, info.quantization, info.num_layers, len(self.config.workers)
                )
            inference = self.config.inference
            limits = StageLimits(
                max_prompt_tokens=inference.max_prompt_tokens,
                max_sessions=inference.max_sessions,
                session_ttl_seconds=inference.session_ttl_seconds,
                max_context=self.config.model.max_context or info.max_context,
            )
            model = self.config.model
            await self._executor.run(set_threads, self.blas_threads)
            state.runtime = await self._executor.run(
                StageRuntime.load,
                model_dir,
                layer_range,
                limits,
                model.compute,
                model.dense_memory_share,
            )
        except Exception as exc:
            state.load_error = exc
            logger.error("worker %s failed to load its model: %s", self.device_id, exc)
            self._report(model_loaded=False, last_error=str(exc))
            raise
        engine = state.runtime.engine
        self._report(
            model_loaded=True,
            backend=engine.backend,
            compute=engine.compute,
            blas=engine.blas,
            blas_threads=engine.blas_threads,
        )
        state.report_sessions()
        await self._update_health()
        if self.health is not None:
            self._tasks.append(asyncio.create_task(self._watch_health(), name="health-watch"))
        logger.info("worker %s serving layers %s", self.device_id, layer_range)

    async def _sweep_sessions(self) -> None:
        ttl = self.config.inference.session_ttl_seconds
        interval = max(0.05, min(ttl / 4, 10.0))
        while True:
            await asyncio.sleep(interval)
            runtime = self._state.runtime
            if runtime is None:
                continue
            expired = runtime.sessions.expire()
            if expired:
                logger.info("freed %d idle session(s) after %.0fs", len(expired), ttl)
                self._state.report_sessions()

    async def _watch_health(self) -> None:
        while True:
            await asyncio.sleep(min(self.config.monitoring.collection_interval, 1.0))
            await self._update_health()

    async def _update_health(self) -> None:
        loaded = self._state.runtime is not None
        if self.health is not None:
            # The gRPC server is up: this feeds the monitor's own service check, which must
            # not depend on the verdict below or CRITICAL would latch.
            self.health.set_service_state(True, loaded)
        serving = loaded and self._state.takes_traffic() and not self._stopped
        self._report(model_loaded=loaded)
        await self._set_health(_SERVING if serving else _NOT_SERVING)

    async def _set_health(self, status: int) -> None:
        for service in ("", SERVICE_NAME):
            await self._health_service.set(service, status)

    def _report(self, **fields: Any) -> None:
        if self.collector is None:
            return
        layer_range = self._state.layer_range
        self.collector.update_device_status(
            self.device_id,
            assigned_layers=layer_range.as_list() if layer_range else None,
            role="worker",
            stage=self.stage,
            **fields,
        )

    async def _start_monitoring(self) -> None:
        from mlx_relay.monitoring import HealthMonitor, MetricsCollector

        monitoring = self.config.monitoring
        self.collector = MetricsCollector(
            self.device_id,
            collection_interval=monitoring.collection_interval,
            role="worker",
            retention_seconds=monitoring.retention_seconds,
            model_name=self.config.model.name,
        )
        self.health = HealthMonitor(
            self.device_id,
            thresholds=monitoring.thresholds,
            metrics_collector=self.collector,
            check_interval=monitoring.health_check_interval,
        )
        self._state.collector = self.collector
        self._state.health = self.health
        await self.collector.start()
        await self.health.start()
        self.health.set_service_state(True, False, "loading the model")
        self._report(model_loaded=False, up=True)

    async def _stop_monitoring(self) -> None:
        if self.health is not None:
            await self.health.stop()
        if self.collector is not None:
            await self.collector.stop()
