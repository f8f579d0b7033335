"""A bounded load run against a real cluster: every part its own process (two ``mlx-relay
worker`` and one ``mlx-relay coordinator``), this process only the clients.

The requests are a fixed mix (seeded): valid chat and text completions, streamed and not;
invalid ones (each answered 400 or 404) and oversized ones (413 or 400); and streams whose
client disconnects after two events. :func:`run_load` sends them at a given concurrency and
reports what the coordinator answered, whether every valid request completed, the KV
sessions left on the workers once it is over, and the coordinator's memory (RSS) before and
after. Used by ``bench/load.py`` (1,000 requests at concurrency 32) and by
tests/integration/test_load.py (a smaller run).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from mlx_relay.cli.fleet import worker_command
from mlx_relay.core.config import ClusterConfig
from tests.support.cluster import child_environment, cluster_dict, free_ports, kv_sessions

# The load cluster's limits, small so that oversized requests stay cheap to send.
MAX_BODY_BYTES = 64 * 1024
MAX_PROMPT_BYTES = 8 * 1024
MAX_MESSAGES = 64
MAX_STOP_LENGTH = 64
START_TIMEOUT = 180.0

# Kind of request -> share of the mix.
MIX = {
    "chat": 25,
    "chat_stream": 20,
    "completion": 10,
    "completion_stream": 10,
    "invalid": 15,
    "oversized": 10,
    "disconnect": 10,
}
VALID = ("chat", "chat_stream", "completion", "completion_stream")


@dataclass
class LoadCluster:
    url: str
    config: ClusterConfig
    coordinator: subprocess.Popen[bytes]
    workers: list[subprocess.Popen[bytes]]
    logs: Path

    @property
    def coordinator_rss(self) -> int:
        return int(psutil.Process(self.coordinator.pid).memory_info().rss)

    def log_tail(self, name: str = "coordinator", lines: int = 30) -> str:
        text = (self.logs / f"{name}.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


@contextlib.asynccontextmanager
async def load_cluster(model_dir: Path, work_dir: Path) -> AsyncIterator[LoadCluster]:
    """Two worker processes and a coordinator process on free loopback ports."""
    *worker_ports, http_port = free_ports(3)
    data = cluster_dict(
        model_dir,
        2,
        ports=worker_ports,
        http={"port": http_port, "max_body_bytes": MAX_BODY_BYTES},
        inference={
            "max_prompt_bytes": MAX_PROMPT_BYTES,
            "max_messages": MAX_MESSAGES,
            "max_stop_length": MAX_STOP_LENGTH,
        },
    )
    config_path = work_dir / "cluster.yaml"
    config_path.write_text(yaml.safe_dump(data))
    config = ClusterConfig.from_dict(data)
    processes: list[subprocess.Popen[bytes]] = []

    def start(name: str, command: list[str]) -> subprocess.Popen[bytes]:
        with open(work_dir / f"{name}.log", "ab") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=child_environment()
            )
        processes.append(process)
        return process

    try:
        workers = [
            start(w.id, worker_command(config_path, w.id, monitoring=True, grace=0.5))
            for w in config.workers
        ]
        coordinator = start(
            "coordinator",
            [sys.executable, "-m", "mlx_relay.cli", "coordinator", "--config", str(config_path)],
        )
        cluster = LoadCluster(
            f"http://127.0.0.1:{http_port}", config, coordinator, workers, work_dir
        )
        await _wait_healthy(cluster)
        yield cluster
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


async def _wait_healthy(cluster: LoadCluster) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    async with httpx.AsyncClient(base_url=cluster.url, timeout=2.0) as http:
        while time.monotonic() < deadline:
            if cluster.coordinator.poll() is not None:
                raise RuntimeError(f"the coordinator exited:\n{cluster.log_tail()}")
            with contextlib.suppress(httpx.TransportError):
                if (await http.get("/health")).status_code == 200:
                    return
            await asyncio.sleep(0.3)
    raise TimeoutError(f"no healthy /health at {cluster.url}:\n{cluster.log_tail()}")


# -- the requests ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    """One request of the mix: what to send and which statuses are right for it."""

    kind: str
    method: str
    path: str
    body: bytes
    expected: tuple[int, ...]
    stream: bool = False


def plan(count: int, model: str, seed: int = 0) -> list[Planned]:
    """``count`` requests of the mix, in a seeded random order."""
    rng = random.Random(seed)
    kinds = rng.choices(list(MIX), weights=list(MIX.values()), k=count)
    return [_planned(kind, model, rng, i) for i, kind in enumerate(kinds)]


def _json(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


def _planned(kind: str, model: str, rng: random.Random, i: int) -> Planned:
    max_tokens = rng.randint(2, 24)
    messages = [{"role": "user", "content": f"Request {i}: tell me about the number {i}."}]
    chat = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    text = {"model": model, "prompt": f"Once upon a time {i}", "max_tokens": max_tokens}
    if kind == "chat":
        return Planned(kind, "POST", "/v1/chat/completions", _json(chat), (200,))
    if kind == "chat_stream":
        body = {**chat, "stream": True, "stream_options": {"include_usage": True}}
        return Planned(kind, "POST", "/v1/chat/completions", _json(body), (200,), stream=True)
    if kind == "completion":
        return Planned(kind, "POST", "/v1/completions", _json(text), (200,))
    if kind == "completion_stream":
        body = {**text, "stream": True}
        return Planned(kind, "POST", "/v1/completions", _json(body), (200,), stream=True)
    if kind == "disconnect":
        body = {**chat, "max_tokens": 64, "stream": True}
        return Planned(kind, "POST", "/v1/chat/completions", _json(body), (200,), stream=True)
    if kind == "invalid":
        choice = rng.randrange(6)
        bad: list[tuple[str, str, bytes, int]] = [
            ("POST", "/v1/chat/completions", _json({**chat, "n": 2}), 400),
            ("POST", "/v1/chat/completions", _json({**chat, "model": "no-such-model"}), 404),
            ("POST", "/v1/chat/completions", _json({**chat, "messages": []}), 400),
            ("POST", "/v1/chat/completions", b'{"model": "m", "messages": [', 400),
            ("POST", "/v1/completions", _json({**text, "temperature": "hot"}), 400),
            ("GET", "/v1/nothing-here", b"", 404),
        ]
        method, path, payload, status = bad[choice]
        return Planned(kind, method, path, payload, (status,))
    choice = rng.randrange(4)
    big: list[tuple[str, bytes, int]] = [
        # A body over http.max_body_bytes: 413 before it is parsed.
        ("/v1/chat/completions", _json({**chat, "pad": "x" * MAX_BODY_BYTES}), 413),
        # A prompt over inference.max_prompt_bytes (the body itself is under the cap).
        ("/v1/completions", _json({**text, "prompt": "y" * (MAX_PROMPT_BYTES + 1)}), 400),
        ("/v1/chat/completions", _json({**chat, "messages": messages * (MAX_MESSAGES + 1)}), 400),
        ("/v1/chat/completions", _json({**chat, "stop": ["z" * (MAX_STOP_LENGTH + 1)]}), 400),
    ]
    path, payload, status = big[choice]
    return Planned("oversized", "POST", path, payload, (status,))


@dataclass
class Outcome:
    kind: str
    status: int
    seconds: float
    completed: bool  # a valid request got its whole answer (finish_reason stop or length)
    detail: str = ""


async def _send(http: httpx.AsyncClient, request: Planned) -> Outcome:
    started = time.perf_counter()
    headers = {"content-type": "application/json"} if request.body else {}
    if not request.stream:
        response = await http.request(
            request.method, request.path, content=request.body, headers=headers
        )
        completed = False
        if response.status_code == 200:
            choice = response.json()["choices"][0]
            completed = choice["finish_reason"] in ("stop", "length")
        detail = "" if response.status_code in request.expected else response.text[:200]
        return Outcome(
            request.kind, response.status_code, time.perf_counter() - started, completed, detail
        )
    async with http.stream(
        request.method, request.path, content=request.body, headers=headers
    ) as response:
        if response.status_code != 200:
            body = (await response.aread()).decode(errors="replace")[:200]
            return Outcome(
                request.kind, response.status_code, time.perf_counter() - started, False, body
            )
        events = 0
        finish = None
        done = False
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                done = True
                break
            events += 1
            chunk = json.loads(data)
            if "error" in chunk:
                return Outcome(request.kind, 500, time.perf_counter() - started, False, data[:200])
            for choice in chunk.get("choices", []):
                finish = choice.get("finish_reason") or finish
            if request.kind == "disconnect" and events >= 2:
                break  # leaving the `async with` closes the connection mid-stream
        completed = done and finish in ("stop", "length")
        return Outcome(request.kind, 200, time.perf_counter() - started, completed)


@dataclass
class LoadReport:
    requests: int
    concurrency: int
    seconds: float
    outcomes: list[Outcome]
    rss_before: int
    rss_after: int
    rss_peak: int
    sessions_left: list[int]
    aborted: int  # requests the coordinator counted as aborted (the disconnects)

    @property
    def server_errors(self) -> int:
        return sum(1 for o in self.outcomes if o.status >= 500)

    @property
    def unexpected(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.detail]

    @property
    def valid(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.kind in VALID]

    @property
    def incomplete(self) -> list[Outcome]:
        return [o for o in self.valid if not o.completed]

    @property
    def rss_growth_mb(self) -> float:
        return (self.rss_after - self.rss_before) / 2**20

    def lines(self) -> Iterator[str]:
        latencies = sorted(o.seconds for o in self.valid)
        p95 = latencies[int(0.95 * (len(latencies) - 1))] if latencies else 0.0
        median = statistics.median(latencies) if latencies else 0.0
        yield (
            f"{self.requests} requests at concurrency {self.concurrency} in {self.seconds:.1f} s "
            f"({self.requests / self.seconds:.1f} requests/s)"
        )
        for kind in MIX:
            statuses = Counter(o.status for o in self.outcomes if o.kind == kind)
            listed = ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items()))
            yield f"  {kind:<18} {sum(statuses.values()):>5}  ({listed})"
        yield f"5xx answers: {self.server_errors}"
        yield f"answers other than expected: {len(self.unexpected)}"
        yield (
            f"valid requests completed: {len(self.valid) - len(self.incomplete)} of "
            f"{len(self.valid)} (latency median {median:.2f} s, p95 {p95:.2f} s)"
        )
        disconnects = sum(1 for o in self.outcomes if o.kind == "disconnect")
        yield f"aborted by their client (coordinator's count): {self.aborted} of {disconnects}"
        yield f"KV sessions left per worker: {self.sessions_left}"
        yield (
            f"coordinator RSS: {self.rss_before / 2**20:.1f} MB after warm-up, "
            f"{self.rss_after / 2**20:.1f} MB after, peak {self.rss_peak / 2**20:.1f} MB: "
            f"growth {self.rss_growth_mb:+.1f} MB (target < 50 MB)"
        )


async def run_load(
    cluster: LoadCluster, requests: int, concurrency: int, *, warmup: int = 32, seed: int = 0
) -> LoadReport:
    """Send ``warmup`` requests of the mix, then ``requests`` more at ``concurrency``; wait for
    the workers' KV sessions to drain (up to 30 s) and report."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=cluster.url, timeout=120, limits=limits) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]
        planned = plan(warmup + requests, model, seed)
        await _run_all(http, planned[:warmup], concurrency)
        await _drain(cluster)
        aborted_before = await _aborted(http)
        rss_before = cluster.coordinator_rss
        peak = {"rss": rss_before}

        async def sample() -> None:
            while True:
                peak["rss"] = max(peak["rss"], cluster.coordinator_rss)
                await asyncio.sleep(0.25)

        sampler = asyncio.create_task(sample())
        started = time.perf_counter()
        try:
            outcomes = await _run_all(http, planned[warmup:], concurrency)
        finally:
            sampler.cancel()
        seconds = time.perf_counter() - started
        sessions = await _drain(cluster)
        aborted = await _aborted(http) - aborted_before
    return LoadReport(
        requests,
        concurrency,
        seconds,
        outcomes,
        rss_before,
        cluster.coordinator_rss,
        max(peak["rss"], cluster.coordinator_rss),
        sessions,
        aborted,
    )


async def _aborted(http: httpx.AsyncClient) -> int:
    """``mlxrelay_request_success_total{finished_reason="abort"}`` from /metrics."""
    text = (await http.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith("mlxrelay_request_success_total{") and 'finished_reason="abort"' in line:
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


async def _run_all(
    http: httpx.AsyncClient, planned: list[Planned], concurrency: int
) -> list[Outcome]:
    queue: asyncio.Queue[tuple[int, Planned]] = asyncio.Queue()
    for item in enumerate(planned):
        queue.put_nowait(item)
    outcomes: list[Outcome | None] = [None] * len(planned)

    async def client() -> None:
        while not queue.empty():
            index, request = queue.get_nowait()
            try:
                outcome = await _send(http, request)
            except httpx.HTTPError as exc:
                outcome = Outcome(request.kind, 0, 0.0, False, f"{type(exc).__name__}: {exc}")
            if outcome.status not in request.expected and not outcome.detail:
                outcome.detail = f"status {outcome.status}"
            outcomes[index] = outcome

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return [o for o in outcomes if o is not None]


async def _drain(cluster: LoadCluster, timeout: float = 30.0) -> list[int]:
    """Wait until no worker holds a KV session (disconnected streams end theirs shortly
    after); the counts at the end."""
    deadline = time.monotonic() + timeout
    while (counts := await kv_sessions(cluster.config)) != [0] * len(counts):
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    return counts
