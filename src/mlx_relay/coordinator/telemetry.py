"""The coordinator's monitoring, wired beside the pipeline rather than inside it.

:class:`CoordinatorTelemetry` holds the coordinator's collector and health monitor and, once
the pipeline is connected, the :class:`~mlx_relay.coordinator.cluster.ClusterMonitor` that
polls every worker. The composition root (:func:`mlx_relay.server.app.start_services`)
builds it and hands it to the orchestrator, which only records into it and tells it when the
pipeline is up and when it goes down.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from mlx_relay.coordinator.client import WorkerClient
from mlx_relay.coordinator.cluster import ClusterMonitor
from mlx_relay.coordinator.pipeline import Stage
from mlx_relay.core.config import ClusterConfig
from mlx_relay.model.load import ModelInfo
from mlx_relay.monitoring import HealthMonitor, MetricsCollector
from mlx_relay.monitoring.from_config import collector_from_config, health_monitor_from_config

logger = logging.getLogger(__name__)

ROLE = "coordinator"


def register_stages(
    collector: MetricsCollector, stages: Sequence[Stage], *, model_loaded: bool | None = None
) -> None:
    """Put every stage in the collector's cluster view (and its link's series) before the
    first poll, so the view shows the pipeline in order from the start."""
    for stage in stages:
        collector.add_peer(stage.device_id)
        collector.update_device_status(
            stage.device_id,
            model_loaded=model_loaded,
            assigned_layers=stage.layer_range.as_list(),
            role="worker",
            stage=stage.index,
        )


class CoordinatorTelemetry:
    """The coordinator's collector, health monitor and cluster poll.

    Args:
        config: the cluster configuration (``monitoring`` and ``network.ping_timeout``).
        collector: the collector to record into.
        health: the health monitor fed with the pipeline's and the peers' state.
        owned: the parts this object starts and stops (the ones it built); a part handed in
            by the caller is the caller's to start and stop.

    Attributes:
        cluster_monitor: the worker poll, from :meth:`attach` until :meth:`detach`.
    """

    def __init__(
        self,
        config: ClusterConfig,
        collector: MetricsCollector,
        health: HealthMonitor,
        *,
        owned: Sequence[MetricsCollector | HealthMonitor] = (),
    ) -> None:
        self.config = config
        self.collector = collector
        self.health = health
        self.cluster_monitor: ClusterMonitor | None = None
        self._owned: list[Any] = list(owned)

    @classmethod
    def from_config(
        cls,
        config: ClusterConfig,
        *,
        collector: MetricsCollector | None = None,
        health: HealthMonitor | None = None,
    ) -> CoordinatorTelemetry:
        """Build the parts not handed in from ``config.monitoring``; those it builds, it owns."""
        settings = config.monitoring
        device_id = config.coordinator_id
        owned: list[MetricsCollector | HealthMonitor] = []
        if collector is None:
            collector = collector_from_config(device_id, ROLE, settings)
            owned.append(collector)
        if health is None:
            health = health_monitor_from_config(device_id, settings, collector)
            owned.append(health)
        return cls(config, collector, health, owned=owned)

    async def attach(
        self, stages: Sequence[Stage], clients: Sequence[WorkerClient], info: ModelInfo
    ) -> None:
        """The pipeline is connected: record it, start the owned parts, start polling."""
        collector = self.collector
        collector.set_model_info(info.name, info.quantization, info.num_layers, len(stages))
        register_stages(collector, stages, model_loaded=True)
        self.health.set_service_state(True, True, "pipeline ready")
        for part in self._owned:
            await part.start()
        self.cluster_monitor = ClusterMonitor(
            stages,
            clients,
            collector,
            self.health,
            poll_interval=self.config.monitoring.poll_interval,
            timeout=self.config.network.ping_timeout,
        )
        await self.cluster_monitor.start()

    def moved(self, stages: Sequence[Stage]) -> None:
        """The stages hold new layer ranges (a live repartition): the view shows them."""
        register_stages(self.collector, stages, model_loaded=True)

    async def detach(self) -> None:
        """Stop polling and the owned parts (the pipeline is going down)."""
        monitor, self.cluster_monitor = self.cluster_monitor, None
        if monitor is not None:
            await monitor.stop()
        for part in reversed(self._owned):
            await part.stop()
