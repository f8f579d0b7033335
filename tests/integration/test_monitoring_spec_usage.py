"""The monitoring reference's integration recipes, as written: a worker from a config file
with monitoring on, then an orchestrator with ``enable_monitoring=True`` that builds its own
monitoring, and monitoring that happens by itself during inference."""

from __future__ import annotations

from pathlib import Path

import yaml

from mlx_relay.coordinator.orchestrator import DistributedOrchestrator, InferenceRequest
from mlx_relay.core.config import ClusterConfig
from mlx_relay.worker.worker_server import WorkerServer
from tests.support.cluster import cluster_dict, free_ports

FAST = {"collection_interval": 0.2, "poll_interval": 0.2, "health_check_interval": 1.0}


async def test_worker_and_orchestrator_recipes_work_as_written(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    config_file = tmp_path / "cluster_config.yaml"
    data = cluster_dict(tiny_model_dir, 1, ports=free_ports(1), monitoring=FAST)
    config_file.write_text(yaml.safe_dump(data))

    worker = WorkerServer(str(config_file), enable_monitoring=True)
    await worker.start()
    orchestrator: DistributedOrchestrator | None = None
    try:
        config = ClusterConfig.from_yaml(config_file)
        orchestrator = DistributedOrchestrator(config, enable_monitoring=True)
        await orchestrator.initialize()
        response = await orchestrator.process_request(
            InferenceRequest(prompt="hello", max_tokens=3)
        )
        assert response.usage.completion_tokens >= 1

        # The orchestrator's own monitoring recorded the request and polls the worker...
        collector = orchestrator.metrics_collector
        monitor = orchestrator.cluster_monitor
        assert collector is not None and monitor is not None
        await monitor.wait_for_poll()
        snapshot = collector.snapshot()
        assert snapshot.inference.requests_total == 1
        assert snapshot.devices["worker-0"].up is True
        # ...and the worker's monitoring recorded its stage's forward calls.
        assert worker.collector is not None
        stage = worker.collector.snapshot().stages["worker-0"]
        assert stage.steps_total["decode"] >= response.usage.completion_tokens
    finally:
        if orchestrator is not None:
            await orchestrator.shutdown()
        await worker.stop()
    assert orchestrator.cluster_monitor is None  # shutdown stopped the poll
