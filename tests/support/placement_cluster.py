"""A live 2-worker cluster on a skewed split, served by the coordinator's real HTTP app."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from mlx_relay.coordinator.requests import InferenceRequest
from mlx_relay.core.http_server import HTTPServer
from mlx_relay.server.app import AppServices, create_app
from tests.support.cluster import LocalCluster, local_cluster
from tests.support.dashboard_cluster import FAST_MONITORING

SKEWED = ((0, 3), (3, 4))


@contextlib.asynccontextmanager
async def skewed_cluster_app(
    model_dir: Path, layers: Sequence[tuple[int, int]] = SKEWED, **settings: Any
) -> AsyncIterator[tuple[LocalCluster, HTTPServer]]:
    """Workers on ``layers`` and the coordinator's app (monitoring on) on port 0;
    ``settings`` go to :func:`local_cluster`."""
    async with local_cluster(
        model_dir,
        len(layers),
        enable_monitoring=True,
        layers=layers,
        monitoring=FAST_MONITORING,
        **settings,
    ) as cluster:
        orchestrator = cluster.orchestrator
        services = AppServices(
            cluster.config,
            orchestrator,
            metrics_collector=orchestrator.metrics_collector,
            health_monitor=orchestrator.health_monitor,
        )
        async with HTTPServer(create_app(services)) as server:
            yield cluster, server


async def run_requests(cluster: LocalCluster, count: int = 4, max_tokens: int = 16) -> None:
    """``count`` requests one after another, so every stage has decode timings."""
    for i in range(count):
        request = InferenceRequest(prompt=f"placement {i}", max_tokens=max_tokens)
        await cluster.orchestrator.process_request(request)
