"""MetricsCollector: the one in-memory store behind the JSON API and the Prometheus export.

The pipeline records into it through a narrow API (requests, stage forwards, pings, RPCs);
a background task samples the machine every ``collection_interval`` seconds in a thread, so
neither the event loop nor the MLX thread ever waits on psutil or a subprocess. All state is
bounded: rings, fixed time buckets and fixed histograms.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from pydantic import ValidationError

from mlx_relay.core.tasks import cancel_and_wait
from mlx_relay.monitoring.device import DeviceSampler
from mlx_relay.monitoring.inference import InferenceRecorder, RequestLog, RequestTrace
from mlx_relay.monitoring.network import NetworkRecorder
from mlx_relay.monitoring.occupancy import OccupancyRecorder
from mlx_relay.monitoring.snapshot import (
    DeviceMetrics,
    DeviceStatus,
    HistoryPoint,
    InferenceMetrics,
    LinkMetrics,
    ModelInfoSnap,
    NetworkMetrics,
    Snapshot,
    StageMetrics,
)
from mlx_relay.monitoring.stages import StageRecorder

logger = logging.getLogger(__name__)

MAX_HISTORY_POINTS = 3600
MAX_DEVICES = 256
_STATUS_FIELDS = frozenset(DeviceStatus.model_fields) - {"device_id", "metrics", "restarts"}


class Sampler(Protocol):
    def sample(self) -> DeviceMetrics: ...


class MetricsCollector:
    """Collects device, inference, stage and network metrics for one process.

    Args:
        device_id: This process's device id.
        collection_interval: Seconds between device samples (and history points).
        role: ``"worker"`` or ``"coordinator"``.
        retention_seconds: Age limit of latency samples and the span of the history ring.
        model_name: Served model's name, if known now (see :meth:`set_model_info`).
        clock: Monotonic clock used for every duration and window.
        device_sampler: Object with ``sample() -> DeviceMetrics``; default :class:`DeviceSampler`.
        wall_clock: Source of unix timestamps in the snapshot.
    """

    def __init__(
        self,
        device_id: str,
        collection_interval: float = 2.0,
        *,
        role: str = "worker",
        retention_seconds: float = 600.0,
        model_name: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        device_sampler: Sampler | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if collection_interval <= 0:
            raise ValueError("collection_interval must be positive")
        self.device_id = device_id
        self.role = role
        self.collection_interval = collection_interval
        self.retention_seconds = retention_seconds
        self._clock = clock
        self._wall_clock = wall_clock
        self._created = clock()
        self._lock = threading.Lock()
        self._sampler: Sampler = device_sampler or DeviceSampler()
        self._inference = InferenceRecorder(
            self._lock, clock, wall_clock, retention_seconds=retention_seconds
        )
        self._stage = StageRecorder(
            device_id, self._lock, clock, retention_seconds=retention_seconds
        )
        self._occupancy = OccupancyRecorder(self._lock, clock)
        self._network = NetworkRecorder(
            device_id, self._lock, clock, wall_clock, retention_seconds=retention_seconds
        )
        self._model: ModelInfoSnap | None = None
        self._model_name = model_name
        self._device: DeviceMetrics | None = None
        self._devices: dict[str, DeviceStatus] = {
            device_id: DeviceStatus(device_id=device_id, role=role, up=True)
        }
        self._remote_stages: dict[str, StageMetrics] = {}
        self._remote_links: dict[str, list[LinkMetrics]] = {}
        points = math.ceil(retention_seconds / collection_interval)
        self._history: deque[HistoryPoint] = deque(maxlen=max(1, min(MAX_HISTORY_POINTS, points)))
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Take a first device sample, then keep sampling in the background."""
        if self._task is not None:
            return
        await self._collect_once()
        self._task = asyncio.create_task(self._run(), name=f"metrics-{self.device_id}")
        logger.info(
            "metrics collection started for %s every %.3gs",
            self.device_id,
            self.collection_interval,
        )

    async def stop(self) -> None:
        """Stop background sampling and wait for the task to end."""
        task, self._task = self._task, None
        await cancel_and_wait(task)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.collection_interval)
            await self._collect_once()

    async def _collect_once(self) -> None:
        try:
            sample = await asyncio.to_thread(self._sampler.sample)
        except Exception:
            # A failed sample must not end collection; the next interval tries again.
            logger.warning("device sampling failed on %s", self.device_id, exc_info=True)
            return
        self.record_device_sample(sample)

    def record_device_sample(self, sample: DeviceMetrics) -> None:
        """Store a device sample and append a history point (called by the sampling task)."""
        rates, e2e, ttft = self._inference.chart_numbers()
        point = HistoryPoint(
            timestamp=sample.sampled_at,
            requests_per_second=rates.requests_per_second,
            tokens_per_second=rates.tokens_per_second,
            e2e_p50_seconds=e2e.p50,
            e2e_p99_seconds=e2e.p99,
            ttft_p50_seconds=ttft.p50,
            cpu_utilization_ratio=sample.cpu_utilization_ratio,
            memory_used_ratio=sample.memory_used_ratio,
            gpu_utilization_ratio=sample.gpu_utilization_ratio,
        )
        with self._lock:
            self._device = sample
            self._history.append(point)
            own = self._devices[self.device_id]
            self._devices[self.device_id] = own.model_copy(
                update={"metrics": sample, "last_seen_timestamp": sample.sampled_at}
            )

    # -- recording: inference (coordinator) --------------------------------------------------

    def track_request(
        self, *, prompt_tokens: int, queued_at: float | None = None, request_id: str = ""
    ) -> RequestTrace:
        """Start tracking a request; ``queued_at`` is its arrival on this collector's clock."""
        return self._inference.track(prompt_tokens, queued_at, request_id)

    def set_request_log(self, sink: RequestLog | None) -> None:
        """Hand every finished request's :class:`RequestRecord` to ``sink`` (None: stop).

        ``sink`` is called on the thread that finishes the request and must not block.
        """
        self._inference.request_log = sink

    def set_waiting(self, n: int) -> None:
        """Number of requests waiting for admission."""
        self._inference.set_waiting(n)

    # -- recording: stages (worker) ----------------------------------------------------------

    def record_stage_forward(
        self, stage: int, phase: str, seconds: float, tokens: int, batch_size: int = 1
    ) -> None:
        """One forward call on this device's stage; ``phase`` is ``prefill`` or ``decode``,
        ``batch_size`` the requests it computed at once."""
        self._stage.record_forward(stage, phase, seconds, tokens, batch_size)

    def set_kv_sessions(self, n: int) -> None:
        """Live KV-cache sessions on this device's stage."""
        self._stage.set_kv_sessions(n)

    # -- recording: stage occupancy (coordinator) --------------------------------------------

    def stage_forward_started(self, device_id: str, stage: int | None, batch_size: int) -> int:
        """The coordinator sends a ``Forward`` of ``batch_size`` requests to a stage; pass
        the returned token to :meth:`stage_forward_finished`."""
        return self._occupancy.forward_started(device_id, stage, batch_size)

    def stage_forward_finished(
        self, device_id: str, token: int, computed: tuple[float, float] | None = None
    ) -> None:
        """That ``Forward`` is back (answer or error); ``computed`` is when the stage
        computed its part, in seconds after the send (None: unknown, busy all along)."""
        self._occupancy.forward_finished(device_id, token, computed)

    def set_requests_scheduled(self, n: int) -> None:
        """Unfinished requests the coordinator's step loop holds now (for the bubble)."""
        self._occupancy.set_requests_held(n)

    # -- recording: network ------------------------------------------------------------------

    def record_ping(
        self,
        peer: str,
        rtt_seconds: float | None,
        *,
        error: str | None = None,
        timeout: bool = False,
    ) -> None:
        """A Ping RPC to ``peer``: its round trip, or a failure when ``rtt_seconds`` is None.

        This is the RPC's round trip (``ping_rtt``), processes and gRPC included; the
        network's own round trip comes from :meth:`record_network_rtt`. Pings are counted in
        ``ping_total``; if the client interceptor also reports the Ping call through
        :meth:`record_rpc`, it is counted there as an RPC as well.
        """
        self._network.record_ping(peer, rtt_seconds, error, timeout)

    def record_network_rtt(
        self,
        peer: str,
        rtt_seconds: float | None,
        *,
        method: str | None = None,
        error: str | None = None,
        ping_rtt_seconds: float | None = None,
    ) -> None:
        """The network's own round trip to ``peer`` (no process wake-up or RPC handling in
        it), measured by ``method``; None with ``error`` when the probe failed.

        With ``ping_rtt_seconds``, a Ping RPC's round trip taken in the same poll, the RPC
        overhead (ping minus network round trip) is recorded as well.
        """
        self._network.record_network_rtt(peer, rtt_seconds, method, error, ping_rtt_seconds)

    def record_rpc(
        self,
        peer: str,
        method: str,
        seconds: float,
        code: str,
        sent_bytes: int = 0,
        received_bytes: int = 0,
    ) -> None:
        """One finished client RPC; ``code`` is the gRPC status name (``OK``, ``UNAVAILABLE``)."""
        self._network.record_rpc(peer, method, seconds, code, sent_bytes, received_bytes)

    def record_transfer(self, peer: str, seconds: float) -> None:
        """Forward RPC time minus the stage's reported compute time."""
        self._network.record_transfer(peer, seconds)

    def add_peer(self, peer: str) -> None:
        """Create a link's series with zero values before its first call."""
        self._network.add_peer(peer)

    # -- cluster view ------------------------------------------------------------------------

    def set_model_info(
        self, model_name: str, quantization: str, num_layers: int, num_stages: int
    ) -> None:
        """The served model (``mlxrelay_model_info``)."""
        with self._lock:
            self._model_name = model_name
            self._model = ModelInfoSnap(
                model_name=model_name,
                quantization=quantization,
                num_layers=num_layers,
                num_stages=num_stages,
            )

    def update_device_status(
        self,
        device_id: str,
        model_loaded: bool | None = None,
        assigned_layers: list[int] | None = None,
        is_healthy: bool | None = None,
        **fields: Any,
    ) -> None:
        """Update one device in the cluster view; arguments left None keep their value.

        ``fields`` may hold any :class:`DeviceStatus` field: role, stage, layer_start,
        layer_end, health_status, up, last_error, last_seen_timestamp. Unless ``up=False`` is
        given, the device counts as seen now.
        """
        unknown = set(fields) - _STATUS_FIELDS
        if unknown:
            raise TypeError(f"unknown device status fields: {sorted(unknown)}")
        update = {k: v for k, v in fields.items() if v is not None}
        if model_loaded is not None:
            update["model_loaded"] = model_loaded
        if is_healthy is not None:
            update["is_healthy"] = is_healthy
        if assigned_layers is not None:
            update["assigned_layers"] = list(assigned_layers)
            if assigned_layers:
                update.setdefault("layer_start", min(assigned_layers))
                update.setdefault("layer_end", max(assigned_layers) + 1)
        if fields.get("up") is not False:
            update.setdefault("last_seen_timestamp", self._wall_clock())
        with self._lock:
            if device_id == self.device_id and "stage" in update:
                self._stage.stage = update["stage"]
            self._status(device_id, update)

    def _status(self, device_id: str, update: dict[str, Any]) -> None:
        # Caller holds the lock. Devices beyond the cap are ignored (bounded memory).
        current = self._devices.get(device_id)
        if current is None:
            if len(self._devices) >= MAX_DEVICES:
                logger.warning("device %s ignored: cluster view is full", device_id)
                return
            current = DeviceStatus(device_id=device_id)
        self._devices[device_id] = current.model_copy(update=update)

    def set_worker_restarts(self, device_id: str, restarts: int) -> None:
        """How often the worker's process has been restarted (``mlx-relay up``'s supervisor)."""
        with self._lock:
            self._status(device_id, {"restarts": restarts})

    def device_status(self, device_id: str) -> DeviceStatus | None:
        """One device of the cluster view as last recorded, or None if it is unknown."""
        with self._lock:
            return self._devices.get(device_id)

    def update_remote_snapshot(
        self, device_id: str, snapshot: dict[str, Any] | None, *, error: str | None = None
    ) -> None:
        """Store a worker's ``export_metrics()`` (coordinator, from GetStatus).

        ``snapshot=None`` means the worker could not be reached: it is marked down with
        ``error`` and keeps its last metrics and last-seen time.
        """
        if snapshot is None:
            with self._lock:
                self._status(device_id, {"up": False, "last_error": error or "unreachable"})
            return
        try:
            remote = Snapshot.model_validate(snapshot)
        except ValidationError as exc:
            message = f"invalid status snapshot: {exc.error_count()} problem(s)"
            logger.warning("worker %s sent an %s", device_id, message)
            with self._lock:
                self._status(device_id, {"up": False, "last_error": message})
            return
        own = remote.devices.get(device_id) or remote.devices.get(remote.device_id)
        update: dict[str, Any] = own.model_dump(exclude={"device_id", "restarts"}) if own else {}
        update.update(
            role=remote.role,
            metrics=remote.device,
            up=True,
            last_error=None,
            last_seen_timestamp=self._wall_clock(),
        )
        with self._lock:
            self._status(device_id, update)
            if device_id in self._devices:
                stage = remote.stages.get(remote.device_id)
                if stage is not None:
                    self._remote_stages[device_id] = stage
                self._remote_links[device_id] = remote.network.links

    # -- reading -----------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """Everything this collector knows, now."""
        inference = self._inference.snap()
        network = self._network.snap()
        own_stage = self._stage.snap()
        occupancy = self._occupancy.snap()
        with self._lock:
            stages = dict(self._remote_stages)
            if self._stage.active:
                stages[self.device_id] = own_stage
            links = list(network.links)
            for remote_links in self._remote_links.values():
                links.extend(remote_links)
            devices = dict(self._devices)
            own = devices[self.device_id]
            if own.stage is None and self._stage.stage is not None:
                devices[self.device_id] = own.model_copy(update={"stage": self._stage.stage})
            return Snapshot(
                device_id=self.device_id,
                role=self.role,
                timestamp=self._wall_clock(),
                uptime_seconds=self._clock() - self._created,
                collection_interval_seconds=self.collection_interval,
                model=self._model,
                device=self._device,
                devices=devices,
                inference=inference,
                stages=stages,
                occupancy=occupancy,
                network=NetworkMetrics(links=links, rpc=network.rpc),
                history=list(self._history),
            )

    def export_metrics(self) -> dict[str, Any]:
        """The snapshot as JSON-ready data (``Snapshot.model_dump(mode="json")``)."""
        return self.snapshot().model_dump(mode="json")

    def get_device_metrics(self) -> dict[str, Any]:
        """This machine's latest sample; empty before the first sample."""
        with self._lock:
            device = self._device
        return device.model_dump(mode="json") if device else {}

    def get_inference_metrics(self) -> dict[str, Any]:
        return self._inference.snap().model_dump(mode="json")

    def get_throughput(self) -> dict[str, Any]:
        """The 10 s rates at the top level (requests_per_second, ...), plus every window."""
        inference: InferenceMetrics = self._inference.snap()
        windows = {k: w.model_dump(mode="json") for k, w in inference.windows.items()}
        return {
            **windows["10s"],
            "requests_running": inference.requests_running,
            "requests_waiting": inference.requests_waiting,
            "windows": windows,
        }
