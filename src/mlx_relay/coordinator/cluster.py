"""The cluster view: polls every worker's status and pings every link the pipeline uses.

Hidden states travel coordinator -> stage -> coordinator -> next stage, so the links that
carry traffic are coordinator <-> each worker; those are the links pinged and reported.
Workers do not talk to each other, and no worker-to-worker number is made up.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from mlx_relay.coordinator.client import WorkerClient, WorkerTimedOut
from mlx_relay.coordinator.pipeline import Stage
from mlx_relay.core.errors import RelayError
from mlx_relay.core.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

PING_PAYLOAD = b"\x00" * 64
RTT_WINDOW = 32


@dataclass
class DeviceView:
    """One worker as the coordinator last saw it. ``reachable`` is None before the first
    poll; ``last_seen`` is a unix time."""

    device_id: str
    address: str
    stage: int
    layer_start: int
    layer_end: int
    reachable: bool | None = None
    healthy: bool | None = None
    health_status: str = "unknown"
    model_loaded: bool | None = None
    kv_sessions: int | None = None
    uptime_seconds: float | None = None
    last_seen: float | None = None
    last_error: str | None = None
    consecutive_failures: int = 0


@dataclass
class LinkView:
    """Ping round trips on one link (seconds), over the last :data:`RTT_WINDOW` pings."""

    source: str
    target: str
    rtt_last: float | None = None
    rtt_mean: float | None = None
    rtt_median: float | None = None
    pings_ok: int = 0
    pings_failed: int = 0
    last_error: str | None = None
    _window: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=RTT_WINDOW), repr=False
    )

    def record(self, rtt: float | None, error: str | None) -> None:
        if rtt is None:
            self.pings_failed += 1
            self.last_error = error
            return
        self.pings_ok += 1
        self.rtt_last = rtt
        self._window.append(rtt)
        self.rtt_mean = statistics.fmean(self._window)
        self.rtt_median = statistics.median(self._window)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("_window")
        return data


class ClusterMonitor:
    """Polls each worker (``GetStatus`` + ``Ping``) every ``poll_interval`` seconds and feeds
    the coordinator's collector and health monitor.

    Args:
        stages: the pipeline in order.
        clients: one WorkerClient per stage, same order.
        collector: the coordinator's MetricsCollector (remote snapshots, device status,
            pings), or None.
        health: the coordinator's HealthMonitor (peer states), or None.
        poll_interval: seconds between the starts of two polls.
        timeout: deadline of each status or ping call, seconds.
        source: the coordinator's device id (the source of every link).
    """

    def __init__(
        self,
        stages: Sequence[Stage],
        clients: Sequence[WorkerClient],
        collector: Any | None,
        health: Any | None,
        *,
        poll_interval: float,
        timeout: float,
        source: str = "coordinator",
    ) -> None:
        self.poll_interval = poll_interval
        self.timeout = timeout
        self.source = source
        self._stages = list(stages)
        self._clients = list(clients)
        self._collector = collector
        self._health = health
        self._devices = {
            s.device_id: DeviceView(
                s.device_id, s.address, s.index, s.layer_range.start, s.layer_range.end
            )
            for s in stages
        }
        self._links = {s.device_id: LinkView(source, s.device_id) for s in stages}
        self._task: asyncio.Task[None] | None = None
        self.polls = 0
        self._polled = asyncio.Event()

    async def start(self) -> None:
        """Poll once, then keep polling in the background."""
        if self._task is not None:
            return
        await self.poll_once()
        self._task = asyncio.create_task(self._run(), name="cluster-monitor")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.poll_once()
            except Exception:  # one bad poll must not end monitoring
                logger.exception("cluster poll failed")
            await asyncio.sleep(max(0.0, self.poll_interval - (time.monotonic() - started)))

    async def poll_once(self) -> None:
        """Poll every worker concurrently and publish the results."""
        pairs = zip(self._stages, self._clients, strict=True)
        await asyncio.gather(*(self._poll(stage, client) for stage, client in pairs))
        self.polls += 1
        self._polled.set()
        self._polled = asyncio.Event()

    async def wait_for_poll(self) -> None:
        """Return after the next completed poll."""
        await self._polled.wait()

    async def _poll(self, stage: Stage, client: WorkerClient) -> None:
        status_result, ping_result = await asyncio.gather(
            client.get_status(timeout=self.timeout, retry=False),
            client.ping(PING_PAYLOAD, timeout=self.timeout, retry=False),
            return_exceptions=True,
        )
        self._record_ping(stage.device_id, ping_result)
        if isinstance(status_result, BaseException):
            self._mark_unreachable(stage, status_result)
        else:
            self._mark_seen(stage, status_result)
        # Published per worker, as its answer arrives, so the health checks never lag the
        # device view that the same poll just updated.
        self._publish_peer_states()

    def _publish_peer_states(self) -> None:
        if self._health is not None:
            self._health.set_peer_states(
                {
                    d.device_id: (bool(d.reachable), bool(d.healthy), d.last_error or "")
                    for d in self._devices.values()
                    if d.reachable is not None  # not polled yet: nothing to judge
                }
            )

    def _record_ping(self, device_id: str, result: float | BaseException) -> None:
        link = self._links[device_id]
        if isinstance(result, BaseException):
            _reraise_unexpected(result)
            error = str(result)
            link.record(None, error)
            if self._collector is not None:
                timed_out = isinstance(result, WorkerTimedOut)
                self._collector.record_ping(device_id, None, error=error, timeout=timed_out)
            return
        link.record(result, None)
        if self._collector is not None:
            self._collector.record_ping(device_id, result)

    def _mark_unreachable(self, stage: Stage, error: BaseException) -> None:
        _reraise_unexpected(error)
        device = self._devices[stage.device_id]
        message = str(error)
        if device.reachable is not False:
            logger.warning("worker %s unreachable: %s", stage.device_id, message)
        device.reachable = False
        device.healthy = False
        device.health_status = "critical"
        device.last_error = message
        device.consecutive_failures += 1
        if self._collector is not None:
            self._collector.update_remote_snapshot(stage.device_id, None, error=message)
            self._collector.update_device_status(
                stage.device_id, is_healthy=False, health_status="critical", up=False
            )

    def _mark_seen(self, stage: Stage, status: Any) -> None:
        device = self._devices[stage.device_id]
        if device.reachable is False:
            logger.info("worker %s reachable again", stage.device_id)
        health_status = status.health_status or "unknown"
        healthy = bool(status.model_loaded) and health_status != "critical"
        device.reachable = True
        device.healthy = healthy
        device.health_status = health_status
        device.model_loaded = bool(status.model_loaded)
        device.kv_sessions = int(status.kv_sessions)
        device.uptime_seconds = float(status.uptime_seconds)
        device.last_seen = time.time()
        device.last_error = None if healthy else f"worker reports {health_status}"
        device.consecutive_failures = 0
        if self._collector is None:
            return
        snapshot = _parse_json(stage.device_id, status.metrics_json)
        if snapshot is not None:
            self._collector.update_remote_snapshot(stage.device_id, snapshot)
        self._collector.update_device_status(
            stage.device_id,
            model_loaded=device.model_loaded,
            assigned_layers=list(range(status.layer_start, status.layer_end)),
            is_healthy=healthy,
            role="worker",
            stage=stage.index,
            health_status=health_status,
            up=True,
        )

    def devices(self) -> list[DeviceView]:
        """The workers in pipeline order, as last seen."""
        return [self._devices[s.device_id] for s in self._stages]

    def links(self) -> list[LinkView]:
        return [self._links[s.device_id] for s in self._stages]

    def view(self) -> dict[str, Any]:
        """A JSON-serialisable cluster view: devices in pipeline order, the links pinged,
        and ``rtt_matrix[source][target]`` (latest RTT, seconds) for those links only."""
        return {
            "source": self.source,
            "poll_interval": self.poll_interval,
            "polls": self.polls,
            "devices": [asdict(d) for d in self.devices()],
            "links": [link.as_dict() for link in self.links()],
            "rtt_matrix": {self.source: {link.target: link.rtt_last for link in self.links()}},
        }


def _reraise_unexpected(error: BaseException) -> None:
    # Typed relay errors are a worker's state; anything else is a bug and must surface.
    if not isinstance(error, RelayError):
        raise error


def _parse_json(device_id: str, text: str) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        logger.warning("worker %s sent metrics that are not JSON", device_id)
        return None
    return value if isinstance(value, dict) else None
