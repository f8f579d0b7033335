"""The monitoring REST API on a real uvicorn, over a real 2-worker cluster on the tiny model."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import yaml

from mlx_relay.core.blas import default_threads, loaded_blas
from mlx_relay.monitoring.api.views import (
    ClusterHealth,
    DevicesResponse,
    StatsResponse,
    ThroughputResponse,
)
from mlx_relay.monitoring.dashboard import start_monitoring_dashboard
from mlx_relay.monitoring.health import HealthMonitor
from mlx_relay.monitoring.metrics import MetricsCollector
from mlx_relay.monitoring.snapshot import Snapshot
from tests.support.cluster import cluster_dict, free_ports, local_cluster
from tests.support.dashboard_cluster import (
    FAST_MONITORING,
    PROMPT_MARKER,
    DashboardEnv,
    dashboard_cluster,
    run_requests,
    wait_for,
)

REQUESTS = 3
MAX_TOKENS = 4


async def _settled(env: DashboardEnv) -> None:
    # Two full polls after the last request: every worker's post-request snapshot is in.
    await env.next_poll()
    await env.next_poll()


async def test_endpoints_agree_with_the_collector_and_the_workers(tiny_model_dir: Path) -> None:
    async with dashboard_cluster(tiny_model_dir) as env:
        generated = await run_requests(env, REQUESTS, MAX_TOKENS)
        assert generated == REQUESTS * MAX_TOKENS
        await _settled(env)
        expected = env.collector.snapshot()
        async with httpx.AsyncClient(base_url=env.url, timeout=10) as http:
            bodies = {
                path: (await http.get(path)).raise_for_status()
                for path in ("/api/metrics", "/api/stats", "/api/throughput", "/api/devices")
            }
            health_response = (await http.get("/api/health")).raise_for_status()

    snapshot = Snapshot.model_validate(bodies["/api/metrics"].json())
    assert snapshot.device_id == "coordinator"
    assert snapshot.inference.requests_total == REQUESTS
    assert snapshot.inference.generation_tokens_total == generated
    assert snapshot.inference.success_total["length"] == REQUESTS
    assert snapshot.inference.histograms["e2e_request_latency_seconds"].count == REQUESTS
    assert snapshot.inference == expected.inference
    assert set(snapshot.devices) == {"coordinator", "worker-0", "worker-1"}

    stats = StatsResponse.model_validate(bodies["/api/stats"].json())
    assert stats.requests_total == REQUESTS
    assert stats.requests_finished_total == REQUESTS
    assert stats.generation_tokens_total == generated
    assert stats.error_rate == 0.0
    assert stats.failure_total == {}
    assert stats.recent_errors == []
    for key in ("e2e", "ttft", "inter_token", "time_per_output_token"):
        summary = stats.latency[key]
        assert summary == expected.inference.latency[key], key
        assert summary.count > 0
        assert summary.p50 is not None and summary.p99 is not None and summary.max is not None
        assert 0 < summary.p50 <= summary.p99 <= summary.max
    assert stats.latency["e2e"].count == REQUESTS
    assert stats.latency["ttft"].max is not None and stats.latency["e2e"].p50 is not None
    assert stats.latency["ttft"].max <= stats.latency["e2e"].max  # type: ignore[operator]

    # Per-stage compute travelled worker collector -> GetStatus -> coordinator -> API.
    assert [s.device_id for s in stats.stages] == ["worker-0", "worker-1"]
    assert [s.stage for s in stats.stages] == [0, 1]
    for stage, worker in zip(stats.stages, env.cluster.workers, strict=True):
        own = worker.collector.snapshot().stages[worker.device_id]
        assert stage.steps_total == own.steps_total
        assert stage.busy_seconds_total == own.busy_seconds_total
        assert stage.steps_total["prefill"] == REQUESTS
    busiest = max(stats.stages, key=lambda s: s.busy_seconds_total)
    assert stats.bottleneck_device == busiest.device_id
    assert [s.is_bottleneck for s in stats.stages].count(True) == 1

    throughput = ThroughputResponse.model_validate(bodies["/api/throughput"].json())
    assert throughput.requests_total == REQUESTS
    assert throughput.generation_tokens_total == generated
    minute = throughput.windows["60s"]
    assert abs(minute.requests_per_second * minute.elapsed_seconds - REQUESTS) < 1e-6
    assert abs(minute.tokens_per_second * minute.elapsed_seconds - generated) < 1e-6
    assert throughput.requests_per_second == throughput.windows["10s"].requests_per_second
    assert throughput.history, "one history point per collection interval"
    times = [p.timestamp for p in throughput.history]
    assert times == sorted(times)

    devices = DevicesResponse.model_validate(bodies["/api/devices"].json())
    assert [d.device_id for d in devices.devices] == ["coordinator", "worker-0", "worker-1"]
    stages = env.cluster.orchestrator.stages
    for device, stage in zip(devices.devices[1:], stages, strict=True):
        assert (device.role, device.stage) == ("worker", stage.index)
        assert (device.layer_start, device.layer_end) == (
            stage.layer_range.start,
            stage.layer_range.end,
        )
        assert device.up is True and device.model_loaded is True
        assert device.last_seen_timestamp is not None
        # The tiny model's weights are dense float32; its workers run in this process.
        assert (device.backend, device.compute, device.blas) == ("cpu", "float32", blas_name())
        # A step computing alone takes all the host's cores.
        assert device.blas_threads == (default_threads(1) if blas_name() != "bundled" else 0)
    total_memory = psutil.virtual_memory().total
    for device in devices.devices:
        assert device.metrics is not None, device.device_id
        # Every process runs on this machine: each one measured the same physical memory.
        assert device.metrics.memory_total_bytes == total_memory
        if device.metrics.gpu_utilization_ratio is None:
            assert device.metrics.gpu_unavailable_reason
    links = {(link.device, link.peer): link for link in devices.links}
    for worker in ("worker-0", "worker-1"):
        link = links[("coordinator", worker)]
        assert link.ping_total["ok"] > 0
        assert link.rtt_last_seconds is not None and link.rtt_last_seconds > 0
        assert link.transmit_bytes_total > 0 and link.receive_bytes_total > 0

    health = ClusterHealth.model_validate(health_response.json())
    assert health.device_id == "coordinator"
    assert {"system_resources", "distributed_health"} <= set(health.checks)
    assert [d.device_id for d in health.devices] == ["coordinator", "worker-0", "worker-1"]
    assert all(d.up for d in health.devices)
    assert health.checks["distributed_health"].status == "healthy"

    for path, response in bodies.items():
        assert PROMPT_MARKER not in response.text, path
    assert PROMPT_MARKER not in health_response.text


async def test_a_stopped_worker_turns_critical(tiny_model_dir: Path) -> None:
    async with dashboard_cluster(tiny_model_dir) as env:
        await env.cluster.workers[1].stop(grace=0.1)
        async with httpx.AsyncClient(base_url=env.url, timeout=10) as http:

            async def worker_down() -> ClusterHealth | None:
                body = ClusterHealth.model_validate((await http.get("/api/health")).json())
                return body if body.devices[2].up is False else None

            health = await wait_for(worker_down, what="worker-1 reported down")
            devices = DevicesResponse.model_validate((await http.get("/api/devices")).json())
    down = health.devices[2]
    assert (down.device_id, down.status) == ("worker-1", "critical")
    assert down.last_error
    assert health.overall_status == "critical"
    assert health.checks["distributed_health"].status == "critical"
    assert "worker-1" in health.checks["distributed_health"].message
    assert devices.devices[2].up is False
    assert devices.devices[1].up is True


async def test_openapi_documents_each_endpoint_with_its_model(tiny_model_dir: Path) -> None:
    async with (
        dashboard_cluster(tiny_model_dir) as env,
        httpx.AsyncClient(base_url=env.url, timeout=10) as http,
    ):
        schema = (await http.get("/openapi.json")).raise_for_status().json()
    expected = {
        "/api/metrics": "Snapshot",
        "/api/health": "ClusterHealth",
        "/api/devices": "DevicesResponse",
        "/api/throughput": "ThroughputResponse",
        "/api/stats": "StatsResponse",
    }
    for path, model in expected.items():
        response = schema["paths"][path]["get"]["responses"]["200"]
        ref = response["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{model}", path
    units = schema["components"]["schemas"]["DeviceMetrics"]["properties"]
    assert "bytes" in units["memory_used_bytes"]["description"]


async def test_the_coordinator_app_serves_monitoring_beside_the_openai_api(
    tiny_model_dir: Path,
) -> None:
    from mlx_relay.core.http_server import HTTPServer
    from mlx_relay.server.app import AppServices, create_app

    async with dashboard_cluster(tiny_model_dir) as env:
        orchestrator = env.cluster.orchestrator
        services = AppServices(
            env.cluster.config, orchestrator, env.collector, orchestrator.health_monitor
        )
        async with (
            HTTPServer(create_app(services)) as server,
            httpx.AsyncClient(base_url=server.url, timeout=30) as http,
        ):
            completion = await http.post(
                "/v1/completions",
                json={"model": orchestrator.model_info.name, "prompt": "Hi", "max_tokens": 3},
            )
            assert completion.status_code == 200, completion.text
            stats = StatsResponse.model_validate((await http.get("/api/stats")).json())
            metrics = (await http.get("/metrics")).text
            page = await http.get("/")
    assert stats.requests_total == 1
    assert stats.generation_tokens_total == completion.json()["usage"]["completion_tokens"]
    generated = stats.generation_tokens_total
    model = orchestrator.model_info.name
    assert f'mlxrelay_generation_tokens_total{{model_name="{model}"}} {float(generated)}' in metrics
    assert page.status_code == 200 and 'id="total-requests"' in page.text


async def test_standalone_dashboard_cli_polls_the_workers_of_a_config(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    async with local_cluster(tiny_model_dir, 2, worker_monitoring=True) as cluster:
        ports = [worker.port for worker in cluster.config.workers]
        data = cluster_dict(tiny_model_dir, 2, ports=ports, monitoring=FAST_MONITORING)
        config_file = tmp_path / "cluster.yaml"
        config_file.write_text(yaml.safe_dump(data))
        command = [sys.executable, "-m", "mlx_relay.cli", "dashboard", "--config"]
        process = await asyncio.create_subprocess_exec(
            *command, str(config_file), "--port", "0", stderr=asyncio.subprocess.PIPE
        )
        try:
            assert process.stderr is not None
            port = await asyncio.wait_for(_announced_port(process.stderr), timeout=60)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:

                async def polled() -> DevicesResponse | None:
                    body = DevicesResponse.model_validate((await http.get("/api/devices")).json())
                    workers = body.devices[1:]
                    return body if workers and all(d.metrics for d in workers) else None

                devices = await wait_for(polled, what="both workers polled")
        finally:
            process.send_signal(signal.SIGINT)
            assert await asyncio.wait_for(process.wait(), timeout=15) == 0
    assert [d.device_id for d in devices.devices] == ["dashboard", "worker-0", "worker-1"]
    assert [(d.layer_start, d.layer_end) for d in devices.devices[1:]] == [(0, 2), (2, 4)]
    assert all(d.up and d.role == "worker" for d in devices.devices[1:])
    assert {link.peer for link in devices.links} == {"worker-0", "worker-1"}


async def _announced_port(stream: asyncio.StreamReader) -> int:
    seen = b""
    while line := await stream.readline():
        seen += line
        found = re.search(rb"dashboard on http://[^:]+:(\d+)/", line)
        if found:
            return int(found.group(1))
    raise AssertionError(f"the dashboard did not start:\n{seen.decode(errors='replace')}")


def test_the_integration_example_runs() -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "monitoring_integration_example.py"
    done = subprocess.run(
        [sys.executable, str(example), "--port", "0", "--duration", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert re.search(r"dashboard: http://127\.0\.0\.1:\d+/", done.stdout)
    requests = re.search(r"(\d+) requests, (\d+) tokens", done.stdout)
    assert requests and int(requests.group(1)) > 0, done.stdout


async def test_start_monitoring_dashboard_serves_until_cancelled() -> None:
    collector = MetricsCollector("coordinator", 0.1, role="coordinator")
    health = HealthMonitor("coordinator", metrics_collector=collector)
    port = free_ports(1)[0]
    task = asyncio.create_task(start_monitoring_dashboard(collector, health, port=port))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:

            async def answered() -> httpx.Response | None:
                with contextlib.suppress(httpx.TransportError):
                    return await http.get("/api/health")
                return None

            response = await wait_for(answered, what="the dashboard to answer")
        assert response.status_code == 200
        assert response.json()["device_id"] == "coordinator"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # released once cancelled


def blas_name() -> str:
    library = loaded_blas()
    return library.name if library is not None and library.path is not None else "bundled"
