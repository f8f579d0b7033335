#!/usr/bin/env python3
"""Monitoring integration, end to end: collector, health checks (with a custom one), the
dashboard, and reading the REST API.

    python examples/monitoring_integration_example.py --port 0 --duration 5

It records demonstration requests through the same recording API the orchestrator uses
(``track_request`` -> ``token`` -> ``finish``/``fail``), so the charts and counters move
without loading a model. Open the printed URL while it runs; ``--duration 0`` runs until
Ctrl-C. For a real cluster, ``mlx-relay up`` serves the same dashboard.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import time

import httpx

from mlx_relay.core.config import Thresholds
from mlx_relay.monitoring import HealthCheck, HealthMonitor, HealthStatus, MetricsCollector
from mlx_relay.monitoring.dashboard import MonitoringDashboard


class DemoQueue:
    """Stands in for an application's request queue, watched by a custom health check."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.depth = 0

    def check(self) -> dict[str, object]:
        """A custom health check: warning when the queue is over half full."""
        if self.depth >= self.limit:
            status, message = HealthStatus.CRITICAL, f"queue full ({self.depth}/{self.limit})"
        elif self.depth > self.limit // 2:
            status, message = HealthStatus.WARNING, f"queue filling ({self.depth}/{self.limit})"
        else:
            status, message = HealthStatus.HEALTHY, f"queue depth {self.depth}/{self.limit}"
        return {"status": status, "message": message, "details": {"depth": self.depth}}


async def demo_request(collector: MetricsCollector, queue: DemoQueue, rng: random.Random) -> None:
    """One request's life as the orchestrator records it (no prompt text is ever recorded)."""
    queue.depth += 1
    collector.set_waiting(queue.depth)
    trace = collector.track_request(prompt_tokens=rng.randint(8, 64), queued_at=time.monotonic())
    try:
        await asyncio.sleep(rng.uniform(0.0, 0.05))  # waiting for admission
        queue.depth -= 1
        collector.set_waiting(queue.depth)
        trace.started()
        await asyncio.sleep(rng.uniform(0.03, 0.12))  # prefill
        for _ in range(rng.randint(4, 24)):
            trace.token()
            await asyncio.sleep(rng.uniform(0.01, 0.04))  # one decode step
        if rng.random() < 0.05:
            trace.fail("DeadlineExceeded", "stage 1 did not answer within 30 s")
        else:
            trace.finish("stop" if rng.random() < 0.7 else "length")
    except asyncio.CancelledError:
        trace.finish("abort")
        raise


async def demo_traffic(collector: MetricsCollector, queue: DemoQueue) -> None:
    rng = random.Random(7)
    running: set[asyncio.Task[None]] = set()
    while True:
        task = asyncio.create_task(demo_request(collector, queue, rng))
        running.add(task)
        task.add_done_callback(running.discard)
        await asyncio.sleep(rng.expovariate(4.0))  # about four requests a second


async def main(args: argparse.Namespace) -> None:
    collector = MetricsCollector("example", collection_interval=1.0, role="coordinator")
    collector.set_model_info("demo-model", "none", num_layers=30, num_stages=1)
    health = HealthMonitor(
        "example",
        thresholds=Thresholds(memory_warning=75.0, memory_critical=90.0, cpu_warning=70.0),
        metrics_collector=collector,
        check_interval=5.0,
    )
    queue = DemoQueue(limit=32)
    health.register_check(
        HealthCheck(
            name="request_queue",
            description="Requests waiting for admission",
            check_function=queue.check,
            interval_seconds=2.0,
        )
    )
    health.set_service_state(serving=True, model_loaded=True, message="demo traffic")

    await collector.start()
    await health.start()
    dashboard = MonitoringDashboard(collector, health, host=args.host, port=args.port)
    await dashboard.start()
    print(f"dashboard: {dashboard.url}/   API: {dashboard.url}/api/stats   {dashboard.url}/metrics")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    traffic = asyncio.create_task(demo_traffic(collector, queue))
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=args.duration or None)
        async with httpx.AsyncClient(base_url=dashboard.url) as http:
            stats = (await http.get("/api/stats")).json()
            health_summary = (await http.get("/api/health")).json()
        e2e = stats["latency"]["e2e"]
        p50 = f"{e2e['p50'] * 1000:.0f} ms" if e2e["p50"] is not None else "n/a"
        print(
            f"{stats['requests_total']} requests, {stats['generation_tokens_total']} tokens, "
            f"e2e p50 {p50}, health {health_summary['overall_status']}"
        )
    finally:
        traffic.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await traffic
        await dashboard.stop()
        await health.stop()
        await collector.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 = any free port")
    parser.add_argument(
        "--duration", type=float, default=0.0, help="seconds to run (0: until Ctrl-C)"
    )
    asyncio.run(main(parser.parse_args()))
