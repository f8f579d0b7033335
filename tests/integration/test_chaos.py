"""Chaos: a supervised 2-stage cluster (``mlx-relay up``) loses a worker to SIGKILL again
and again under load, each stage at least twice, and loses no request: every one completes
with a 200 and all its tokens, each stream equal to one process's greedy output with no
token repeated or dropped, and no KV session is left on any stage at the end.

The suite runs a short version: 40 requests, kills at fixed shares of the requests
completed (so they always land mid-load, whatever the machine's speed), each once the
previously killed worker serves again. The full one, 200 requests at concurrency 8 with a
kill every 10 s::

    MLX_RELAY_CHAOS_REQUESTS=200 MLX_RELAY_CHAOS_MAX_TOKENS=256 \
    MLX_RELAY_CHAOS_KILL_EVERY=10 pytest tests/integration/test_chaos.py -s

Both print the recovery pauses' p50 and p99.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from mlx_relay.coordinator.client import WorkerClient
from mlx_relay.core.config import ClusterConfig
from tests.integration.test_up_cli import reap, start, stop, wait_healthy
from tests.integration.test_up_supervision import worker_processes
from tests.support.cluster import cluster_dict, free_ports, kv_sessions
from tests.support.reference import cached_tokenizer, reference_tokens

REQUESTS = int(os.environ.get("MLX_RELAY_CHAOS_REQUESTS", "40"))
CONCURRENCY = 8
MAX_TOKENS = int(os.environ.get("MLX_RELAY_CHAOS_MAX_TOKENS", "48"))
# Kills over the run, alternating stages: each stage at least twice.
KILLS = max(4, REQUESTS // 40)
# Seconds between kills (once the previous victim serves again) instead of kills at shares
# of the requests completed; the run must then last long enough for 4 kills.
KILL_EVERY = float(os.environ.get("MLX_RELAY_CHAOS_KILL_EVERY", "0"))
# The whole run's bound (seconds): far more than it takes, so a hang fails rather than waits.
RUN_TIMEOUT = 600.0
PROMPTS = [
    "Each worker holds a contiguous range of transformer layers",
    "The quick brown fox",
    "Hello",
    "A pipeline of unreliable machines can finish every request",
    "Tokens travel from stage to stage",
    "Once upon a time",
    "The coordinator keeps the request",
    "Recovery by replay",
]


@dataclass
class Outcome:
    status: int = 0
    tokens: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int | None = None


async def stream_completion(
    http: httpx.AsyncClient,
    model: str,
    prompt_ids: list[int],
    max_tokens: int = MAX_TOKENS,
    outcome: Outcome | None = None,
) -> Outcome:
    """One greedy streamed completion, read chunk by chunk (into ``outcome`` when given, so
    the caller sees its tokens arrive)."""
    body = {
        "model": model,
        "prompt": prompt_ids,
        "max_tokens": max_tokens,
        "temperature": 0,
        "logprobs": 0,  # each chunk names its token: the stream can be checked token by token
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    outcome = outcome if outcome is not None else Outcome()
    async with http.stream("POST", "/v1/completions", json=body) as response:
        outcome.status = response.status_code
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            assert "error" not in chunk, chunk
            if chunk.get("usage"):
                outcome.completion_tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                if choice.get("logprobs"):
                    outcome.tokens += choice["logprobs"]["tokens"]
                if choice.get("finish_reason"):
                    outcome.finish_reason = choice["finish_reason"]
    return outcome


async def serving(config: ClusterConfig, device_id: str) -> bool:
    worker = next(w for w in config.workers if w.id == device_id)
    client = WorkerClient(worker.id, worker.address, config.network)
    try:
        return await client.health(timeout=1.0, retry=False) == "SERVING"
    except Exception:
        return False
    finally:
        await client.close()


def recovery_seconds(metrics_text: str) -> tuple[float, float]:
    """Count and sum of ``mlxrelay_recovery_seconds`` in a /metrics scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(metrics_text)
        if family.name == "mlxrelay_recovery_seconds"
        for sample in family.samples
        if sample.name in ("mlxrelay_recovery_seconds_count", "mlxrelay_recovery_seconds_sum")
    }
    return values["mlxrelay_recovery_seconds_count"], values["mlxrelay_recovery_seconds_sum"]


async def run_load(
    url: str, model: str, prompts: list[list[int]], up: psutil.Process, config: ClusterConfig
) -> tuple[list[Outcome], list[tuple[float, str]]]:
    """REQUESTS streamed requests at CONCURRENCY, while workers are killed; the outcomes
    in request order and the kills (monotonic time, device id)."""
    outcomes: list[Outcome | None] = [None] * REQUESTS
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(REQUESTS):
        queue.put_nowait(i)
    done = 0
    kills: list[tuple[float, str]] = []

    async def client_loop(http: httpx.AsyncClient) -> None:
        nonlocal done
        while not queue.empty():
            i = queue.get_nowait()
            outcomes[i] = await stream_completion(http, model, prompts[i % len(prompts)])
            done += 1

    async def due(k: int) -> bool:
        """Wait until kill ``k`` is due; False when the load ended first."""
        at = (kills[-1][0] if kills else time.monotonic()) + KILL_EVERY
        if kills:  # the previous victim serves again first: one recovery at a time
            while not await serving(config, kills[-1][1]):
                await asyncio.sleep(0.1)
        while done < REQUESTS:
            if (time.monotonic() >= at) if KILL_EVERY else done >= share(k):
                return True
            await asyncio.sleep(0.05)
        return False

    def share(k: int) -> float:
        return (k + 1) * REQUESTS / (KILLS + 1)

    async def killer() -> None:
        k = 0
        while (KILL_EVERY or k < KILLS) and await due(k):
            victim = f"worker-{k % 2}"
            worker_processes(up)[victim].send_signal(signal.SIGKILL)
            kills.append((time.monotonic(), victim))
            k += 1

    timeout = httpx.Timeout(RUN_TIMEOUT, connect=10.0)
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as http:
        await asyncio.wait_for(
            asyncio.gather(killer(), *(client_loop(http) for _ in range(CONCURRENCY))),
            RUN_TIMEOUT,
        )
    return [o for o in outcomes if o is not None], kills


def test_chaos_every_request_survives_killed_workers(tiny_model_dir: Path, tmp_path: Path) -> None:
    port = free_ports(1)[0]
    url = f"http://127.0.0.1:{port}"
    worker_ports = free_ports(2)
    data = cluster_dict(
        tiny_model_dir,
        2,
        ports=worker_ports,
        layers=[(0, 2), (2, 4)],
        network={"request_timeout": 10.0, "ping_timeout": 1.0, "recovery_timeout": 60.0},
        inference={"max_running_requests": CONCURRENCY},
    )
    data["supervision"] = {
        # Every kill is a restart; with kills every KILL_EVERY s their number has no bound.
        "max_restarts": 1000 if KILL_EVERY else KILLS + 2,
        "window": 600.0,
        "backoff_initial": 0.5,
        "backoff_max": 2.0,
    }
    config_path = tmp_path / "cluster.yaml"
    config_path.write_text(yaml.safe_dump(data))
    config = ClusterConfig.from_dict(data)
    tokenizer = cached_tokenizer(tiny_model_dir)
    prompts = [list(tokenizer.encode(p)) for p in PROMPTS]
    expected = [
        [tokenizer.decode([t.token_id]) for t in reference_tokens(tiny_model_dir, ids, MAX_TOKENS)]
        for ids in prompts
    ]
    log = tmp_path / "up.log"
    up = start(["up", "--config", str(config_path), "--port", str(port)], log)
    try:
        wait_healthy(up, url, log)
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        started = time.monotonic()
        outcomes, kills = asyncio.run(run_load(url, model, prompts, psutil.Process(up.pid), config))
        elapsed = time.monotonic() - started
        assert len(outcomes) == REQUESTS
        for i, outcome in enumerate(outcomes):
            want = expected[i % len(prompts)]
            assert outcome.status == 200, (i, outcome)
            assert outcome.tokens == want, f"request {i}: stream differs from the reference"
            assert outcome.completion_tokens == len(want)
            assert outcome.finish_reason == ("length" if len(want) == MAX_TOKENS else "stop")
        by_stage = [sum(1 for _, d in kills if d == f"worker-{s}") for s in (0, 1)]
        assert min(by_stage) >= 2, kills
        deadline = time.monotonic() + 20
        while (counts := asyncio.run(kv_sessions(config))) != [0, 0]:
            assert time.monotonic() < deadline, f"KV sessions left: {counts}"
            time.sleep(0.2)
        inference = httpx.get(f"{url}/api/metrics", timeout=10.0).json()["inference"]
        assert inference["failure_total"] == {}
        pause = httpx.get(f"{url}/api/stats", timeout=10.0).json()["latency"]["recovery"]
        count, total = recovery_seconds(httpx.get(f"{url}/metrics", timeout=10.0).text)
        assert count == pause["count"] >= len(kills)  # at least one stream paused per kill
        gaps = [b - a for (a, _), (b, _) in itertools.pairwise(kills)]
        report(elapsed, kills, gaps, pause, total / count)
        assert stop(up, signal.SIGINT, log) == 0
    finally:
        reap(up)


def report(
    elapsed: float,
    kills: list[tuple[float, str]],
    gaps: list[float],
    pause: dict[str, Any],
    mean: float,
) -> None:
    print(
        f"\nchaos: {REQUESTS} requests x {MAX_TOKENS} tokens at concurrency {CONCURRENCY} in "
        f"{elapsed:.1f} s; {len(kills)} kills ({', '.join(d for _, d in kills)}), "
        f"every {sum(gaps) / max(1, len(gaps)):.1f} s on average; "
        f"recovery pause over {pause['count']} streams: p50 {pause['p50']:.2f} s, "
        f"p99 {pause['p99']:.2f} s, max {pause['max']:.2f} s, mean {mean:.2f} s"
    )
