"""Built-in alerting against real parts: worker processes killed and restarted, a real
webhook receiver on uvicorn, /api/alerts and /metrics of a real dashboard."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlx_relay.coordinator.requests import InferenceRequest
from mlx_relay.monitoring.dashboard import MonitoringDashboard
from tests.support.alert_receiver import alert_receiver, alerts_named
from tests.support.alerting import engine_for, monitored_process_cluster, with_alerting
from tests.support.cluster import local_cluster
from tests.support.dashboard_cluster import wait_for

PROMPT = "Each worker holds a contiguous range of transformer layers"
FAST_RECEIVER = {"group_wait": 0, "group_interval": 0.2, "repeat_interval": 3600}


def refusing_socket() -> socket.socket:
    """A bound socket that never listens: connections are refused, and no other process can
    take its port while it stays open."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


async def test_a_killed_worker_fires_stage_down_then_resolves_after_restart(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    async with (
        alert_receiver() as receiver,
        monitored_process_cluster(tiny_model_dir, tmp_path) as cluster,
    ):
        config = with_alerting(
            cluster,
            evaluation_interval=0.2,
            thresholds={"stage_down_seconds": 0.5},
            receivers=[{"name": "ops", "url": receiver.url, **FAST_RECEIVER}],
        )
        engine = engine_for(cluster, config)
        await engine.start()
        dashboard = MonitoringDashboard(
            cluster.orchestrator.metrics_collector,  # type: ignore[arg-type]
            cluster.orchestrator.health_monitor,
            port=0,
            alerts=engine,
        )
        await dashboard.start()
        try:
            await wait_for(lambda: engine.evaluations >= 3, timeout=20, what="evaluations")
            assert not [p for p in receiver.payloads if alerts_named(p, "StageDown")]
            victim = cluster.processes[1]
            victim.kill()

            def stage_down(status: str) -> Any:
                return lambda p: any(
                    a["status"] == status for a in alerts_named(p, "StageDown", device="worker-1")
                )

            fired = await receiver.wait_for(stage_down("firing"), timeout=60)
            assert fired["version"] == "4" and fired["receiver"] == "ops"
            assert fired["status"] == "firing" and fired["groupLabels"] == {
                "alertname": "StageDown"
            }
            (entry,) = alerts_named(fired, "StageDown", device="worker-1")
            assert entry["labels"]["severity"] == "critical"
            assert entry["annotations"]["summary"] == "Device worker-1 is down"
            assert entry["endsAt"] == "0001-01-01T00:00:00Z"
            assert not alerts_named(fired, "StageDown", device="worker-0")

            async with httpx.AsyncClient(base_url=dashboard.url, timeout=10) as http:
                view = (await http.get("/api/alerts")).raise_for_status().json()
                firing = [a for a in view["firing"] if a["alertname"] == "StageDown"]
                assert [a["labels"]["device"] for a in firing] == ["worker-1"]
                metrics = (await http.get("/metrics")).text
            assert (
                'mlxrelay_alerts{alertname="StageDown",severity="critical",state="firing"} 1.0'
                in metrics
            )
            assert 'mlxrelay_alert_notifications_total{outcome="sent",receiver="ops"}' in metrics

            victim.start()
            await victim.wait_serving(cluster.config)
            resolved = await receiver.wait_for(stage_down("resolved"), timeout=60)
            (entry,) = alerts_named(resolved, "StageDown", device="worker-1")
            assert entry["endsAt"] != "0001-01-01T00:00:00Z"
            assert entry["startsAt"] == alerts_named(fired, "StageDown")[0]["startsAt"]
            assert resolved["status"] == "resolved"
            assert engine.view().resolved[0].labels["device"] == "worker-1"
        finally:
            await dashboard.stop()
            await engine.stop()


ALWAYS_FIRING = """
groups:
  - name: test
    rules:
      - alert: AlwaysFiring
        expr: mlxrelay_build_info == 1
        labels: {severity: info}
        annotations: {summary: "build {{ $labels.version }}"}
"""


async def test_a_down_receiver_drops_notifications_and_inference_is_unchanged(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(ALWAYS_FIRING)
    async with monitored_process_cluster(tiny_model_dir, tmp_path) as cluster:
        orchestrator = cluster.orchestrator
        before = await orchestrator.process_request(InferenceRequest(prompt=PROMPT, max_tokens=12))
        refusing = refusing_socket()
        down = f"http://127.0.0.1:{refusing.getsockname()[1]}/hook"
        config = with_alerting(
            cluster,
            evaluation_interval=0.05,
            rules_file=str(rules_file),
            receivers=[
                {
                    "name": "down",
                    "url": down,
                    "group_wait": 0,
                    "group_interval": 0.05,
                    "repeat_interval": 0.05,
                    "max_attempts": 3,
                    "retry_backoff": 0.2,
                    "queue_size": 4,
                }
            ],
        )
        engine = engine_for(cluster, config)
        await engine.start()
        try:
            (queue,) = engine.queues
            largest_queue = 0
            for _ in range(6):
                after = await orchestrator.process_request(
                    InferenceRequest(prompt=PROMPT, max_tokens=12)
                )
                assert after.token_ids == before.token_ids
                largest_queue = max(largest_queue, queue.queued)
            await wait_for(lambda: queue.counts["dropped"] > 0, timeout=30, what="drops")
            assert queue.counts["sent"] == 0
            assert queue.queued <= 4 and largest_queue <= 4
            assert queue.last_error is not None and "ConnectError" in queue.last_error
            (alert,) = engine.alerts()
            assert alert.state == "firing"
            assert alert.annotations["summary"].startswith("build ")
        finally:
            await engine.stop()
            refusing.close()


async def test_the_coordinator_runs_the_stock_rules_and_serves_them(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from mlx_relay.core.config import AlertingConfig
    from mlx_relay.core.errors import ConfigError
    from mlx_relay.server.runtime import CoordinatorRuntime

    async with local_cluster(tiny_model_dir, 2, initialize=False) as cluster:
        settings = AlertingConfig(evaluation_interval=0.2)
        config = cluster.config.model_copy(update={"alerting": settings})
        runtime = CoordinatorRuntime(config, port=0)
        await runtime.start()
        try:
            assert runtime.services is not None
            engine = runtime.services.alert_engine
            assert engine is not None
            await wait_for(lambda: engine.evaluations >= 2, timeout=20, what="evaluations")
            async with httpx.AsyncClient(base_url=runtime.url, timeout=10) as http:
                view = (await http.get("/api/alerts")).raise_for_status().json()
                metrics = (await http.get("/metrics")).text
        finally:
            await runtime.stop()
        assert view["enabled"] is True and view["evaluated_at"] is not None
        assert len(view["rules"]) == 11
        assert {r["alertname"] for r in view["rules"]} >= {"StageDown", "GenerationStalled"}
        assert (
            'mlxrelay_alerts{alertname="StageDown",severity="critical",state="firing"} 0.0'
            in metrics
        )
        # stopped with the coordinator: no evaluation after stop
        evaluations = engine.evaluations
        await asyncio.sleep(0.5)
        assert engine.evaluations == evaluations

        # A rule outside the subset stops start-up before any worker is contacted.
        bad = tmp_path / "bad.yaml"
        bad.write_text("groups: [{name: x, rules: [{alert: Top, expr: 'topk(1, up)'}]}]\n")
        broken = config.model_copy(update={"alerting": AlertingConfig(rules_file=str(bad))})
        with pytest.raises(
            ConfigError, match=r"\(Top\)\.expr: unsupported PromQL construct 'topk'"
        ):
            await CoordinatorRuntime(broken, port=0).start()

        off = config.model_copy(update={"alerting": AlertingConfig(enabled=False)})
        runtime = CoordinatorRuntime(off, port=0)
        await runtime.start()
        try:
            assert runtime.services is not None and runtime.services.alert_engine is None
            async with httpx.AsyncClient(base_url=runtime.url, timeout=10) as http:
                view = (await http.get("/api/alerts")).raise_for_status().json()
        finally:
            await runtime.stop()
        assert view["enabled"] is False and view["rules"] == []
