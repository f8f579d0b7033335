"""A worker's monitoring: its collector and health monitor, and what it tells them.

Built from the config's ``monitoring`` section; the service records Forward calls and
session counts through :class:`~mlx_relay.worker.worker_state.WorkerState`, and the worker's
lifecycle reports its placement and load state here.
"""

from __future__ import annotations

from typing import Any

from mlx_relay.core.config import ClusterConfig
from mlx_relay.core.types import LayerRange
from mlx_relay.monitoring import HealthMonitor, MetricsCollector
from mlx_relay.monitoring.from_config import collector_from_config, health_monitor_from_config

ROLE = "worker"


class WorkerTelemetry:
    """The collector and health monitor of one worker.

    Args:
        config: the cluster configuration.
        device_id: the worker's id.
        stage: its position in the pipeline.
    """

    def __init__(self, config: ClusterConfig, device_id: str, stage: int) -> None:
        settings = config.monitoring
        self.device_id = device_id
        self.stage = stage
        self.collector: MetricsCollector = collector_from_config(
            device_id, ROLE, settings, model_name=config.model.name
        )
        self.health: HealthMonitor = health_monitor_from_config(device_id, settings, self.collector)

    async def start(self) -> None:
        """Start sampling and health checks; the service reports "loading the model"."""
        await self.collector.start()
        await self.health.start()
        self.health.set_service_state(True, False, "loading the model")
        self.report(None, model_loaded=False, up=True)

    async def stop(self) -> None:
        await self.health.stop()
        await self.collector.stop()

    def report(self, layer_range: LayerRange | None, **fields: Any) -> None:
        """This worker's entry in its own cluster view (placement, load state, errors)."""
        self.collector.update_device_status(
            self.device_id,
            assigned_layers=layer_range.as_list() if layer_range else None,
            role=ROLE,
            stage=self.stage,
            **fields,
        )
