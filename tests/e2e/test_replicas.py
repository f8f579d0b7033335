"""Replica stages under ``mlx-relay up --replicas 2``: one replica of a stage is killed for
good (never restarted) while requests run; every request still completes with one
process's greedy tokens (those on the lost replica move to the live one and are replayed),
``/health`` stays 200 with the replica listed as degraded, and ``/api/health`` shows the
stage degraded (WARNING), not down, and so does the dashboard in a real Chromium."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from playwright.async_api import async_playwright

from tests.e2e.test_browser import CHROMIUM, CHROMIUM_ARGS, require_chromium
from tests.integration.test_chaos import Outcome, recovery_seconds, stream_completion
from tests.integration.test_up_cli import reap, stop, wait_healthy
from tests.integration.test_up_supervision import start_up, worker_processes
from tests.support.cluster import cluster_dict, free_ports
from tests.support.reference import cached_tokenizer, reference_tokens

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not sys.platform.startswith("linux"),
        reason="uses Debian's /usr/bin/chromium; other systems run the browser tests on CI",
    ),
]

MAX_TOKENS = 48
REQUESTS = 16
PROMPTS = ["Each worker holds a contiguous range", "The quick brown fox", "Hello", "Once"]


def wait_until(condition: object, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


async def load_with_a_kill(
    url: str, model: str, prompts: list[list[int]], up: psutil.Process, victim: str
) -> list:
    outcomes = [Outcome() for _ in range(REQUESTS)]
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(300.0)) as http:
        tasks = [
            asyncio.create_task(
                stream_completion(http, model, prompts[i % len(prompts)], MAX_TOKENS, outcomes[i])
            )
            for i in range(REQUESTS)
        ]
        # Every request has its first token and none is done: all are spread over the
        # replicas and running when the victim dies.
        deadline = time.monotonic() + 60.0
        while not all(o.tokens for o in outcomes):
            assert time.monotonic() < deadline, "the requests did not all start"
            assert not any(t.done() for t in tasks), "a request ended before all started"
            await asyncio.sleep(0.01)
        assert not any(o.finish_reason for o in outcomes)
        worker_processes(up)[victim].send_signal(signal.SIGKILL)
        return list(await asyncio.gather(*tasks))


def test_up_with_replicas_loses_a_replica_for_good_and_every_request_completes(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    require_chromium()
    port = free_ports(1)[0]
    url = f"http://127.0.0.1:{port}"
    data = cluster_dict(
        tiny_model_dir,
        2,
        ports=free_ports(2),
        network={"request_timeout": 10.0, "ping_timeout": 1.0},
        monitoring={"poll_interval": 0.5},
        inference={"max_running_requests": REQUESTS},
    )
    data["supervision"] = {"max_restarts": 0}  # a worker that exits stays down
    tokenizer = cached_tokenizer(tiny_model_dir)
    prompts = [list(tokenizer.encode(p)) for p in PROMPTS]
    expected = [
        [tokenizer.decode([t.token_id]) for t in reference_tokens(tiny_model_dir, ids, MAX_TOKENS)]
        for ids in prompts
    ]
    _, log, up = start_up(data, tmp_path, port, ["--replicas", "2"])
    try:
        health = wait_healthy(up, url, log)
        assert [(s["device_id"], s["stage"]) for s in health["stages"]] == [
            ("worker-0", 0),
            ("worker-0-r1", 0),
            ("worker-1", 1),
            ("worker-1-r1", 1),
        ]
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        outcomes = asyncio.run(
            load_with_a_kill(url, model, prompts, psutil.Process(up.pid), "worker-1")
        )
        for i, outcome in enumerate(outcomes):
            assert outcome.status == 200, (i, outcome)
            assert outcome.tokens == expected[i % len(prompts)], f"request {i} differs"

        def degraded() -> bool:
            body = httpx.get(f"{url}/health", timeout=10.0)
            return body.status_code == 200 and body.json()["degraded"] == ["worker-1"]

        wait_until(degraded, "/health 200 with worker-1 degraded")
        check = httpx.get(f"{url}/api/health", timeout=10.0).json()["checks"]
        peers = check["distributed_health"]
        assert peers["status"] == "warning", peers
        assert "stage 1 degraded (worker-1 unreachable)" in peers["message"]
        assert peers["details"]["stages"]["1"]["status"] == "degraded"
        assert peers["details"]["stages"]["0"]["status"] == "healthy"
        # The cluster goes on: new requests take the live replica.
        again = asyncio.run(load_without_kill(url, model, prompts[0]))
        assert again.status == 200 and again.tokens == expected[0]
        output = log.read_text()
        assert "stage 1 goes on with its other replicas" in output
        # The requests on worker-1 moved to the live replica and were replayed there.
        assert "worker-1 failed: its requests move to" in output
        assert "worker-1-r1" in output.split("its requests move to", 1)[1].splitlines()[0]
        count, _ = recovery_seconds(httpx.get(f"{url}/metrics", timeout=10.0).text)
        assert count >= 1
        asyncio.run(dashboard_shows_stage_1_degraded(url))
        assert stop(up, signal.SIGINT, log) == 0
    finally:
        reap(up)


async def load_without_kill(url: str, model: str, prompt: list[int]) -> object:
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(120.0)) as http:
        return await stream_completion(http, model, prompt, MAX_TOKENS)


async def dashboard_shows_stage_1_degraded(url: str) -> None:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1440, "height": 900})
            await page.goto(url)
            groups = page.locator("#devices .stage-group")
            await groups.nth(1).wait_for(timeout=15_000)
            assert await groups.count() == 2
            for stage, cards in (
                ("0", ["worker-0", "worker-0-r1"]),
                ("1", ["worker-1", "worker-1-r1"]),
            ):
                group = page.locator(f'#devices .stage-group[data-stage="{stage}"]')
                found = group.locator("[data-device-id]")
                assert [
                    await found.nth(i).get_attribute("data-device-id") for i in range(2)
                ] == cards
            status = '#devices .stage-group[data-stage="1"] .stage-group-status'
            await page.wait_for_function(
                "s => document.querySelector(s)?.textContent === 'degraded'",
                arg=status,
                timeout=15_000,
            )
            assert "badge-warning" in (await page.get_attribute(status, "class") or "")
            healthy = '#devices .stage-group[data-stage="0"] .stage-group-status'
            assert await page.text_content(healthy) == "healthy"
        finally:
            await browser.close()
