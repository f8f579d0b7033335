"""A 2-worker loopback cluster with monitoring on, served by a real dashboard on port 0.

async with dashboard_cluster(tiny_model_dir) as env:
    tokens = await run_requests(env, 3)
    async with httpx.AsyncClient(base_url=env.url) as http:
        ...
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mlx_relay.coordinator.requests import InferenceRequest
from mlx_relay.core.config import HTTPConfig
from mlx_relay.monitoring.dashboard import MonitoringDashboard
from mlx_relay.monitoring.health import HealthMonitor
from mlx_relay.monitoring.metrics import MetricsCollector
from tests.support.cluster import LocalCluster, local_cluster

T = TypeVar("T")

# Fast collection so that tests see polls and updates within a fraction of a second.
FAST_MONITORING = {"collection_interval": 0.25, "poll_interval": 0.25, "health_check_interval": 1.0}
# A prompt word that must never show up in any monitoring output.
PROMPT_MARKER = "zebracorn"


@dataclass
class DashboardEnv:
    cluster: LocalCluster
    dashboard: MonitoringDashboard

    @property
    def url(self) -> str:
        return self.dashboard.url

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://", 1) + "/ws"

    @property
    def collector(self) -> MetricsCollector:
        collector = self.cluster.orchestrator.metrics_collector
        assert collector is not None
        return collector

    @property
    def health(self) -> HealthMonitor:
        health = self.cluster.orchestrator.health_monitor
        assert health is not None
        return health

    async def next_poll(self) -> None:
        """Wait until the coordinator has polled every worker once more."""
        monitor = self.cluster.orchestrator.cluster_monitor
        assert monitor is not None
        await asyncio.wait_for(monitor.wait_for_poll(), timeout=10)


@contextlib.asynccontextmanager
async def dashboard_cluster(
    model_dir: Path,
    *,
    config: HTTPConfig | None = None,
    update_interval: float = 0.2,
    num_workers: int = 2,
) -> AsyncIterator[DashboardEnv]:
    async with local_cluster(
        model_dir, num_workers, enable_monitoring=True, monitoring=FAST_MONITORING
    ) as cluster:
        orchestrator = cluster.orchestrator
        assert orchestrator.metrics_collector is not None
        dashboard = MonitoringDashboard(
            orchestrator.metrics_collector,
            orchestrator.health_monitor,
            port=0,
            config=config,
            update_interval=update_interval,
        )
        await dashboard.start()
        try:
            yield DashboardEnv(cluster, dashboard)
        finally:
            await dashboard.stop()


async def run_requests(env: DashboardEnv, count: int, max_tokens: int = 4) -> int:
    """Send ``count`` requests through the pipeline; returns the tokens generated."""
    generated = 0
    for i in range(count):
        request = InferenceRequest(prompt=f"{PROMPT_MARKER} request {i}", max_tokens=max_tokens)
        response = await env.cluster.orchestrator.process_request(request)
        generated += response.usage.completion_tokens
    return generated


async def wait_for(
    probe: Callable[[], Awaitable[T | None]] | Callable[[], T | None],
    *,
    timeout: float = 10.0,
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    """Poll ``probe`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last  # type: ignore[no-any-return]
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
