"""The coordinator's composition root cleans up after a start-up that fails half-way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mlx_relay.coordinator.orchestrator import DistributedOrchestrator
from mlx_relay.server import app
from tests.support.cluster import local_cluster


class _FailingEngine:
    async def start(self) -> None:
        raise RuntimeError("alert engine cannot start")

    async def stop(self) -> None:
        pass


async def test_a_failing_alert_engine_start_closes_the_connected_orchestrator(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shut_down: list[DistributedOrchestrator] = []
    real_shutdown = DistributedOrchestrator.shutdown

    async def recording_shutdown(self: DistributedOrchestrator, *args: Any, **kwargs: Any) -> Any:
        shut_down.append(self)
        return await real_shutdown(self, *args, **kwargs)

    monkeypatch.setattr(DistributedOrchestrator, "shutdown", recording_shutdown)
    monkeypatch.setattr(app, "build_alert_engine", lambda *args, **kwargs: _FailingEngine())
    cluster_cm = local_cluster(tiny_model_dir, 2, enable_monitoring=True, initialize=False)
    async with cluster_cm as cluster:
        config = cluster.config
        assert config.alerting.enabled and config.monitoring.enabled
        with pytest.raises(RuntimeError, match="alert engine cannot start"):
            await app.start_services(config)
        started = [o for o in shut_down if o is not cluster.orchestrator]
    # The orchestrator start_services built and connected was shut down before the error rose.
    assert len(started) == 1
    assert started[0].ready is False
