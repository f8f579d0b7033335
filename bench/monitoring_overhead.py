"""What monitoring costs: sampling CPU, recording cost and memory, and decode speed on vs off.

    .venv/bin/python bench/monitoring_overhead.py                 # all sections
    .venv/bin/python bench/monitoring_overhead.py --only sampling memory
    .venv/bin/python bench/monitoring_overhead.py --only decode --rounds 3 --max-tokens 24

Sections (targets from DESIGN.md: collection must not slow inference):
  sampling  CPU time the collector's sampling uses per second of wall time at a 1 s interval
            (target < 1 % of one core), and the cost of one export_metrics() snapshot.
  memory    RSS after 1,000,000 recorded requests vs after 1,000 (target growth < 5 MB), and
            the cost of recording one request.
  decode    Decode tokens/s of a 2-worker loopback pipeline on the bundled model, monitoring on
            vs off (workers and coordinator), alternating runs; medians and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

from mlx_relay.monitoring import MetricsCollector
from mlx_relay.monitoring.device import DeviceSampler
from mlx_relay.monitoring.snapshot import DeviceMetrics

ROOT = Path(__file__).resolve().parent.parent


class _TimedSampler:
    """Wraps a sampler and adds up the CPU time of its own thread."""

    def __init__(self) -> None:
        self.inner = DeviceSampler()
        self.cpu_seconds = 0.0
        self.wall_seconds = 0.0
        self.samples = 0

    def sample(self) -> DeviceMetrics:
        cpu, wall = time.thread_time(), time.perf_counter()
        result = self.inner.sample()
        self.cpu_seconds += time.thread_time() - cpu
        self.wall_seconds += time.perf_counter() - wall
        self.samples += 1
        return result


async def sampling_cpu(seconds: float, interval: float = 1.0) -> None:
    print(f"\n== sampling: collector at a {interval:g} s interval for {seconds:g} s ==")
    sampler = _TimedSampler()
    collector = MetricsCollector("bench", interval, device_sampler=sampler)
    process = psutil.Process()
    cpu0 = sum(process.cpu_times()[:2])
    wall0 = time.perf_counter()
    await collector.start()
    await asyncio.sleep(seconds)
    await collector.stop()
    wall = time.perf_counter() - wall0
    process_cpu = sum(process.cpu_times()[:2]) - cpu0
    print(f"samples taken                  {sampler.samples}")
    print(f"sampling thread CPU            {1e3 * sampler.cpu_seconds / sampler.samples:.2f} ms")
    print(f"  per sample (wall)            {1e3 * sampler.wall_seconds / sampler.samples:.2f} ms")
    print(f"sampling CPU / wall time       {100 * sampler.cpu_seconds / wall:.3f} % of one core")
    print(f"whole process CPU / wall time  {100 * process_cpu / wall:.3f} % of one core")

    for _ in range(200):
        collector.track_request(prompt_tokens=10).finish("stop")
    start = time.perf_counter()
    rounds = 200
    for _ in range(rounds):
        collector.export_metrics()
    per_export = (time.perf_counter() - start) / rounds
    print(f"export_metrics() snapshot      {1e3 * per_export:.3f} ms")


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _record(collector: MetricsCollector, clock: _Clock, count: int, start: int) -> None:
    # A request of 4 tokens over 2 stages, about 1,000 requests per simulated second.
    for i in range(start, start + count):
        clock.now += 0.001
        trace = collector.track_request(prompt_tokens=20, queued_at=clock.now - 0.002)
        trace.started()
        for _ in range(4):
            trace.stage_time("worker-0", 0.002)
            trace.token()
        collector.record_rpc("worker-1", "Forward", 0.003, "OK", 2048, 64)
        collector.record_transfer("worker-1", 0.0005)
        if i % 50:
            trace.finish("stop")
        else:
            trace.fail("WorkerUnavailable", "worker 'worker-1': connection refused")


def memory_growth(total: int) -> None:
    print(f"\n== memory: {total:,} recorded requests ==")
    clock = _Clock()
    collector = MetricsCollector("bench", role="coordinator", clock=clock)
    process = psutil.Process()
    _record(collector, clock, 1000, 0)
    collector.snapshot()
    gc.collect()
    rss_small = process.memory_info().rss
    start = time.perf_counter()
    _record(collector, clock, total - 1000, 1000)
    elapsed = time.perf_counter() - start
    snapshot = collector.snapshot()
    gc.collect()
    rss_large = process.memory_info().rss
    growth = rss_large - rss_small
    print(f"RSS after 1,000 requests       {rss_small / 2**20:.1f} MiB")
    print(f"RSS after {total:,} requests  {rss_large / 2**20:.1f} MiB")
    print(f"growth                         {growth / 2**20:.2f} MiB (target < 5 MB)")
    per_request = elapsed / (total - 1000)
    print(f"recording one request          {1e6 * per_request:.1f} us (track, 4 tokens, rpc, ...)")
    print(f"requests counted               {snapshot.inference.requests_total:,}")


def decode_with_monitoring(
    rounds: int, max_tokens: int, prompt: str
) -> tuple[list[float], list[float]]:
    """Decode tokens/s of two 2-worker loopback clusters (monitoring on / off), alternating.

    Both clusters run for the whole comparison (worker subprocesses, bundled model), and the
    runs alternate so that background load on the machine affects both sides alike.
    """
    sys.path.insert(0, str(ROOT))
    from mlx_relay.coordinator.requests import InferenceRequest
    from mlx_relay.core.config import ModelConfig
    from mlx_relay.model.load import resolve_model_dir
    from tests.support.cluster import process_cluster

    model_dir = resolve_model_dir(ModelConfig(), progress=False)

    async def run() -> tuple[list[float], list[float]]:
        with tempfile.TemporaryDirectory() as on_dir, tempfile.TemporaryDirectory() as off_dir:
            async with (
                process_cluster(
                    model_dir, Path(on_dir), 2, enable_monitoring=True, worker_monitoring=True
                ) as on,
                process_cluster(
                    model_dir, Path(off_dir), 2, enable_monitoring=False, worker_monitoring=False
                ) as off,
            ):
                speeds: dict[bool, list[float]] = {True: [], False: []}
                for round_index in range(rounds + 1):  # round 0 warms both up
                    for monitored, cluster in ((True, on), (False, off)):
                        request = InferenceRequest(
                            messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens
                        )
                        response = await cluster.orchestrator.process_request(request)
                        tokens = response.usage.completion_tokens
                        decode = response.timings.decode
                        if round_index and tokens > 1 and decode > 0:
                            speeds[monitored].append((tokens - 1) / decode)
                return speeds[True], speeds[False]

    return asyncio.run(run())


def decode_section(rounds: int, max_tokens: int) -> None:
    print(f"\n== decode: 2 workers, bundled model, {rounds} alternating rounds ==")
    prompt = "Write a long story about a lighthouse keeper who finds a map."
    on, off = decode_with_monitoring(rounds, max_tokens, prompt)
    if not on or not off:
        print("no decode measurements: every run stopped after its first token")
        return
    median_on, median_off = statistics.median(on), statistics.median(off)
    print(f"monitoring on   tok/s per run  {', '.join(f'{s:.2f}' for s in on)}")
    print(f"monitoring off  tok/s per run  {', '.join(f'{s:.2f}' for s in off)}")
    print(f"median on / off                {median_on:.2f} / {median_off:.2f} tok/s")
    print(f"ratio on/off                   {median_on / median_off:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", choices=["sampling", "memory", "decode"])
    parser.add_argument("--seconds", type=float, default=20.0, help="sampling section length")
    parser.add_argument("--requests", type=int, default=1_000_000, help="memory section size")
    parser.add_argument("--rounds", type=int, default=5, help="decode runs per side")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per decode run")
    args = parser.parse_args()
    sections = set(args.only or ["sampling", "memory", "decode"])
    if "sampling" in sections:
        asyncio.run(sampling_cpu(args.seconds))
    if "memory" in sections:
        memory_growth(args.requests)
    if "decode" in sections:
        decode_section(args.rounds, args.max_tokens)


if __name__ == "__main__":
    main()
