"""Security defaults on a real server: tokens, /metrics access, rate limit, CORS, exposure."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import websockets

from mlx_relay.core.addresses import is_loopback
from mlx_relay.core.config import HTTPConfig
from mlx_relay.core.errors import ConfigError
from mlx_relay.core.http_access import TokenBucketLimiter, exposure_warning, tokens_match
from mlx_relay.core.http_server import HTTPServer
from mlx_relay.core.log_redaction import redact
from mlx_relay.monitoring.dashboard import MonitoringDashboard, build_dashboard_app
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
        # ?token= only for the page (a browser link); /api/* and /metrics want the header.
        assert (await http.get("/", params={"token": TOKEN})).status_code == 200
        for path in ("/api/metrics", "/api/stats", "/metrics"):
            assert (await http.get(path, params={"token": TOKEN})).status_code == 401, path
        # Scripts and styles hold no data: the page can load them without a header.
        assert (await http.get("/static/dashboard.css")).status_code == 200
        page = await http.get("/", params={"token": TOKEN})
        assert page.headers["referrer-policy"] == "no-referrer"
        assert TOKEN not in page.text


async def test_a_token_guards_the_schema_and_its_pages() -> None:
    async with serving(HTTPConfig()) as (_, http):
        for path in ("/openapi.json", "/docs", "/redoc"):
            assert (await http.get(path)).status_code == 200, path
    async with serving(HTTPConfig(auth_token=TOKEN)) as (_, http):
        for path in ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"):
            refused = await http.get(path)
            assert refused.status_code == 401, path
            assert refused.headers["www-authenticate"].startswith("Bearer")
            assert (await http.get(path, params={"token": TOKEN})).status_code == 401, path
            assert (await http.get(path, headers=bearer("wrong"))).status_code == 401, path
            assert (await http.get(path, headers=bearer(TOKEN))).status_code == 200, path
        assert (
            "/api/metrics"
            in (await http.get("/openapi.json", headers=bearer(TOKEN))).json()["paths"]
        )


async def test_no_token_in_any_log_line(caplog: pytest.LogCaptureFixture) -> None:
    """Every request line is logged (access log on, debug level); none shows the token,
    whether it came in the query string, the Authorization header or a WebSocket URL."""
    collector = MetricsCollector("coordinator", 0.1, role="coordinator")
    app, _ = build_dashboard_app(collector, None, HTTPConfig(auth_token=TOKEN), update_interval=0.1)
    server = HTTPServer(app, "127.0.0.1", 0, log_level="debug", access_log=True)
    with caplog.at_level(logging.DEBUG):
        await server.start()
        try:
            async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
                assert (await http.get("/", params={"token": TOKEN})).status_code == 200
                assert (await http.get("/api/metrics", headers=bearer(TOKEN))).status_code == 200
                assert (await http.get("/api/metrics", params={"token": TOKEN})).status_code == 401
            url = server.url.replace("http://", "ws://") + f"/ws?token={TOKEN}"
            async with websockets.connect(url) as connection:
                await connection.recv()
        finally:
            await server.stop()
    # The server's lines: the test's own clients (httpx, websockets) log what they send.
    client_loggers = ("httpx", "httpcore", "websockets.client")
    lines = [r.getMessage() for r in caplog.records if not r.name.startswith(client_loggers)]
    assert not [line for line in lines if TOKEN in line]
    # The request lines were logged, with the token masked (the test saw what it checks).
    assert any("GET /?token=[redacted]" in line for line in lines), lines
    assert any("/ws?token=[redacted]" in line for line in lines), lines
    assert any("GET /api/metrics HTTP" in line for line in lines), lines


def test_redaction_masks_query_tokens_and_bearer_credentials() -> None:
    assert redact("GET /?token=abc&x=1 HTTP/1.1") == "GET /?token=[redacted]&x=1 HTTP/1.1"
    assert redact("GET /ws?a=1&token=abc") == "GET /ws?a=1&token=[redacted]"
    assert redact("authorization: Bearer abc.def") == "authorization: Bearer [redacted]"
    assert redact("tokens=3 max_tokens=4") == "tokens=3 max_tokens=4"


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


async def test_websocket_clients_past_the_cap_are_closed_with_1013() -> None:
    async with serving(HTTPConfig(max_websocket_clients=2)) as (dashboard, _):
        url = f"ws://127.0.0.1:{dashboard.port}/ws"
        async with websockets.connect(url) as first, websockets.connect(url) as second:
            for connection in (first, second):
                assert '"type":"snapshot"' in await asyncio.wait_for(connection.recv(), 10)
            async with websockets.connect(url) as third:
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await asyncio.wait_for(third.recv(), 10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
            assert len(dashboard.context.broadcaster.clients()) == 2
        # Once the clients left, new ones are served again.
        for _ in range(500):
            if not dashboard.context.broadcaster.clients():
                break
            await asyncio.sleep(0.01)
        async with websockets.connect(url) as fourth, websockets.connect(url) as fifth:
            for connection in (fourth, fifth):
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


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT shutdown of a subprocess is POSIX")
def test_cli_reads_the_token_from_a_file(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "MLX_RELAY_AUTH_TOKEN"}
    with cli_dashboard(["--token-file", str(token_file)], env) as (stderr, port):
        assert TOKEN not in stderr
        url = f"http://127.0.0.1:{port}/api/health"
        assert httpx.get(url, timeout=10).status_code == 401
        assert httpx.get(url, headers=bearer(TOKEN), timeout=10).status_code == 200


@pytest.mark.parametrize("name", ["up", "coordinator", "dashboard", "chat"])
def test_every_command_that_takes_a_token_takes_a_token_file(name: str, tmp_path: Path) -> None:
    from mlx_relay.cli import build_parser
    from mlx_relay.cli.options import given_token

    parser = build_parser()
    command = [name, "--config", "c.yaml"] if name == "coordinator" else [name]
    token_file = tmp_path / "token"
    token_file.write_text(f"  {TOKEN}  \nignored\n", encoding="utf-8")
    args = parser.parse_args([*command, "--token-file", str(token_file)])
    assert given_token(args) == TOKEN
    assert given_token(parser.parse_args([*command, "--token", "t"])) == "t"
    with pytest.raises(SystemExit):  # one or the other
        parser.parse_args([*command, "--token", "t", "--token-file", str(token_file)])
    empty = tmp_path / "empty"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"--token-file .*empty: expected a token"):
        given_token(parser.parse_args([*command, "--token-file", str(empty)]))
    with pytest.raises(ConfigError, match=r"--token-file .*missing: cannot read"):
        given_token(parser.parse_args([*command, "--token-file", str(tmp_path / "missing")]))


def test_one_set_of_access_rules_per_app() -> None:
    from fastapi import FastAPI

    from mlx_relay.core.http_access import install_access

    app = FastAPI()
    first = install_access(app, HTTPConfig(auth_token=TOKEN))
    assert install_access(app, HTTPConfig(auth_token=TOKEN)) is first
    with pytest.raises(ValueError, match="other HTTP settings"):
        install_access(app, HTTPConfig(auth_token="another"))
