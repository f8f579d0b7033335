"""A request's waterfall in a real headless Chromium, over a live 2-worker cluster: opened
from the request table, one lane per stage and link, the time attribution bar, the Chrome
trace download, the message for a request whose trace was never kept, and the summary of
one whose spans are no longer kept."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import httpx

from mlx_relay.core.tracing_config import TracingConfig
from mlx_relay.server.runtime import CoordinatorRuntime
from tests.e2e.test_browser import CHROMIUM, CHROMIUM_ARGS, BrowserLog, pytestmark, require_chromium
from tests.support.history_cluster import coordinator, history_workers, send_completions, with_token

__all__ = ["pytestmark"]

TOKEN = "waterfall-token"
# Each part of the attribution bar: [key, seconds, drawn width in px]; and the bar's width.
BAR_PARTS = """() => [...document.querySelectorAll('#waterfall-attribution .attribution-bar .part')]
  .map((p) => [p.dataset.part, Number(p.dataset.seconds), p.getBoundingClientRect().width])"""
BAR_WIDTH = "() => document.querySelector('#waterfall-attribution .attribution-bar').clientWidth"


async def flush_history(runtime: CoordinatorRuntime) -> None:
    """The request log has every request sent so far (the page reads it at load)."""
    services = runtime.services
    assert services is not None and services.history is not None
    assert await asyncio.to_thread(services.history.store.flush)


async def open_row(page: Any, request_id: str, state: str) -> None:
    row = page.locator(f'#requests tbody tr[data-request-id="{request_id}"]')
    await row.wait_for(timeout=15_000)
    await row.click()
    await page.wait_for_function(
        "([id, state]) => { const w = document.getElementById('waterfall');"
        " return w.dataset.requestId === id && w.dataset.state === state; }",
        arg=[request_id, state],
        timeout=15_000,
    )


async def test_a_row_opens_its_waterfall_with_the_attribution_and_chrome_trace(
    tiny_model_dir: Path, tmp_path: Path, output_dir: Path
) -> None:
    require_chromium()
    from playwright.async_api import async_playwright

    async with history_workers(tiny_model_dir, tmp_path / "history.sqlite") as workers:
        config = with_token(workers, TOKEN)
        async with coordinator(config) as runtime, async_playwright() as playwright:
            first, second = await send_completions(runtime.url, 2, max_tokens=6, token=TOKEN)
            await flush_history(runtime)
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with httpx.AsyncClient(base_url=runtime.url, headers=headers) as http:
                trace = (await http.get(f"/api/requests/{first}/trace")).json()
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page(
                    viewport={"width": 1440, "height": 1400}, accept_downloads=True
                )
                log = BrowserLog(page)
                await page.goto(f"{runtime.url}/?token={TOKEN}")
                await page.wait_for_function("() => document.body.dataset.historyReady === '1'")
                await open_row(page, first, "ready")
                assert await page.text_content("#waterfall-id") == first

                # One lane per stage and per link, in pipeline order, as the trace names them.
                lanes = page.locator("#waterfall-lanes .lane[data-lane]")
                shown = [
                    await lanes.nth(i).get_attribute("data-lane")
                    for i in range(await lanes.count())
                ]
                assert shown == trace["lanes"]
                assert shown == [
                    "coordinator",
                    "link coordinator → worker-0",
                    "stage 0 · worker-0",
                    "link worker-0 → worker-1",
                    "stage 1 · worker-1",
                ]
                bars = page.locator("#waterfall-lanes .span")
                assert await bars.count() == len(trace["spans"])
                for lane in shown[1:]:
                    kind = "compute" if lane.startswith("stage") else "network"
                    in_lane = page.locator(
                        f'#waterfall-lanes .lane[data-lane="{lane}"] .span-{kind}'
                    )
                    assert await in_lane.count() >= 6, lane  # prefill and every decode step
                # Hover: the span's name and duration.
                last_stage = page.locator('#waterfall-lanes .lane[data-lane="stage 1 · worker-1"]')
                compute = last_stage.locator('.span[data-name="compute"]').first
                await compute.hover()
                hover = await page.text_content("#waterfall-hover") or ""
                assert hover.startswith("compute · ") and "stage 1 · worker-1" in hover, hover
                assert any(unit in hover for unit in ("µs", "ms")), hover

                # The attribution bar: every part, summing to the shown end-to-end time.
                parts = await page.evaluate(BAR_PARTS)
                assert [key for key, _, _ in parts] == [
                    "queue",
                    "coordinator",
                    "compute worker-0",
                    "compute worker-1",
                    "network coordinator → worker-0",
                    "network worker-0 → worker-1",
                    "bubble",
                ]
                e2e_text = page.locator("#waterfall-attribution .attribution-e2e")
                e2e = float(await e2e_text.get_attribute("data-seconds") or "nan")
                assert e2e == trace["attribution"]["e2e_s"] == trace["duration_s"]
                assert e2e > 0
                assert abs(sum(s for _, s, _ in parts) - e2e) <= 0.02 * e2e
                # Drawn: the parts fill the bar (each as wide as its share of e2e).
                width = await page.evaluate(BAR_WIDTH)
                assert abs(sum(w for _, _, w in parts) - width) <= 0.02 * width + 1
                compute_s = trace["attribution"]["compute_s"]["worker-1"]
                legend = page.locator(
                    '#waterfall-attribution .legend-item[data-part="compute worker-1"]'
                )
                share = await legend.locator(".legend-share").text_content() or ""
                assert share.endswith(" %") and abs(float(share[:-2]) - 100 * compute_s / e2e) < 1

                # The Chrome trace download (through the token header): valid trace events.
                async with page.expect_download() as info:
                    await page.click("#waterfall-download")
                download = await info.value
                assert download.suggested_filename == f"trace-{first}.json"
                chrome = json.loads(Path(await download.path()).read_text())
                events = chrome["traceEvents"]
                threads = [e["args"]["name"] for e in events if e["name"] == "thread_name"]
                assert threads == trace["lanes"]
                complete = [e for e in events if e["ph"] == "X"]
                assert len(complete) == len(trace["spans"])
                assert all(e["ts"] >= 0 and e["dur"] >= 0 for e in complete)
                assert chrome["otherData"]["request_id"] == first

                # Another row replaces the waterfall; the per-token profile covers both.
                await open_row(page, second, "ready")
                assert (
                    await page.locator("#requests tr.selected").get_attribute("data-request-id")
                    == second
                )
                await page.wait_for_function(
                    "() => document.getElementById('profile-panel').dataset.requests === '2'",
                    timeout=15_000,
                )
                profile_parts = page.locator("#profile-attribution .attribution-bar .part")
                assert await profile_parts.count() == len(parts)
                await page.screenshot(path=str(output_dir / "dashboard.png"), full_page=True)
                for panel in ("requests", "profile"):
                    await page.locator(f"#{panel}-panel").screenshot(
                        path=str(output_dir / f"{panel}-panel.png")
                    )
                await page.click("#waterfall-close")
                assert await page.locator("#waterfall").is_hidden()
                assert log.errors == []
            finally:
                await browser.close()


async def test_a_request_without_a_stored_trace_says_so(
    tiny_model_dir: Path, tmp_path: Path, output_dir: Path
) -> None:
    require_chromium()
    from playwright.async_api import async_playwright

    async with (
        history_workers(tiny_model_dir, tmp_path / "history.sqlite") as workers,
        async_playwright() as playwright,
    ):
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(
                viewport={"width": 1440, "height": 1200}, accept_downloads=True
            )
            log = BrowserLog(page)
            # Tracing off: the request log keeps the request, and its row says why there is
            # no waterfall.
            untraced = workers.model_copy(update={"tracing": TracingConfig(enabled=False)})
            async with coordinator(untraced) as runtime:
                (before,) = await send_completions(runtime.url, 1)
                await flush_history(runtime)
                await page.goto(f"{runtime.url}/")
                await page.wait_for_function("() => document.body.dataset.historyReady === '1'")
                assert await page.locator("#profile-panel").is_hidden()
                await open_row(page, before, "missing")
                message = await page.text_content("#waterfall-message") or ""
                assert message.startswith("No stored trace: tracing is off"), message
                await page.goto("about:blank")  # before the coordinator stops under it
            # Tracing on, keeping one trace: the earlier request has no trace anywhere, and the
            # API's 404 says so; of the two served now, the older keeps only its summary.
            one_trace = workers.model_copy(update={"tracing": TracingConfig(max_traces=1)})
            async with coordinator(one_trace) as runtime:
                archived, after = await send_completions(runtime.url, 2)
                await flush_history(runtime)
                await page.goto(f"{runtime.url}/")
                await page.wait_for_function("() => document.body.dataset.historyReady === '1'")
                await open_row(page, before, "missing")
                message = await page.text_content("#waterfall-message") or ""
                assert message.startswith(f"No stored trace: no trace of request '{before}'"), (
                    message
                )
                assert await page.locator("#waterfall-lanes .lane").count() == 0
                assert await page.locator("#waterfall-attribution .part").count() == 0
                assert await page.locator("#waterfall-download").is_hidden()
                await page.locator("#requests-panel").screenshot(
                    path=str(output_dir / "no-trace.png")
                )
                # Archived: its attribution from the history store, its lanes, no spans.
                await open_row(page, archived, "summary")
                message = await page.text_content("#waterfall-message") or ""
                assert message.startswith("its spans are no longer kept"), message
                assert await page.locator("#waterfall-lanes .lane[data-lane]").count() == 5
                assert await page.locator("#waterfall-lanes .span").count() == 0
                parts = page.locator("#waterfall-attribution .attribution-bar .part")
                assert await parts.count() == 7
                # The newest request has its whole waterfall.
                await open_row(page, after, "ready")
                assert await page.locator("#waterfall-lanes .lane[data-kind=stage]").count() == 2
                shown = await page.text_content("#waterfall-message") or ""
                assert re.fullmatch(r"\d+ spans on 5 lanes", shown), shown
                # Without a token the download is the plain ?format=chrome link.
                async with page.expect_download() as info:
                    await page.click("#waterfall-download")
                chrome = json.loads(Path(await (await info.value).path()).read_text())
                assert chrome["otherData"]["request_id"] == after
            # A 404 from the API is an answer the page shows; the browser itself reports the
            # failed fetch on the console, nothing else may be there.
            unexpected = [e for e in log.errors if "404" not in e]
            assert unexpected == []
        finally:
            await browser.close()
