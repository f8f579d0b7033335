"""The alerting rules in the real Prometheus tools: promtool accepts the generated rule file,
and a real Prometheus loaded with it, scraping a live cluster, fires StageDown into a real
Alertmanager, which delivers it to a webhook receiver. The built-in engine's own push to
Alertmanager's API is delivered the same way."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from mlx_relay.cli.prometheus_config import render, rules_text
from mlx_relay.core.config import ClusterConfig
from mlx_relay.monitoring.alerting.state import Alert, AlertState
from mlx_relay.monitoring.alerting.webhook import fingerprint, group_key, webhook_payload
from mlx_relay.monitoring.dashboard import MonitoringDashboard
from tests.e2e.test_prometheus_scrape import free_port, prometheus_server, require
from tests.support.alert_receiver import AlertReceiver, alert_receiver, alerts_named
from tests.support.alerting import (
    background_process,
    engine_for,
    monitored_process_cluster,
    wait_ready,
    with_alerting,
)
from tests.support.cluster import LocalCluster
from tests.support.dashboard_cluster import wait_for

pytestmark = [
    pytest.mark.prometheus,
    pytest.mark.skipif(
        not sys.platform.startswith("linux"),
        reason="uses Debian's prometheus packages; other systems run these tests on CI",
    ),
]

ALERTMANAGER = "prometheus-alertmanager"


def alerting_config(cluster: LocalCluster, **alerting: Any) -> ClusterConfig:
    settings = {"evaluation_interval": 1, "thresholds": {"stage_down_seconds": 1}, **alerting}
    return with_alerting(cluster, **settings)


def test_promtool_accepts_the_generated_rule_file(tmp_path: Path) -> None:
    promtool = require("promtool")
    rules_file = tmp_path / "mlx-relay.rules.yml"
    rules_file.write_text(rules_text(None))
    checked = subprocess.run(
        [promtool, "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 11 rules found" in checked.stdout
    loaded = yaml.safe_load(rules_file.read_text())
    assert {r["alert"] for r in loaded["groups"][0]["rules"]} >= {"StageDown", "HighErrorRate"}


@contextlib.contextmanager
def alertmanager_server(receiver: AlertReceiver, work_dir: Path, log_file: Path) -> Iterator[str]:
    """A real Alertmanager routing every alert to ``receiver`` at once; yields its URL."""
    config = {
        "route": {
            "receiver": "test-hook",
            "group_by": ["alertname"],
            "group_wait": "0s",
            "group_interval": "1s",
            "repeat_interval": "1h",
        },
        "receivers": [
            {"name": "test-hook", "webhook_configs": [{"url": receiver.url, "send_resolved": True}]}
        ],
    }
    config_file = work_dir / "alertmanager.yml"
    config_file.write_text(yaml.safe_dump(config))
    port = free_port()
    command = [
        require(ALERTMANAGER, package=ALERTMANAGER),
        f"--config.file={config_file}",
        f"--storage.path={work_dir / 'alertmanager-data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",
        "--log.level=warn",
    ]
    with background_process(command, log_file):
        yield f"http://127.0.0.1:{port}"


def firing_alert(device: str) -> Alert:
    labels = {"alertname": "StageDown", "device": device, "severity": "critical"}
    return Alert("StageDown", labels, {}, AlertState.FIRING, 0.0, active_at=0.0)


def stage_down_firing(device: str) -> Any:
    return lambda p: any(
        a["status"] == "firing" for a in alerts_named(p, "StageDown", device=device)
    )


async def test_prometheus_fires_stage_down_through_alertmanager(
    tiny_model_dir: Path, tmp_path: Path, output_dir: Path
) -> None:
    require("prometheus")
    async with (
        alert_receiver() as receiver,
        monitored_process_cluster(tiny_model_dir, tmp_path) as cluster,
    ):
        collector = cluster.orchestrator.metrics_collector
        assert collector is not None
        dashboard = MonitoringDashboard(collector, cluster.orchestrator.health_monitor, port=0)
        await dashboard.start()
        try:
            with alertmanager_server(receiver, tmp_path, output_dir / "alertmanager.log") as am:
                await wait_ready(am, "Alertmanager")
                config = alerting_config(cluster)
                rules_file = tmp_path / "mlx-relay.rules.yml"
                rules_file.write_text(rules_text(config))
                prometheus_yml = render(
                    config,
                    f"127.0.0.1:{dashboard.port}",
                    "1s",
                    str(tmp_path / "unused.token"),
                    None,
                    rules_file=str(rules_file),
                    alertmanager=am.removeprefix("http://"),
                )
                config_file = tmp_path / "prometheus.yml"
                config_file.write_text(prometheus_yml)
                log_file = output_dir / "prometheus.log"
                with prometheus_server(config_file, tmp_path / "tsdb", log_file) as prometheus:
                    await wait_ready(prometheus, "Prometheus")
                    async with httpx.AsyncClient(base_url=prometheus, timeout=5) as http:

                        async def rules_loaded() -> bool:
                            response = await http.get("/api/v1/rules")
                            groups = response.json()["data"]["groups"]
                            return bool(groups) and len(groups[0]["rules"]) == 11

                        await wait_for(rules_loaded, timeout=30, what="the rules to load")

                        async def scraped_up() -> bool:
                            query = {"query": 'mlxrelay_device_up{device="worker-1"}'}
                            result = (await http.get("/api/v1/query", params=query)).json()
                            return bool(result["data"]["result"])

                        await wait_for(scraped_up, timeout=60, what="a scrape of device_up")
                        cluster.processes[1].kill()
                        payload = await receiver.wait_for(stage_down_firing("worker-1"), 90)
                        alerts = (await http.get("/api/v1/alerts")).json()["data"]["alerts"]
            assert payload["version"] == "4" and payload["receiver"] == "test-hook"
            assert payload["externalURL"].startswith("http")
            (entry,) = alerts_named(payload, "StageDown", device="worker-1")
            assert entry["labels"]["severity"] == "critical"
            assert entry["annotations"]["summary"] == "Device worker-1 is down"
            assert entry["generatorURL"].startswith("http")  # Prometheus's graph link
            assert any(
                a["labels"]["alertname"] == "StageDown" and a["state"] == "firing" for a in alerts
            )
            # Our own webhook payloads have exactly the fields and group key of the real one.
            ours = webhook_payload(
                "ops",
                group_key({"alertname": "StageDown"}),
                {"alertname": "StageDown"},
                [firing_alert("worker-1")],
                "http://relay",
            )
            assert set(ours) == set(payload)
            assert set(ours["alerts"][0]) == set(entry)
            assert payload["groupKey"] == ours["groupKey"]
            assert entry["fingerprint"] == fingerprint(entry["labels"])
        finally:
            await dashboard.stop()


async def test_the_built_in_engine_pushes_to_a_real_alertmanager(
    tiny_model_dir: Path, tmp_path: Path, output_dir: Path
) -> None:
    async with (
        alert_receiver() as receiver,
        monitored_process_cluster(tiny_model_dir, tmp_path) as cluster,
    ):
        with alertmanager_server(receiver, tmp_path, output_dir / "alertmanager.log") as am:
            await wait_ready(am, "Alertmanager")
            config = alerting_config(cluster, alertmanager_url=am, evaluation_interval=0.25)
            engine = engine_for(cluster, config)
            await engine.start()
            try:
                cluster.processes[1].kill()
                payload = await receiver.wait_for(stage_down_firing("worker-1"), 60)
                (entry,) = alerts_named(payload, "StageDown", device="worker-1")
                assert entry["annotations"]["summary"] == "Device worker-1 is down"
                (queue,) = engine.queues
                assert queue.name == "alertmanager" and queue.counts["sent"] >= 1
            finally:
                await engine.stop()
