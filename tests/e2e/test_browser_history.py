"""The dashboard after a coordinator restart, in a real headless Chromium: the charts reach
back into the history store, and the request log lists what ran before."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from tests.e2e.test_browser import CHROMIUM, CHROMIUM_ARGS, BrowserLog, pytestmark, require_chromium
from tests.support.history_cluster import (
    coordinator,
    history_workers,
    send_completions,
    with_token,
)

__all__ = ["pytestmark"]

# The tokens/s chart's data as the page holds it: [[time, value], ...].
TOKEN = "history-token"
CHART_POINTS = """() => {
  const chart = window.RelayDashboardCharts.tokens;
  return chart.times.map((t, i) => [t, chart.series[0].values[i]]);
}"""


def pre_restart(points: list[Any], stopped: float, half_step: float = 0.0) -> list[float]:
    """Values of the points (drawn at their bucket's middle) whose bucket began before the
    restart; after it no request ran, so a value above 0 is data from before."""
    return [v for t, v in points if t - half_step < stopped and v is not None]


async def test_after_a_restart_the_charts_show_what_came_before(
    tiny_model_dir: Path, tmp_path: Path, output_dir: Path
) -> None:
    require_chromium()
    from playwright.async_api import async_playwright

    async with history_workers(tiny_model_dir, tmp_path / "history.sqlite") as workers:
        # With a token: the page passes it on to every history request.
        config = with_token(workers, TOKEN)
        async with coordinator(config) as runtime:
            sent = await send_completions(runtime.url, 4, max_tokens=8, token=TOKEN)
            await asyncio.sleep(1.5)  # a few chart points with tokens/s > 0
        stopped = time.time()
        # Down for longer than two of the live view's 2.5 s backfill buckets, so that the
        # gap cannot hide inside the bucket that holds the last points before the stop.
        await asyncio.sleep(6.0)
        async with coordinator(config) as runtime, async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page(viewport={"width": 1440, "height": 1400})
                log = BrowserLog(page)
                await page.goto(f"{runtime.url}/?token={TOKEN}")
                await page.wait_for_function("() => document.body.dataset.historyReady === '1'")
                # Live view: the points from before the restart lead in, then a gap.
                await page.wait_for_function(
                    "() => Number(document.body.dataset.sequence || 0) >= 3", timeout=15_000
                )
                live = await page.evaluate(CHART_POINTS)
                assert max(pre_restart(live, stopped)) > 0
                assert any(v is None for t, v in live if t > stopped - 1)

                await page.click('#range-bar button[data-range="1h"]')
                await page.wait_for_function(
                    "() => document.body.dataset.historyRange === '1h'"
                    " && Number(document.body.dataset.historyPoints || 0) > 0"
                )
                hour = await page.evaluate(CHART_POINTS)
                assert len(hour) > 100
                assert hour[0][0] < time.time() - 3500  # the chart spans the hour
                step = 3600 / len(hour)
                assert max(pre_restart(hour, stopped, step / 2)) > 0
                # Nothing is made up for the time before the cluster ran.
                assert all(v is None for t, v in hour if t < stopped - 120)

                rows = page.locator("#requests tbody tr[data-request-id]")
                await rows.nth(len(sent) - 1).wait_for(timeout=10_000)
                shown = [await rows.nth(i).get_attribute("data-request-id") for i in range(4)]
                assert shown == list(reversed(sent))  # newest first
                await page.click('#requests th[data-sort="slowest|fastest"]')
                await page.select_option("#requests-status", "error")
                await page.wait_for_function(
                    "() => document.getElementById('requests').dataset.total === '0'"
                )
                await page.select_option("#requests-status", "ok")
                await page.wait_for_function(
                    "() => document.getElementById('requests').dataset.total === '4'"
                )
                await page.click('#range-bar button[data-range="15m"]')
                await page.wait_for_function(
                    "() => document.body.dataset.historyRange === '15m'"
                    " && Number(document.body.dataset.historyPoints || 0) > 0"
                )
                await page.screenshot(path=str(output_dir / "history.png"), full_page=True)
                assert log.errors == []
            finally:
                await browser.close()
