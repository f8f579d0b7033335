"""Many concurrent chat requests against a real ``mlx-relay up`` on its default settings.

    .venv/bin/python bench/up_concurrency.py                    # 32 requests of 32 tokens
    .venv/bin/python bench/up_concurrency.py --requests 16 --max-tokens 64

Starts ``mlx-relay up`` (bundled model, 2 workers, every setting at its default) as its own
process on a free loopback port, waits for ``/health``, sends the chat requests all at once
over HTTP and prints how many completed, by status, the wall time, the generated tokens/s,
the per-request latency (median and max) and what ``/api/stats`` says of each stage's batch
size and bubble right after.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

START_TIMEOUT = 300.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_healthy(process: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"mlx-relay up exited early:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"no healthy /health at {url} after {START_TIMEOUT:.0f} s:\n{log.read_text()}")


async def one_request(
    http: httpx.AsyncClient, model: str, i: int, max_tokens: int
) -> tuple[int, float, int, str]:
    """Status, seconds, completion tokens and the error message (empty when none)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"Count from {i} to {i + 60}, one per line."}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    started = time.perf_counter()
    response = await http.post("/v1/chat/completions", json=body)
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        return response.status_code, seconds, 0, response.text[:200]
    usage: dict[str, Any] = response.json()["usage"]
    return 200, seconds, int(usage["completion_tokens"]), ""


async def run(url: str, requests: int, max_tokens: int) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]
        await one_request(http, model, 0, 4)  # warm-up
        print(f"model {model}: {requests} concurrent chat requests, max_tokens {max_tokens}")
        started = time.perf_counter()
        results = await asyncio.gather(
            *(one_request(http, model, i, max_tokens) for i in range(requests))
        )
        wall = time.perf_counter() - started
        stats = (await http.get("/api/stats")).json()
    statuses = Counter(status for status, _, _, _ in results)
    latencies = [seconds for status, seconds, _, _ in results if status == 200]
    tokens = sum(n for _, _, n, _ in results)
    print(f"completed {statuses.get(200, 0)} of {requests}; by status {dict(statuses)}")
    for status, _, _, error in results:
        if status != 200:
            print(f"  {status}: {error}")
    print(f"wall {wall:.1f} s; {tokens} tokens generated, {tokens / wall:.1f} tok/s")
    if latencies:
        print(
            f"request latency median {statistics.median(latencies):.1f} s, "
            f"max {max(latencies):.1f} s"
        )
    for stage in stats["stages"]:
        print(
            f"{stage['device_id']}: batch mean {stage.get('batch_size_mean')} "
            f"(last 10 s), bubble {stage.get('bubble_ratio')}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkdtemp(prefix="mlx-relay-up-bench-")) / "up.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlx_relay.cli", "up", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        wait_healthy(process, url, log)
        asyncio.run(run(url, args.requests, args.max_tokens))
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    print(f"(log of mlx-relay up: {log})")


if __name__ == "__main__":
    main()
