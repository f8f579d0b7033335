"""The dashboard page in a real headless Chromium, over a live 2-worker cluster."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from mlx_relay.coordinator.requests import InferenceRequest
from mlx_relay.core.blas import default_threads, loaded_blas
from mlx_relay.core.config import HTTPConfig
from mlx_relay.monitoring.dashboard import MonitoringDashboard
from mlx_relay.monitoring.metrics import MetricsCollector
from tests.support.dashboard_cluster import DashboardEnv, dashboard_cluster, run_requests

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not sys.platform.startswith("linux"),
        reason="uses Debian's /usr/bin/chromium; other systems run the browser tests on CI",
    ),
]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TOKEN = "browser-token"


def require_chromium() -> None:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} not found: install it with `make system-packages` "
            "(or `sudo apt-get install -y chromium`); never `playwright install`."
        )


async def run_concurrent(env: DashboardEnv, count: int, max_tokens: int) -> None:
    """``count`` requests at once through the pipeline, so that they batch."""
    orchestrator = env.cluster.orchestrator
    await asyncio.gather(
        *(
            orchestrator.process_request(
                InferenceRequest(prompt=f"concurrent {i}", max_tokens=max_tokens)
            )
            for i in range(count)
        )
    )


class BrowserLog:
    """Console errors and uncaught page errors seen by a page."""

    def __init__(self, page: Any) -> None:
        self.errors: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))

    def _console(self, message: Any) -> None:
        if message.type == "error":
            self.errors.append(f"console: {message.text}")


async def test_dashboard_shows_the_cluster_and_live_request_count(
    tiny_model_dir: Path, output_dir: Path
) -> None:
    require_chromium()
    from playwright.async_api import async_playwright

    config = HTTPConfig(auth_token=TOKEN)
    async with (
        dashboard_cluster(tiny_model_dir, config=config, update_interval=0.25) as env,
        async_playwright() as playwright,
    ):
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1440, "height": 900})
            log = BrowserLog(page)
            # The token travels in the query string: the page must pass it on to /ws.
            await page.goto(f"{env.url}/?token={TOKEN}")
            cards = page.locator("#devices [data-device-id]")
            await cards.nth(2).wait_for(timeout=15_000)
            ids = [await cards.nth(i).get_attribute("data-device-id") for i in range(3)]
            assert ids == ["coordinator", "worker-0", "worker-1"]
            assert await cards.count() == 3
            assert await page.locator("#devices .arrow").count() == 2
            assert await page.text_content("#total-requests") == "0"
            worker_card = page.locator('#devices [data-device-id="worker-1"]')
            assert "layers 2\u20133" in (await worker_card.text_content() or "")
            # How the stage computes (the tiny model is dense float32; workers in this process).
            library = loaded_blas()
            blas = library.name if library is not None and library.path is not None else "bundled"
            # The threads of a step computing alone: all the host's cores.
            threads = default_threads(1) if blas != "bundled" else 0
            engine = worker_card.locator(".row.engine .row-value")
            assert (
                await engine.text_content()
                == f"cpu \u00b7 float32 \u00b7 BLAS {blas} \u00d7 {threads}"
            )
            # Workers not supervised by `mlx-relay up` have no restart count; one that is shows it.
            restarts = worker_card.locator(".row.restarts")
            assert await restarts.is_hidden()
            env.collector.set_worker_restarts("worker-1", 2)
            await restarts.wait_for(state="visible", timeout=15_000)
            assert await restarts.locator(".row-value").text_content() == "2"

            generated = await run_requests(env, 3, max_tokens=4)
            await page.wait_for_function(
                "() => document.getElementById('total-requests').textContent === '3'",
                timeout=15_000,
            )
            await page.wait_for_function(
                f"() => document.getElementById('total-tokens').textContent === '{generated}'",
                timeout=15_000,
            )
            # Stage compute arrives with the next poll of the workers after the requests.
            await page.locator("#stages .stage.bottleneck").wait_for(timeout=15_000)
            assert await page.locator("#stages .stage").count() == 2
            assert await page.locator("#stages .stage.bottleneck").count() == 1
            # The links the pipeline really uses: coordinator -> worker-0 (token ids) and
            # worker-0 -> worker-1 (hidden states, reported by worker-0); the coordinator's
            # link to worker-1 carries only its poll.
            relayed = page.locator("#links tbody tr", has_text="worker-0 → worker-1")
            await relayed.wait_for(timeout=15_000)
            sent = await relayed.locator('[data-column="sent"]').text_content()
            assert sent and not sent.startswith("0 "), sent
            assert await page.locator("#links tbody tr").count() == 3
            for link in ("coordinator→worker-0", "worker-0→worker-1"):
                arrow = page.locator(f'#devices .arrow[data-link="{link}"]')
                await page.wait_for_function(
                    "(selector) => document.querySelector(selector).classList.contains('carries')",
                    arg=f'#devices .arrow[data-link="{link}"]',
                    timeout=15_000,
                )
                assert "sent" in (await arrow.get_attribute("title") or "")
            assert await page.text_content("#connection-state") == "live"
            assert await page.locator("#connection-banner").is_hidden()
            # Concurrent requests share each Forward: every stage shows a batch size above 1.
            await run_concurrent(env, 8, max_tokens=16)
            for device_id in ("worker-0", "worker-1"):
                field = f'#stages .stage[data-device-id="{device_id}"] [data-field="batch-size"]'
                await page.wait_for_function(
                    "(selector) => { const node = document.querySelector(selector);"
                    " const m = node && node.textContent.match(/^batch ([0-9.]+) mean/);"
                    " return m !== null && Number(m[1]) > 1; }",
                    arg=field,
                    timeout=15_000,
                )
                text = await page.text_content(field) or ""
                assert re.fullmatch(r"batch \d+\.\d mean · \d+ last", text), text
                occupancy = page.locator(f'#stages .stage[data-device-id="{device_id}"]')
                in_flight = await occupancy.locator('[data-field="in-flight"]').text_content()
                assert re.fullmatch(r"\d+ in flight", in_flight or ""), in_flight
                bubble = await occupancy.locator('[data-field="bubble"]').text_content()
                assert re.fullmatch(r"bubble [0-9.]+ %", bubble or ""), bubble
            # Let the charts draw a few points of history before the picture is taken.
            await page.wait_for_function(
                "() => Number(document.body.dataset.sequence || 0) >= 8", timeout=15_000
            )
            await page.screenshot(path=str(output_dir / "dashboard.png"), full_page=True)
            assert log.errors == []
        finally:
            await browser.close()


async def test_banner_shows_while_disconnected_and_the_page_reconnects(output_dir: Path) -> None:
    require_chromium()
    from playwright.async_api import async_playwright

    collector = MetricsCollector("coordinator", 0.1, role="coordinator")
    dashboard = MonitoringDashboard(collector, None, port=0, update_interval=0.1)
    await dashboard.start()
    port = dashboard.port
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            log = BrowserLog(page)
            await page.goto(f"{dashboard.url}/")
            await page.wait_for_function(
                "() => document.getElementById('connection-state').textContent === 'live'"
            )
            await dashboard.stop()
            banner = page.locator("#connection-banner")
            await banner.wait_for(state="visible", timeout=10_000)
            assert "disconnected — retrying" in (await banner.text_content() or "")
            await page.screenshot(path=str(output_dir / "disconnected.png"))

            with collector.track_request(prompt_tokens=1) as trace:
                trace.token()
            dashboard = MonitoringDashboard(collector, None, port=port, update_interval=0.1)
            await dashboard.start()
            await banner.wait_for(state="hidden", timeout=20_000)
            await page.wait_for_function(
                "() => document.getElementById('total-requests').textContent === '1'"
            )
            # Failed reconnection attempts are the only errors the browser may report.
            unexpected = [e for e in log.errors if "WebSocket connection" not in e]
            assert unexpected == []
        finally:
            await browser.close()
            await dashboard.stop()
