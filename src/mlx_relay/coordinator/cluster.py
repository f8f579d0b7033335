"""The cluster poll: every worker's status and a measure of every link the pipeline uses,
fed into the coordinator's collector (the one record of reachability, link round trips and
link state) and its health monitor's peer check.

Hidden states travel coordinator -> stage -> coordinator -> next stage, so the links that
carry traffic are coordinator <-> each worker; those are the links measured and reported.
Workers do not talk to each other, and no worker-to-worker number is made up.

Each poll sends one ``GetStatus`` and one ``Ping`` RPC per worker, then probes the network's
own round trip with TCP handshakes (:mod:`mlx_relay.coordinator.link_probe`); the Ping RPC's
round trip minus that is the RPC overhead of a hop (docs/monitoring-api.md, "Link figures").
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from mlx_relay.coordinator.client import WorkerClient, WorkerTimedOut
from mlx_relay.coordinator.link_probe import probe_rtt
from mlx_relay.coordinator.pipeline import Stage
from mlx_relay.core.errors import RelayError
from mlx_relay.core.tasks import cancel_and_wait
from mlx_relay.monitoring import HealthMonitor, MetricsCollector, PeerState

logger = logging.getLogger(__name__)

PING_PAYLOAD = b"\x00" * 64


class ClusterMonitor:
    """Polls each worker (``GetStatus`` + ``Ping``) every ``poll_interval`` seconds and feeds
    the coordinator's collector and health monitor.

    Args:
        stages: the pipeline in order.
        clients: one WorkerClient per stage, same order.
        collector: the coordinator's MetricsCollector: each worker's status and metrics,
            and each link's pings, land there.
        health: the coordinator's HealthMonitor (peer states), or None.
        poll_interval: seconds between the starts of two polls.
        timeout: deadline of each status or ping call, seconds.

    Attributes:
        polls: how many polls have completed.
    """

    def __init__(
        self,
        stages: Sequence[Stage],
        clients: Sequence[WorkerClient],
        collector: MetricsCollector,
        health: HealthMonitor | None,
        *,
        poll_interval: float,
        timeout: float,
    ) -> None:
        self.poll_interval = poll_interval
        self.timeout = timeout
        self._stages = list(stages)
        self._clients = list(clients)
        self._collector = collector
        self._health = health
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
        """Poll every worker concurrently and record the results."""
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
            peer = self._mark_unreachable(stage, status_result)
        else:
            peer = self._mark_seen(stage, status_result)
        # Published per worker, as its answer arrives, so the health check never lags the
        # device status that the same poll just recorded.
        if self._health is not None:
            self._health.set_peer_state(stage.device_id, replace(peer, stage=stage.index))
        if isinstance(ping_result, WorkerTimedOut):
            # The path is likely dead: a probe would only wait out its own deadline too.
            error = "not probed: the Ping timed out"
            self._collector.record_network_rtt(stage.device_id, None, error=error)
        else:
            ping = None if isinstance(ping_result, BaseException) else ping_result
            await self._probe_network(stage, ping)

    def _record_ping(self, device_id: str, result: float | BaseException) -> None:
        if isinstance(result, BaseException):
            _reraise_unexpected(result)
            timed_out = isinstance(result, WorkerTimedOut)
            self._collector.record_ping(device_id, None, error=str(result), timeout=timed_out)
            return
        self._collector.record_ping(device_id, result)

    async def _probe_network(self, stage: Stage, ping: float | None) -> None:
        # After the RPCs, so that the handshakes never queue behind them on either machine.
        try:
            result = await asyncio.to_thread(
                probe_rtt, stage.device_id, stage.address, timeout=self.timeout
            )
        except RelayError as exc:
            self._collector.record_network_rtt(stage.device_id, None, error=str(exc))
            return
        self._collector.record_network_rtt(
            stage.device_id, result.seconds, method=result.method, ping_rtt_seconds=ping
        )

    def _was_up(self, device_id: str) -> bool | None:
        status = self._collector.device_status(device_id)
        return status.up if status is not None else None

    def _mark_unreachable(self, stage: Stage, error: BaseException) -> PeerState:
        _reraise_unexpected(error)
        message = str(error)
        if self._was_up(stage.device_id) is not False:
            logger.warning("worker %s unreachable: %s", stage.device_id, message)
        self._collector.update_remote_snapshot(stage.device_id, None, error=message)
        self._collector.update_device_status(
            stage.device_id, is_healthy=False, health_status="critical", up=False
        )
        return PeerState(reachable=False, healthy=False, message=message)

    def _mark_seen(self, stage: Stage, status: Any) -> PeerState:
        if self._was_up(stage.device_id) is False:
            logger.info("worker %s reachable again", stage.device_id)
        health_status = status.health_status or "unknown"
        healthy = bool(status.model_loaded) and health_status != "critical"
        snapshot = _parse_json(stage.device_id, status.metrics_json)
        if snapshot is not None:
            self._collector.update_remote_snapshot(stage.device_id, snapshot)
        self._collector.update_device_status(
            stage.device_id,
            model_loaded=bool(status.model_loaded),
            assigned_layers=list(range(status.layer_start, status.layer_end)),
            is_healthy=healthy,
            role="worker",
            stage=stage.index,
            health_status=health_status,
            up=True,
            backend=status.backend or None,
            compute=status.compute or None,
            blas=status.blas or None,
            blas_threads=status.blas_threads if status.backend else None,
        )
        message = "" if healthy else f"worker reports {health_status}"
        return PeerState(reachable=True, healthy=healthy, message=message)


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
