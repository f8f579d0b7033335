"""Two workers on machines of their own, the coordinator outside: the README's
several-machines recipe on a network-namespace topology, and every figure the monitoring
reports checked against an independent measure of the same thing (tolerances as in
docs/monitoring-api.md, "Accuracy").

Workers run as ``mlx-relay worker --config cluster.yaml --device-id worker-N`` inside their
own namespace, each with its own address on a bridge; the coordinator runs in this process
(or as ``mlx-relay coordinator --config cluster.yaml``) and reaches them over that bridge.
Needs root (or CAP_NET_ADMIN) and iproute2, as on CI; elsewhere every test skips saying so.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import yaml

from mlx_relay import worker_client as client_module
from mlx_relay.core.config import ClusterConfig
from mlx_relay.server.runtime import CoordinatorRuntime
from tests.support.cluster import free_ports
from tests.support.dashboard_cluster import wait_for
from tests.support.multihost import (
    MLX_RELAY,
    WORKER_PORT,
    MessageBytes,
    ProcessReads,
    WorkerRun,
    cluster_file,
    median,
    start_worker,
    tcp_echo_rtt,
    wait_for_log,
)
from tests.support.netns import Topology, topology_or_skip

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]

MONITORING = {"collection_interval": 0.5, "poll_interval": 0.5, "health_check_interval": 1.0}
# Tolerances of the device figures against psutil reads of the same process and machine
# (docs/monitoring-api.md, "Accuracy").
READ_WINDOW = 0.1  # s after sampled_at within which a sample has read all its figures
RSS_SLACK = 2**20  # bytes
CPU_TICK = 0.02  # s of process CPU time: psutil's clock-tick resolution, twice
MEMORY_SLACK_RATIO = 0.01  # of total memory
PROMPT = "Distributed inference splits the layers of a model across several devices."


@pytest.fixture(scope="module")
def net() -> Iterator[Topology]:
    with topology_or_skip(2) as net:
        yield net


@pytest.fixture(scope="module")
def config_path(net: Topology, tiny_model_dir: Path, tmp_path_factory: Any) -> Path:
    directory = tmp_path_factory.mktemp("multihost")
    (port,) = free_ports(1)
    return cluster_file(directory / "cluster.yaml", net, tiny_model_dir, port, MONITORING)


@pytest.fixture(scope="module")
def workers(net: Topology, config_path: Path) -> list[WorkerRun]:
    runs = [
        start_worker(host, config_path, f"worker-{i}", config_path.with_name(f"worker-{i}.log"))
        for i, host in enumerate(net.hosts)
    ]
    for run in runs:
        wait_for_log(run, "serving layers")
    return runs  # stopped with their namespaces when `net` closes


class Coordinator:
    def __init__(self, runtime: CoordinatorRuntime, counter: MessageBytes) -> None:
        self.runtime = runtime
        self.counter = counter
        self.http = httpx.AsyncClient(base_url=runtime.url, timeout=30)
        self.model = ""

    async def get(self, path: str) -> Any:
        response = await self.http.get(path)
        response.raise_for_status()
        return response.json()

    async def links(self) -> dict[str, dict[str, Any]]:
        """The coordinator's own links by peer (the workers' links to their next stage are
        in the list too, measured in the worker processes)."""
        devices = await self.get("/api/devices")
        return {link["peer"]: link for link in devices["links"] if link["device"] == "coordinator"}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def coordinator(workers: list[WorkerRun], config_path: Path) -> AsyncIterator[Coordinator]:
    counter = MessageBytes()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            client_module.grpc.aio,
            "insecure_channel",
            counter.wrap(client_module.grpc.aio.insecure_channel),
        )
        runtime = CoordinatorRuntime(ClusterConfig.from_yaml(config_path), "127.0.0.1", 0)
        await runtime.start()
    coordinator = Coordinator(runtime, counter)
    # Direct links open once the first calls name them, so for as long as the cluster runs.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            client_module, "open_link", counter.wrap_link(client_module.open_link, WORKER_PORT)
        )
        try:
            coordinator.model = (await coordinator.get("/v1/models"))["data"][0]["id"]
            yield coordinator
        finally:
            await coordinator.http.aclose()
            await runtime.stop()


async def chat(coordinator: Coordinator, max_tokens: int, *, stream: bool) -> dict[str, Any]:
    """One chat completion timed by the client: ttft, e2e and the tokens it counted."""
    body = {
        "model": coordinator.model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "logprobs": True,
        "stream": stream,
    }
    started = time.perf_counter()
    if not stream:
        response = await coordinator.http.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        ended = time.perf_counter()
        tokens = len(response.json()["choices"][0]["logprobs"]["content"])
        return {"e2e": ended - started, "tokens": tokens}
    first: float | None = None
    tokens = 0
    async with coordinator.http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, (await response.aread()).decode()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[len("data: ") :])["choices"]
            content = (choices[0].get("logprobs") or {}).get("content") or [] if choices else []
            if content and first is None:
                first = time.perf_counter()
            tokens += len(content)
    ended = time.perf_counter()
    assert first is not None, "no token streamed"
    return {"ttft": first - started, "e2e": ended - started, "tokens": tokens}


def within_rtt_tolerance(measured: float, reference: float) -> bool:
    """max(0.3 ms, 2x): within 0.3 ms, or within a factor of 2, of the reference."""
    return abs(measured - reference) <= 0.0003 or reference / 2 <= measured <= 2 * reference


async def test_network_rtt_matches_a_raw_tcp_echo_across_the_same_path(
    net: Topology, coordinator: Coordinator
) -> None:
    links = await wait_for(
        lambda: _links_with(coordinator, "rtt", 8), timeout=30, what="8 probes per link"
    )
    for i, host in enumerate(net.hosts):
        link = links[f"worker-{i}"]
        echo = median(await asyncio.to_thread(tcp_echo_rtt, host))
        network, ping = link["rtt"]["p50"], link["ping_rtt"]["p50"]
        print(
            f"worker-{i}: network RTT p50 {network * 1e6:.1f} us ({link['rtt_method']}), "
            f"TCP echo p50 {echo * 1e6:.1f} us, Ping RPC p50 {ping * 1e6:.0f} us, "
            f"RPC overhead p50 {link['rpc_overhead']['p50'] * 1e6:.0f} us"
        )
        assert within_rtt_tolerance(network, echo), (network, echo)
        assert link["rtt_unavailable_reason"] is None
        # The overhead is what the Ping RPC adds to the network round trip.
        assert 0 <= link["rpc_overhead"]["p50"] <= link["ping_rtt"]["max"]
        assert network < ping


async def _links_with(coordinator: Coordinator, key: str, count: int) -> dict[str, Any] | None:
    links = await coordinator.links()
    ready = len(links) == 2 and all(link[key]["count"] >= count for link in links.values())
    return links if ready else None


async def test_ttft_and_e2e_match_what_the_client_measured(coordinator: Coordinator) -> None:
    for max_tokens in (3, 8, 16):
        before = (await coordinator.get("/api/metrics"))["inference"]["histograms"]
        measured = await chat(coordinator, max_tokens, stream=True)
        after = await _histograms_after(coordinator, before)
        for key, name in (
            ("ttft", "time_to_first_token_seconds"),
            ("e2e", "e2e_request_latency_seconds"),
        ):
            reported = after[name]["sum"] - before[name]["sum"]
            client = measured[key]
            print(
                f"{key} ({max_tokens} tokens): API {reported * 1e3:.2f} ms, "
                f"client {client * 1e3:.2f} ms"
            )
            assert abs(reported - client) <= max(0.05 * client, 0.020), (key, reported, client)


async def _histograms_after(coordinator: Coordinator, before: dict[str, Any]) -> dict[str, Any]:
    async def finished() -> dict[str, Any] | None:
        now = (await coordinator.get("/api/metrics"))["inference"]["histograms"]
        done = now["e2e_request_latency_seconds"]["count"]
        return now if done == before["e2e_request_latency_seconds"]["count"] + 1 else None

    return await wait_for(finished, timeout=10, what="the request's latencies")


async def test_token_and_request_counts_are_exact(coordinator: Coordinator) -> None:
    before = (await coordinator.get("/api/metrics"))["inference"]
    counted = [
        await chat(coordinator, max_tokens, stream=stream)
        for max_tokens, stream in ((5, False), (9, True), (2, False), (12, True))
    ]
    after = (await coordinator.get("/api/metrics"))["inference"]
    tokens = sum(c["tokens"] for c in counted)
    assert after["generation_tokens_total"] - before["generation_tokens_total"] == tokens
    assert after["requests_total"] - before["requests_total"] == len(counted)
    finished = sum(after["success_total"].values()) - sum(before["success_total"].values())
    assert finished == len(counted)
    assert after["failure_total"] == before["failure_total"]
    metrics = (await coordinator.http.get("/metrics")).text
    exported = next(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("mlxrelay_generation_tokens_total{")
    )
    assert exported == after["generation_tokens_total"]


async def test_bytes_per_link_match_the_serialized_messages(
    net: Topology, coordinator: Coordinator
) -> None:
    for max_tokens in (4, 8):
        await chat(coordinator, max_tokens, stream=False)
    for i, host in enumerate(net.hosts):
        target = f"{host.address}:{WORKER_PORT}"
        sent_before, received_before = coordinator.counter.totals(target)
        link = (await coordinator.links())[f"worker-{i}"]
        sent_after, received_after = coordinator.counter.totals(target)
        for reported, low, high, what in (
            (link["transmit_bytes_total"], sent_before, sent_after, "sent"),
            (link["receive_bytes_total"], received_before, received_after, "received"),
        ):
            print(f"worker-{i} {what}: API {reported} bytes, messages {low}..{high} bytes")
            assert 0.95 * low <= reported <= 1.05 * high, (what, reported, low, high)


async def test_device_cpu_and_memory_match_psutil_reads(
    workers: list[WorkerRun], coordinator: Coordinator
) -> None:
    worker = workers[1]
    assert "worker" in " ".join(ProcessReads(worker.process.pid).process.cmdline())
    samples: dict[float, dict[str, Any]] = {}
    with ProcessReads(worker.process.pid) as reads:
        await asyncio.sleep(0.05)
        reading_since = time.time()
        await chat(coordinator, 16, stream=False)  # some load while sampling
        deadline = time.monotonic() + 20
        while len(samples) < 4 and time.monotonic() < deadline:
            metrics = (await coordinator.get("/api/devices"))["devices"]
            device = next(d for d in metrics if d["device_id"] == worker.device_id)["metrics"]
            if device["sampled_at"] > reading_since:
                samples[device["sampled_at"]] = device
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.1)  # a read after the last sample
    assert len(samples) >= 4, samples.keys()
    times = sorted(samples)
    total_memory = samples[times[0]]["memory_total_bytes"]
    for previous, at in itertools.pairwise(times):
        sample = samples[at]
        # The sample reads its figures within milliseconds after `sampled_at`: every read
        # from just before it to READ_WINDOW after it brackets them.
        near = reads.covering(at, at + READ_WINDOW)
        rss = [r.rss for r in near]
        cpu_seconds = [r.cpu_seconds for r in near]
        used = [r.memory_used for r in near]
        reported_rss = sample["process_resident_memory_bytes"]
        assert min(rss) - RSS_SLACK <= reported_rss <= max(rss) + RSS_SLACK, (reported_rss, rss)
        reported_cpu = sample["process_cpu_seconds_total"]
        assert min(cpu_seconds) - CPU_TICK <= reported_cpu <= max(cpu_seconds) + CPU_TICK
        reported_used = sample["memory_used_bytes"]
        slack = MEMORY_SLACK_RATIO * total_memory
        assert min(used) - slack <= reported_used <= max(used) + slack, (reported_used, used)
        # Machine CPU between two samples: each sample reads the CPU times just after its
        # `sampled_at`, like its other figures, so the interval's ends lie within the reads
        # from each instant to READ_WINDOW after it (a loaded machine may delay the read).
        expected = [
            (end.cpu_busy - start.cpu_busy) / (end.cpu_total - start.cpu_total)
            for start in reads.covering(previous, previous + READ_WINDOW)
            for end in reads.covering(at, at + READ_WINDOW)
        ]
        tolerance = 0.03 + 2 * reads.spacing / (at - previous)
        reported = sample["cpu_utilization_ratio"]
        print(
            f"cpu {reported:.3f} vs psutil {min(expected):.3f}..{max(expected):.3f} "
            f"(tolerance {tolerance:.3f}); rss {reported_rss} vs {min(rss)}..{max(rss)}; "
            f"process cpu {reported_cpu:.3f} s vs {min(cpu_seconds):.3f}..{max(cpu_seconds):.3f}"
        )
        assert min(expected) - tolerance <= reported <= max(expected) + tolerance, (
            reported,
            expected,
            tolerance,
        )


async def test_workers_bound_beyond_loopback_without_a_token_warn(
    net: Topology, workers: list[WorkerRun], config_path: Path
) -> None:
    for worker in workers:
        assert f"WARNING mlx_relay.worker.worker_server: binding {worker.host.address} " in (
            worker.log()
        )
        assert "with no auth token" in worker.log()
    # The same worker with a token configured: no warning.
    data = yaml.safe_load(config_path.read_text())
    data["network"]["auth_token"] = "a-worker-token"
    data["devices"][1]["port"] = WORKER_PORT + 1
    guarded = config_path.with_name("guarded.yaml")
    guarded.write_text(yaml.safe_dump(data))
    run = start_worker(net.hosts[0], guarded, "worker-0", config_path.with_name("guarded.log"))
    try:
        # Stop it once loaded: a Ctrl-C during the load waits for the load to finish.
        wait_for_log(run, "serving layers")
    finally:
        run.process.send_signal(signal.SIGINT)
        run.process.wait(timeout=30)
    assert "with no auth token" not in run.log()


async def test_readme_commands_run_as_written(
    net: Topology, workers: list[WorkerRun], config_path: Path
) -> None:
    process = await asyncio.create_subprocess_exec(
        MLX_RELAY,
        "coordinator",
        "--config",
        str(config_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    output: list[str] = []
    try:
        assert process.stdout is not None
        while "ready on" not in (output or [""])[-1]:
            line = await asyncio.wait_for(process.stdout.readline(), timeout=60)
            assert line, "".join(output)
            output.append(line.decode())
        url = output[-1].rsplit(" ", 1)[1].strip()
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            model = (await http.get("/v1/models")).json()["data"][0]["id"]
            body = {"model": model, "messages": [{"role": "user", "content": PROMPT}]}
            completion = await http.post("/v1/chat/completions", json={**body, "max_tokens": 4})
            assert completion.status_code == 200, completion.text

            async def measured() -> dict[str, Any] | None:
                devices = (await http.get("/api/devices")).json()
                links = [link for link in devices["links"] if link["device"] == "coordinator"]
                ready = len(links) == 2 and all(link["rtt"]["count"] >= 3 for link in links)
                return links if ready else None

            links = await wait_for(measured, timeout=20, what="3 probes per link")
            devices = (await http.get("/api/devices")).json()
        assert [d["up"] for d in devices["devices"] if d["role"] == "worker"] == [True, True]
        for link in links:
            assert link["rtt"]["p50"] < 0.001, link
    finally:
        process.send_signal(signal.SIGINT)
        rest, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    text = "".join(output) + rest.decode()
    assert process.returncode == 0, text
    assert "no auth token" not in text  # its HTTP side is bound to 127.0.0.1


@pytest.mark.browser
async def test_dashboard_shows_the_split_link_figures(
    coordinator: Coordinator, output_dir: Path
) -> None:
    from playwright.async_api import async_playwright

    from tests.e2e.test_browser import CHROMIUM, CHROMIUM_ARGS, BrowserLog, require_chromium

    require_chromium()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1440, "height": 900})
            log = BrowserLog(page)
            await page.goto(coordinator.runtime.url + "/")
            await page.wait_for_function(
                """() => [...document.querySelectorAll('#links td[data-column="rpc-overhead"]')]
                       .filter(td => td.textContent !== '\\u2013').length === 2""",
                timeout=15_000,
            )
            rows = page.locator("#links tbody tr", has_text="coordinator →")
            assert await rows.count() == 2
            # The hidden states' hop, reported by worker-0 (no one pings it: no RTT).
            relayed = page.locator("#links tbody tr", has_text="worker-0 → worker-1")
            await relayed.wait_for(timeout=15_000)
            for i in range(2):
                row = rows.nth(i)
                cell = row.locator('td[data-column="network-rtt"]')
                shown = (await cell.text_content() or "").strip()
                overhead = await row.locator('td[data-column="rpc-overhead"]').text_content()
                print(f"dashboard row {i}: network RTT {shown!r}, RPC overhead {overhead!r}")
                assert _seconds(shown) < 0.001, shown
            headers = await page.locator("#links thead th").all_text_contents()
            assert {"network RTT", "RPC overhead p50 / p99", "Ping RPC p50"} <= set(headers)
            await page.screenshot(path=str(output_dir / "links.png"), full_page=True)
            assert log.errors == []
        finally:
            await browser.close()


def _seconds(text: str) -> float:
    value, unit = text.split()
    return float(value) * {"µs": 1e-6, "ms": 1e-3, "s": 1.0}[unit]
