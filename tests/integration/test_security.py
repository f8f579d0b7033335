"""Security defaults on a real server: tokens, /metrics access, rate limit, CORS, exposure."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import websockets

from mlx_relay.core.addresses import is_loopback
from mlx_relay.core.config import HTTPConfig
from mlx_relay.core.http_access import TokenBucketLimiter, exposure_warning, tokens_match
from mlx_relay.monitoring.dashboard import MonitoringDashboard
from mlx_relay.monitoring.metrics import MetricsCollector

TOKEN = "s3cret-token"
METRICS_TOKEN = "scrape-token"


@contextlib.asynccontextmanager
async def serving(
    config: HTTPConfig,
) -> AsyncIterator[tuple[MonitoringDashboard, httpx.AsyncClient]]:
    """A dashboard on port 0 with ``config``, and an HTTP client for it."""
    collector = MetricsCollector("coordinator", 0.1, role="coordinator")
    dashboard = MonitoringDashboard(collector, None, port=0, config=config, update_interval=0.1)
    await dashboard.start()
    try:
        async with httpx.AsyncClient(base_url=dashboard.url, timeout=10) as http:
            yield dashboard, http
    finally:
        await dashboard.stop()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_without_a_token_everything_is_open_and_cors_is_off() -> None:
    async with serving(HTTPConfig()) as (_, http):
        for path in ("/", "/api/metrics", "/api/health", "/metrics", "/static/dashboard.js"):
            assert (await http.get(path)).status_code == 200, path
        origin = {"Origin": "http://elsewhere.test"}
        response = await http.get("/api/metrics", headers=origin)
        assert "access-control-allow-origin" not in response.headers
        preflight = await http.options(
            "/api/metrics",
            headers={**origin, "Access-Control-Request-Method": "GET"},
        )
        assert "access-control-allow-origin" not in preflight.headers


async def test_a_token_guards_page_api_and_metrics() -> None:
    async with serving(HTTPConfig(auth_token=TOKEN)) as (_, http):
        for path in ("/", "/api/metrics", "/api/stats", "/metrics"):
            refused = await http.get(path)
            assert refused.status_code == 401, path
            assert refused.headers["www-authenticate"].startswith("Bearer")
            assert (await http.get(path, headers=bearer("wrong"))).status_code == 401
            assert (await http.get(path, headers=bearer(TOKEN))).status_code == 200, path
            assert (await http.get(path, params={"token": TOKEN})).status_code == 200, path
        # Scripts and styles hold no data: the page can load them without a header.
        assert (await http.get("/static/dashboard.css")).status_code == 200
        page = await http.get("/", params={"token": TOKEN})
        assert page.headers["referrer-policy"] == "no-referrer"
        assert TOKEN not in page.text


async def test_metrics_token_and_metrics_open() -> None:
    config = HTTPConfig(auth_token=TOKEN, metrics_token=METRICS_TOKEN)
    async with serving(config) as (_, http):
        assert (await http.get("/metrics", headers=bearer(TOKEN))).status_code == 401
        scraped = await http.get("/metrics", headers=bearer(METRICS_TOKEN))
        assert scraped.status_code == 200
        assert "mlxrelay_generation_tokens_total" in scraped.text
        api = await http.get("/api/metrics", headers=bearer(METRICS_TOKEN))
        assert api.status_code == 401

    async with serving(HTTPConfig(auth_token=TOKEN, metrics_open=True)) as (_, http):
        assert (await http.get("/metrics")).status_code == 200
        assert (await http.get("/api/metrics")).status_code == 401


async def test_websocket_requires_the_token() -> None:
    async with serving(HTTPConfig(auth_token=TOKEN)) as (dashboard, _):
        url = f"ws://127.0.0.1:{dashboard.port}/ws"
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(url):
                pass
        assert refused.value.response.status_code == 403
        with pytest.raises(websockets.InvalidStatus):
            async with websockets.connect(f"{url}?token=wrong"):
                pass
        async with websockets.connect(f"{url}?token={TOKEN}") as connection:
            assert '"type":"snapshot"' in await asyncio.wait_for(connection.recv(), 10)
        async with websockets.connect(url, additional_headers=bearer(TOKEN)) as connection:
            assert '"type":"snapshot"' in await asyncio.wait_for(connection.recv(), 10)


async def test_rate_limit_answers_429_with_retry_after() -> None:
    async with serving(HTTPConfig(rate_limit_per_minute=5)) as (_, http):
        statuses = [(await http.get("/api/health")).status_code for _ in range(5)]
        assert statuses == [200] * 5
        limited = await http.get("/api/stats")
        assert limited.status_code == 429
        # 5 a minute refills one request every 12 s.
        assert 1 <= int(limited.headers["retry-after"]) <= 12
        # Only /api/* is limited: Prometheus and the page keep working.
        assert (await http.get("/metrics")).status_code == 200
        assert (await http.get("/")).status_code == 200


async def test_cors_only_for_configured_origins() -> None:
    allowed = "http://grafana.example.test"
    async with serving(HTTPConfig(cors_origins=[allowed])) as (_, http):
        response = await http.get("/api/metrics", headers={"Origin": allowed})
        assert response.headers["access-control-allow-origin"] == allowed
        other = await http.get("/api/metrics", headers={"Origin": "http://evil.test"})
        assert "access-control-allow-origin" not in other.headers


def test_token_bucket_refills_at_the_configured_rate() -> None:
    now = [100.0]
    limiter = TokenBucketLimiter(60, burst=2, clock=lambda: now[0], max_clients=2)
    assert [limiter.acquire("a") for _ in range(2)] == [0.0, 0.0]
    assert limiter.acquire("a") == pytest.approx(1.0)  # one a second
    now[0] += 0.5
    assert limiter.acquire("a") == pytest.approx(0.5)
    assert limiter.acquire("b") == 0.0  # each client has its own bucket
    now[0] += 0.5
    assert limiter.acquire("a") == 0.0
    limiter.acquire("c")  # a third client evicts the least recently used bucket
    assert len(limiter._buckets) == 2


def test_token_comparison_and_exposure_rules() -> None:
    assert tokens_match(TOKEN, TOKEN)
    assert not tokens_match(TOKEN + "x", TOKEN)
    assert not tokens_match(None, TOKEN)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")
    assert exposure_warning("127.0.0.1", HTTPConfig()) is None
    assert exposure_warning("0.0.0.0", HTTPConfig(auth_token=TOKEN)) is None
    message = exposure_warning("0.0.0.0", HTTPConfig())
    assert message is not None and "no auth token" in message


async def test_a_non_loopback_bind_without_token_logs_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    collector = MetricsCollector("coordinator", 0.1, role="coordinator")
    dashboard = MonitoringDashboard(collector, None, host="0.0.0.0", port=0)
    with caplog.at_level("WARNING", logger="mlx_relay.core.http_access"):
        await dashboard.start()
    await dashboard.stop()
    assert any("binding 0.0.0.0 with no auth token" in r.message for r in caplog.records)


@contextlib.contextmanager
def cli_dashboard(args: list[str], env: dict[str, str]) -> Iterator[tuple[str, int]]:
    """``mlx-relay dashboard`` in a subprocess; yields its stderr so far and its port."""
    process = subprocess.Popen(
        [sys.executable, "-m", "mlx_relay.cli", "dashboard", "--port", "0", *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env={**env, "PYTHONUNBUFFERED": "1"},
        text=True,
    )
    try:
        assert process.stderr is not None
        seen = ""
        for line in process.stderr:
            seen += line
            found = re.search(r"dashboard on http://[^:]+:(\d+)/", line)
            if found:
                yield seen, int(found.group(1))
                break
        else:
            raise AssertionError(f"dashboard did not start:\n{seen}")
    finally:
        process.send_signal(signal.SIGINT)
        try:
            assert process.wait(timeout=15) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT shutdown of a subprocess is POSIX")
def test_cli_warns_on_open_bind_and_takes_the_token_from_the_environment() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MLX_RELAY_AUTH_TOKEN"}
    with cli_dashboard(["--host", "0.0.0.0"], env) as (stderr, port):
        assert "WARNING: binding 0.0.0.0 with no auth token" in stderr
        response = httpx.get(f"http://127.0.0.1:{port}/api/metrics", timeout=10)
        assert response.status_code == 200
        assert response.json()["device_id"] == "dashboard"

    with cli_dashboard([], {**env, "MLX_RELAY_AUTH_TOKEN": TOKEN}) as (stderr, port):
        assert "no auth token" not in stderr
        url = f"http://127.0.0.1:{port}/api/health"
        assert httpx.get(url, timeout=10).status_code == 401
        assert httpx.get(url, headers=bearer(TOKEN), timeout=10).status_code == 200


def test_one_set_of_access_rules_per_app() -> None:
    from fastapi import FastAPI

    from mlx_relay.core.http_access import install_access

    app = FastAPI()
    first = install_access(app, HTTPConfig(auth_token=TOKEN))
    assert install_access(app, HTTPConfig(auth_token=TOKEN)) is first
    with pytest.raises(ValueError, match="other HTTP settings"):
        install_access(app, HTTPConfig(auth_token="another"))
