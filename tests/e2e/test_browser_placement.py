"""The placement panel in a real headless Chromium, on the coordinator's app over a live
2-worker cluster started with a skewed split: it shows the current split, a more balanced
proposal and the predicted gain that /api/placement reports."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import httpx
import pytest

from mlx_relay.server.placement import PlacementView
from tests.e2e.test_browser import CHROMIUM, CHROMIUM_ARGS, BrowserLog, require_chromium
from tests.integration.test_placement_api import wide_model_dir  # noqa: F401 (fixture)
from tests.support.placement_cluster import run_requests, skewed_cluster_app

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not sys.platform.startswith("linux"),
        reason="uses Debian's /usr/bin/chromium; other systems run the browser tests on CI",
    ),
]


async def test_panel_shows_current_and_proposed_split_with_the_gain(
    wide_model_dir: Path,  # noqa: F811
    output_dir: Path,
) -> None:
    require_chromium()
    from playwright.async_api import async_playwright

    async with (
        skewed_cluster_app(wide_model_dir) as (cluster, server),
        async_playwright() as playwright,
    ):
        await run_requests(cluster)
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1440, "height": 900})
            log = BrowserLog(page)
            await page.goto(server.url)
            # Locators, not a predicate string: the page's CSP forbids eval once it polls.
            note = page.locator("#placement-note", has_text="live stage timings")
            await note.wait_for(timeout=30_000)
            await page.screenshot(path=str(output_dir / "placement.png"), full_page=True)
            current = await page.locator("tr.placement-current .placement-split").inner_text()
            proposed = await page.locator("tr.placement-proposed .placement-split").inner_text()
            gain = await page.locator("#placement-gain").inner_text()
            async with httpx.AsyncClient(base_url=server.url) as http:
                view = PlacementView.model_validate((await http.get("/api/placement")).json())
            assert view.proposed is not None and view.predicted_gain_ratio is not None
            assert "worker-0 [0, 3)" in current and "worker-1 [3, 4)" in current
            expected = " · ".join(
                f"{s.device_id} [{s.layer_start}, {s.layer_end})" for s in view.proposed.stages
            )
            assert proposed == expected
            assert view.proposed.stages[0].layer_end < 3
            assert gain.startswith("+") and gain.endswith("%")
            assert log.errors == []
        finally:
            await browser.close()


async def test_apply_moves_the_workers_to_the_proposal_behind_the_token(
    wide_model_dir: Path,  # noqa: F811
    output_dir: Path,
) -> None:
    require_chromium()
    from playwright.async_api import async_playwright

    token = "placement-secret"
    async with (
        skewed_cluster_app(wide_model_dir, http={"auth_token": token}) as (cluster, server),
        async_playwright() as playwright,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        refused = await http.post("/api/placement/apply", json={})
        assert refused.status_code == 401  # the action stays behind the app's token
        await run_requests(cluster)
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1440, "height": 900})
            log = BrowserLog(page)
            await page.goto(f"{server.url}/?token={token}")
            await page.locator("#placement-note", has_text="live stage timings").wait_for(
                timeout=30_000
            )
            await page.locator("#placement-apply:enabled").wait_for(timeout=30_000)
            proposed = await page.locator("tr.placement-proposed .placement-split").inner_text()
            await page.click("#placement-apply")
            applied = page.locator("#placement-apply-status", has_text=re.compile("^applied "))
            await applied.wait_for(timeout=60_000)
            status = await page.locator("#placement-apply-status").inner_text()
            await page.screenshot(path=str(output_dir / "placement-applied.png"), full_page=True)
            moved = [(w.layer_range.start, w.layer_range.end) for w in cluster.workers]
            assert moved != [(0, 3), (3, 4)]
            assert proposed == " · ".join(
                f"worker-{i} [{a}, {b})" for i, (a, b) in enumerate(moved)
            )
            assert status.startswith(
                "applied " + " / ".join(f"[{a}, {b})" for a, b in moved) + " in "
            )
            current = page.locator("tr.placement-current .placement-split", has_text=proposed)
            await current.wait_for(timeout=30_000)
            assert await page.locator("#placement-apply").is_disabled()
            assert log.errors == []
        finally:
            await browser.close()
