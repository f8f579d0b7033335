"""Alerts on the dashboard in a real headless Chromium: a worker process is killed, its
StageDown alert shows in the banner and the panel, and goes when the worker is back."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from mlx_relay.monitoring.dashboard import MonitoringDashboard
from tests.e2e.test_browser import CHROMIUM, CHROMIUM_ARGS, BrowserLog, require_chromium
from tests.support.alerting import engine_for, monitored_process_cluster, with_alerting
from tests.support.dashboard_cluster import wait_for

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not sys.platform.startswith("linux"),
        reason="uses Debian's /usr/bin/chromium; other systems run the browser tests on CI",
    ),
]

# Long next to the page's update interval, so "within one evaluation" has room on a busy machine.
EVALUATION_INTERVAL = 3.0
UPDATE_INTERVAL = 0.25


async def test_a_firing_alert_shows_within_one_evaluation_and_goes_when_resolved(
    tiny_model_dir: Path, tmp_path: Path, output_dir: Path
) -> None:
    require_chromium()
    from playwright.async_api import async_playwright

    async with (
        monitored_process_cluster(tiny_model_dir, tmp_path) as cluster,
        async_playwright() as playwright,
    ):
        config = with_alerting(
            cluster,
            evaluation_interval=EVALUATION_INTERVAL,
            thresholds={"stage_down_seconds": 0},
        )
        engine = engine_for(cluster, config)
        collector = cluster.orchestrator.metrics_collector
        assert collector is not None
        await engine.start()
        dashboard = MonitoringDashboard(
            collector,
            cluster.orchestrator.health_monitor,
            port=0,
            update_interval=UPDATE_INTERVAL,
            alerts=engine,
        )
        await dashboard.start()
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1440, "height": 900})
            log = BrowserLog(page)
            await page.goto(dashboard.url)
            await page.wait_for_function(
                "document.querySelector('#alerts-note').textContent.includes('rules')",
                timeout=15_000,
            )
            banner = page.locator("#alert-banner")
            assert await banner.is_hidden()
            assert await page.locator('#alerts tr[data-alertname="StageDown"]').count() == 0

            cluster.processes[1].kill()
            item = banner.locator('[data-alertname="StageDown"]')
            await item.wait_for(state="visible", timeout=60_000)
            seen_at = time.time()
            (firing,) = [a for a in engine.view().firing if a.alertname == "StageDown"]
            assert firing.fired_at is not None
            assert seen_at - firing.fired_at < EVALUATION_INTERVAL
            assert await item.text_content() == "Device worker-1 is down"
            assert "alert-banner-critical" in (await banner.get_attribute("class") or "")
            row = page.locator('#alerts tr.alert-firing[data-alertname="StageDown"]')
            assert "Device worker-1 is down" in (await row.text_content() or "")
            await page.screenshot(path=str(output_dir / "alert-firing.png"), full_page=True)

            cluster.processes[1].start()
            await cluster.processes[1].wait_serving(cluster.config)
            await item.wait_for(state="detached", timeout=60_000)
            gone_at = time.time()
            resolved = await wait_for(
                lambda: [a for a in engine.view().resolved if a.alertname == "StageDown"],
                what="the resolved alert",
            )
            assert resolved[0].resolved_at is not None
            assert gone_at - resolved[0].resolved_at < EVALUATION_INTERVAL
            assert await banner.is_hidden()
            resolved_row = page.locator('#alerts tr.alert-resolved[data-alertname="StageDown"]')
            await resolved_row.wait_for(timeout=10_000)
            await page.screenshot(path=str(output_dir / "alert-resolved.png"), full_page=True)
            assert [e for e in log.errors if "WebSocket connection" not in e] == []
        finally:
            await browser.close()
            await dashboard.stop()
            await engine.stop()
