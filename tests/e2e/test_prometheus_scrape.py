"""/metrics against the real Prometheus tools: promtool's linter and a live Prometheus server
scraping a 2-worker cluster."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mlx_relay.cli.prometheus_config import render
from mlx_relay.core.config import HTTPConfig
from tests.support.alerting import background_process, wait_ready
from tests.support.dashboard_cluster import dashboard_cluster, run_requests, wait_for

pytestmark = [
    pytest.mark.prometheus,
    pytest.mark.skipif(
        not sys.platform.startswith("linux"),
        reason="uses Debian's prometheus package; other systems run these tests on CI",
    ),
]

METRICS_TOKEN = "scrape-token"


def require(tool: str, package: str = "prometheus") -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(
            f"{tool} not found: install it with `make system-packages` "
            f"(or `sudo apt-get install -y {package}`)."
        )
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def prometheus_server(config_file: Path, data_dir: Path, log_file: Path) -> Iterator[str]:
    """A Prometheus server on a free loopback port; yields its base URL."""
    port = free_port()
    command = [
        require("prometheus"),
        f"--config.file={config_file}",
        f"--storage.tsdb.path={data_dir}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--storage.tsdb.retention.time=1h",
        "--log.level=warn",
    ]
    with background_process(command, log_file):
        yield f"http://127.0.0.1:{port}"


async def test_promtool_accepts_the_live_exposition(tiny_model_dir: Path) -> None:
    promtool = require("promtool")
    async with dashboard_cluster(tiny_model_dir) as env:
        await run_requests(env, 2, max_tokens=3)
        await env.next_poll()
        async with httpx.AsyncClient(base_url=env.url, timeout=10) as http:
            text = (await http.get("/metrics")).raise_for_status().text
    assert "mlxrelay_stage_forward_duration_seconds_bucket" in text
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == "" and checked.stderr.strip() == "", (
        checked.stdout + checked.stderr
    )


async def test_prometheus_scrapes_the_generated_token_count(
    tiny_model_dir: Path, tmp_path: Path, output_dir: Path
) -> None:
    require("prometheus")
    config = HTTPConfig(auth_token="ui-token", metrics_token=METRICS_TOKEN)
    token_file = tmp_path / "metrics.token"
    token_file.write_text(METRICS_TOKEN)
    async with dashboard_cluster(tiny_model_dir, config=config) as env:
        # The same configuration `mlx-relay prometheus-config` prints, pointed at this test.
        prometheus_yml = render(
            None, f"127.0.0.1:{env.dashboard.port}", "1s", str(token_file), METRICS_TOKEN
        )
        config_file = tmp_path / "prometheus.yml"
        config_file.write_text(prometheus_yml)
        log_file = output_dir / "prometheus.log"
        with prometheus_server(config_file, tmp_path / "tsdb", log_file) as base:
            await wait_ready(base, "Prometheus")
            async with httpx.AsyncClient(base_url=base, timeout=5) as http:
                generated = await run_requests(env, 3, max_tokens=4)
                assert generated == 12

                async def scraped_value() -> float | None:
                    response = await http.get(
                        "/api/v1/query", params={"query": "mlxrelay_generation_tokens_total"}
                    )
                    results = response.json()["data"]["result"]
                    if results and float(results[0]["value"][1]) == generated:
                        return float(results[0]["value"][1])
                    return None

                value = await wait_for(
                    scraped_value, timeout=60, interval=0.5, what="the scraped token count"
                )
                assert value == generated
                up = (await http.get("/api/v1/query", params={"query": "up"})).json()
                assert up["data"]["result"][0]["value"][1] == "1"
                targets = (await http.get("/api/v1/targets")).json()["data"]["activeTargets"]
                assert [t["health"] for t in targets] == ["up"], targets
