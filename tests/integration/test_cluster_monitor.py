"""The coordinator's cluster view over real worker processes: layers, live metrics, link RTTs;
a killed worker turns critical within two polls and comes back when it restarts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlx_relay.coordinator.cluster import ClusterMonitor
from mlx_relay.coordinator.orchestrator import InferenceRequest
from tests.support.cluster import process_cluster

POLL = 0.5
MONITORING = {"poll_interval": POLL, "collection_interval": 0.5}
NETWORK = {"ping_timeout": 1.0, "request_timeout": 5.0}


async def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def device(monitor: ClusterMonitor, device_id: str) -> dict[str, Any]:
    return next(d for d in monitor.view()["devices"] if d["device_id"] == device_id)


def peer_check(health: Any) -> dict[str, Any]:
    check: dict[str, Any] = health.get_health_summary()["checks"]["distributed_health"]
    return check


async def test_cluster_view_follows_a_worker_killed_and_restarted(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    async with process_cluster(
        tiny_model_dir,
        tmp_path,
        2,
        enable_monitoring=True,
        worker_monitoring=True,
        monitoring=MONITORING,
        network=NETWORK,
    ) as cluster:
        orchestrator = cluster.orchestrator
        monitor = orchestrator.cluster_monitor
        collector = orchestrator.metrics_collector
        health = orchestrator.health_monitor
        assert monitor is not None and collector is not None and health is not None
        await orchestrator.process_request(InferenceRequest(prompt="hello", max_tokens=4))
        await monitor.wait_for_poll()
        await monitor.wait_for_poll()

        view = monitor.view()
        assert [(d["device_id"], d["layer_start"], d["layer_end"]) for d in view["devices"]] == [
            ("worker-0", 0, 2),
            ("worker-1", 2, 4),
        ]
        for entry in view["devices"]:
            assert entry["reachable"] is True and entry["healthy"] is True
            assert entry["model_loaded"] is True and entry["kv_sessions"] == 0
            assert entry["uptime_seconds"] > 0
        # Only the links the pipeline uses, each measured.
        assert list(view["rtt_matrix"]) == ["coordinator"]
        assert set(view["rtt_matrix"]["coordinator"]) == {"worker-0", "worker-1"}
        assert all(rtt > 0 for rtt in view["rtt_matrix"]["coordinator"].values())
        assert all(link["pings_ok"] >= 2 for link in view["links"])

        # Live metrics of each worker, as the worker itself reported them.
        devices = collector.export_metrics()["devices"]
        for worker_id, stage in (("worker-0", 0), ("worker-1", 1)):
            entry = devices[worker_id]
            assert entry["up"] is True and entry["stage"] == stage
            assert entry["metrics"] is not None
            assert entry["metrics"]["memory_total_bytes"] > 0
        stages = collector.export_metrics()["stages"]
        assert stages["worker-1"]["steps_total"]["decode"] >= 4
        assert peer_check(health)["status"] == "healthy"

        victim = cluster.processes[1]
        victim.kill()
        polls_at_kill = monitor.polls
        await wait_until(lambda: device(monitor, "worker-1")["reachable"] is False)
        assert monitor.polls - polls_at_kill <= 2
        down = device(monitor, "worker-1")
        assert down["healthy"] is False and down["health_status"] == "critical"
        assert "worker-1" in down["last_error"]
        assert device(monitor, "worker-0")["reachable"] is True
        assert peer_check(health)["status"] == "critical"
        status = collector.export_metrics()["devices"]["worker-1"]
        assert status["up"] is False and status["is_healthy"] is False
        assert monitor.view()["links"][1]["pings_failed"] >= 1

        victim.start()
        await victim.wait_serving(cluster.config)
        await wait_until(lambda: device(monitor, "worker-1")["healthy"] is True)
        assert device(monitor, "worker-1")["reachable"] is True
        await wait_until(lambda: peer_check(health)["status"] == "healthy")
        assert collector.export_metrics()["devices"]["worker-1"]["up"] is True
