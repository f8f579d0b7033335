"""The coordinator's cluster view over real worker processes, as its HTTP routes serve it:
layers, live metrics, link RTTs; a killed worker turns critical within two polls and comes
back when it restarts."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from mlx_relay.coordinator.orchestrator import InferenceRequest
from mlx_relay.core.http_server import HTTPServer
from mlx_relay.server.app import AppServices, create_app
from tests.support.cluster import LocalCluster, process_cluster

POLL = 0.5
MONITORING = {"poll_interval": POLL, "collection_interval": 0.5}
NETWORK = {"ping_timeout": 1.0, "request_timeout": 5.0}


async def wait_until(condition: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def served(cluster: LocalCluster) -> AsyncIterator[httpx.AsyncClient]:
    """The coordinator's app over the cluster's orchestrator, on a real uvicorn."""
    orchestrator = cluster.orchestrator
    services = AppServices(
        cluster.config,
        orchestrator,
        orchestrator.metrics_collector,
        orchestrator.health_monitor,
    )
    async with (
        HTTPServer(create_app(services)) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10) as http,
    ):
        yield http


async def devices(http: httpx.AsyncClient) -> dict[str, Any]:
    body: dict[str, Any] = (await http.get("/api/devices")).json()
    return body


async def device(http: httpx.AsyncClient, device_id: str) -> dict[str, Any]:
    return next(d for d in (await devices(http))["devices"] if d["device_id"] == device_id)


async def peer_check(http: httpx.AsyncClient) -> dict[str, Any]:
    check: dict[str, Any] = (await http.get("/api/health")).json()["checks"]["distributed_health"]
    return check


async def test_cluster_view_follows_a_worker_killed_and_restarted(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    async with (
        process_cluster(
            tiny_model_dir,
            tmp_path,
            2,
            enable_monitoring=True,
            worker_monitoring=True,
            monitoring=MONITORING,
            network=NETWORK,
        ) as cluster,
        served(cluster) as http,
    ):
        orchestrator = cluster.orchestrator
        monitor = orchestrator.cluster_monitor
        assert monitor is not None
        await orchestrator.process_request(InferenceRequest(prompt="hello", max_tokens=4))
        await monitor.wait_for_poll()
        await monitor.wait_for_poll()

        view = await devices(http)
        workers = [d for d in view["devices"] if d["role"] == "worker"]
        assert [
            (d["device_id"], d["stage"], d["layer_start"], d["layer_end"]) for d in workers
        ] == [
            ("worker-0", 0, 0, 2),
            ("worker-1", 1, 2, 4),
        ]
        for entry in workers:
            assert entry["up"] is True and entry["is_healthy"] is True
            assert entry["model_loaded"] is True and entry["health_status"] == "healthy"
            # Live metrics of each worker, as the worker itself reported them.
            assert entry["metrics"]["memory_total_bytes"] > 0
        # Only the links the pipeline uses, each measured.
        links = {link["peer"]: link for link in view["links"] if link["device"] == "coordinator"}
        assert set(links) == {"worker-0", "worker-1"}
        assert all(link["ping_total"]["ok"] >= 2 for link in links.values())
        for link in links.values():
            # The network's own round trip, the Ping RPC's, and what the RPC adds on top.
            assert 0 < link["rtt_last_seconds"] < link["ping_rtt"]["max"]
            assert link["rtt_method"] == ("tcp_info" if sys.platform == "linux" else "tcp_connect")
            assert link["rtt_unavailable_reason"] is None
            assert link["rpc_overhead"]["count"] >= 1
        stats = (await http.get("/api/stats")).json()
        by_stage = {s["device_id"]: s for s in stats["stages"]}
        assert by_stage["worker-1"]["steps_total"]["decode"] >= 4
        assert by_stage["worker-0"]["kv_sessions"] == 0  # the finished request freed its cache
        assert (await peer_check(http))["status"] == "healthy"

        victim = cluster.processes[1]
        victim.kill()
        polls_at_kill = monitor.polls

        async def worker_1_down() -> bool:
            return (await device(http, "worker-1"))["up"] is False

        await wait_until(worker_1_down)
        assert monitor.polls - polls_at_kill <= 2
        down = await device(http, "worker-1")
        assert down["is_healthy"] is False and down["health_status"] == "critical"
        assert "worker-1" in down["last_error"]
        assert (await device(http, "worker-0"))["up"] is True
        check = await peer_check(http)
        assert check["status"] == "critical" and check["message"] == "unreachable: worker-1"
        health = (await http.get("/api/health")).json()
        assert {d["device_id"]: d["status"] for d in health["devices"]}["worker-1"] == "critical"
        link = next(link for link in (await devices(http))["links"] if link["peer"] == "worker-1")
        assert link["ping_total"]["error"] + link["ping_total"]["timeout"] >= 1

        async def probe_refused() -> bool:
            # Its port refuses the TCP probe: no network round trip, and the reason why.
            found = next(x for x in (await devices(http))["links"] if x["peer"] == "worker-1")
            return "TCP probe of" in (found["rtt_unavailable_reason"] or "")

        await wait_until(probe_refused, timeout=5)

        victim.start()
        await victim.wait_serving(cluster.config)

        async def worker_1_back() -> bool:
            entry = await device(http, "worker-1")
            return entry["up"] is True and entry["is_healthy"] is True

        await wait_until(worker_1_back)

        async def peers_healthy() -> bool:
            return (await peer_check(http))["status"] == "healthy"

        await wait_until(peers_healthy)
