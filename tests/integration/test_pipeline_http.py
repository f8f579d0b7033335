"""The coordinator's HTTP app on a real uvicorn (port 0): /health over a live pipeline."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlx_relay.core.config import ClusterConfig
from mlx_relay.core.errors import BindError
from mlx_relay.core.http_server import HTTPServer
from mlx_relay.server.app import AppServices, create_app
from tests.support.cluster import local_cluster
from tests.support.rounds import wait_rounds


async def test_health_names_the_stage_that_stops_serving(tiny_model_dir: Path) -> None:
    # Polled every 0.2 s, so that the poll after the stop comes soon.
    async with local_cluster(tiny_model_dir, 2, monitoring={"poll_interval": 0.2}) as cluster:
        services = AppServices(cluster.config, cluster.orchestrator)
        async with HTTPServer(create_app(services)) as server, httpx.AsyncClient() as client:
            assert server.port > 0
            ok = await client.get(f"{server.url}/health")
            assert ok.status_code == 200
            body = ok.json()
            assert isinstance(body.pop("checked_at"), float)
            assert body == {
                "status": "ok",
                "stages": [
                    {"device_id": "worker-0", "stage": 0, "layers": [0, 2], "status": "SERVING"},
                    {"device_id": "worker-1", "stage": 1, "layers": [2, 4], "status": "SERVING"},
                ],
                "failing": [],
                "degraded": [],
                "detail": None,
            }
            await cluster.workers[1].stop(grace=0)
            # /health answers from the last poll: the next one sees the stage gone.
            poll = cluster.orchestrator.health_poll
            await wait_rounds(poll, 1)
            down = await client.get(f"{server.url}/health")
            assert down.status_code == 503
            body = down.json()
            assert body["status"] == "unavailable"
            assert body["failing"] == ["worker-1"]
            assert body["detail"] == "not serving: worker-1 (UNREACHABLE)"
        port = server.port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # released after stop


async def test_health_answers_from_the_last_poll(tiny_model_dir: Path) -> None:
    """Fifty /health calls send no health RPC of their own: every RPC a worker gets is one
    of the coordinator's polls (one per worker per poll)."""
    async with local_cluster(tiny_model_dir, 2, monitoring={"poll_interval": 0.2}) as cluster:
        orchestrator = cluster.orchestrator
        rpcs = {"n": 0}
        for worker_client in orchestrator._clients:
            real = worker_client.health

            async def counted(*args: Any, real: Any = real, **kwargs: Any) -> str:
                rpcs["n"] += 1
                return str(await real(*args, **kwargs))

            worker_client.health = counted  # type: ignore[method-assign]
        poll = orchestrator.health_poll
        services = AppServices(cluster.config, orchestrator)
        async with HTTPServer(create_app(services)) as server, httpx.AsyncClient() as client:
            await wait_rounds(poll, 1)
            rounds, before = poll.rounds, rpcs["n"]
            answers = [await client.get(f"{server.url}/health") for _ in range(50)]
            # The poll may be mid-round: count only whole rounds, with the one in flight.
            await wait_rounds(poll, 1)
            polled, sent = poll.rounds - rounds, rpcs["n"] - before
        assert all(a.status_code == 200 for a in answers)
        assert sent <= 2 * polled, (sent, polled)
        assert polled < 50  # the test did not just outpace fifty polls


async def test_health_without_a_ready_pipeline(tiny_model_dir: Path) -> None:
    async with local_cluster(tiny_model_dir, 1, initialize=False) as cluster:
        apps = {
            "dashboard": create_app(AppServices(cluster.config)),
            "starting": create_app(AppServices(cluster.config, cluster.orchestrator)),
        }
        async with (
            HTTPServer(apps["dashboard"]) as a,
            HTTPServer(apps["starting"]) as b,
            httpx.AsyncClient() as client,
        ):
            standalone = await client.get(f"{a.url}/health")
            starting = await client.get(f"{b.url}/health")
    assert standalone.status_code == 200 and standalone.json()["stages"] == []
    assert starting.status_code == 503
    assert starting.json()["detail"] == "pipeline not initialised"


async def test_busy_port_is_a_bind_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = ClusterConfig.from_dict({"devices": [{"id": "w", "port": 0}]})
        server = HTTPServer(create_app(AppServices(config)), port=port)
        with pytest.raises(BindError, match=f"cannot listen on 127.0.0.1:{port}"):
            await server.start()


async def test_a_start_cancelled_midway_leaves_nothing_listening() -> None:
    config = ClusterConfig.from_dict({"devices": [{"id": "w", "port": 0}]})
    server = HTTPServer(create_app(AppServices(config)))
    starting = asyncio.create_task(server.start())
    await asyncio.sleep(0)  # start() has bound its socket and is waiting for uvicorn
    assert server.port != 0
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", server.port))  # fails while uvicorn still listens
        sock.listen()


async def test_health_asks_for_the_app_token_when_one_is_set(tiny_model_dir: Path) -> None:
    async with local_cluster(tiny_model_dir, 1) as cluster:
        http = cluster.config.http.model_copy(update={"auth_token": "s3cret"})
        config = cluster.config.model_copy(update={"http": http})
        app = create_app(AppServices(config, cluster.orchestrator))
        async with HTTPServer(app) as server, httpx.AsyncClient() as client:
            missing = await client.get(f"{server.url}/health")
            wrong = await client.get(f"{server.url}/health", headers={"Authorization": "Bearer x"})
            right = await client.get(
                f"{server.url}/health", headers={"Authorization": "Bearer s3cret"}
            )
    assert missing.status_code == 401 and wrong.status_code == 401
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert right.status_code == 200 and right.json()["status"] == "ok"
