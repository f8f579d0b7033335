"""What the history store costs: recording, disk, queries and the collector's CPU.

    .venv/bin/python bench/history.py                     # all sections
    .venv/bin/python bench/history.py --only record disk
    .venv/bin/python bench/history.py --only cpu --seconds 60

Sections (each printed with its target):
  record  amortized cost of recording one sample (HistoryStore.record, one call per
          collection tick of a 2-worker coordinator's series; target < 5 us), and the whole
          tick (snapshot, metric families, record) per sample, for reference.
  disk    bytes on disk per raw sample: a simulated coordinator at a 1 s interval for
          --hours hours through the real recorder (target <= 8 bytes; rollups and indexes
          included in the file size).
  query   a 24 h query at 1-minute points over 10 series (target < 50 ms; median).
  cpu     process CPU of a real collector at a 1 s interval, history off then on, for
          --seconds each (target < 1.5 % of one core with history on).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

from mlx_relay.core.history_config import HistoryConfig
from mlx_relay.monitoring import MetricsCollector
from mlx_relay.monitoring.history import (
    HistoryRecorder,
    HistoryStore,
    plan_query,
    tiers_from_config,
)
from mlx_relay.monitoring.history.series import GAUGE, SeriesSpec
from mlx_relay.monitoring.snapshot import DeviceMetrics

DAY = 86400.0
WORKERS = ("worker-0", "worker-1")


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class NoisySampler:
    """Device samples with realistic movement: noisy CPU, slowly drifting memory."""

    def __init__(self, clock: Clock, seed: int = 1) -> None:
        self._clock = clock
        self._rng = random.Random(seed)
        self._memory = 8 << 30
        self._cpu_seconds = 0.0
        self._rx = 10**9

    def sample(self) -> DeviceMetrics:
        rng = self._rng
        self._memory += rng.randint(-1 << 20, 1 << 20)
        self._cpu_seconds += rng.uniform(0.0, 0.05)
        self._rx += rng.randint(0, 50_000)
        return DeviceMetrics(
            platform="Linux-x86_64",
            sampled_at=self._clock(),
            cpu_count=8,
            cpu_utilization_ratio=rng.uniform(0.02, 0.4),
            memory_total_bytes=16 << 30,
            memory_available_bytes=(16 << 30) - self._memory,
            memory_used_bytes=self._memory,
            memory_used_ratio=self._memory / (16 << 30),
            process_resident_memory_bytes=(300 << 20) + rng.randint(0, 1 << 16),
            process_cpu_seconds_total=self._cpu_seconds,
            process_threads=20,
            disk_path="/",
            disk_used_ratio=0.5,
            disk_free_bytes=100 << 30,
            network_receive_bytes_total=self._rx,
            network_transmit_bytes_total=self._rx // 2,
        )


def coordinator(clock: Clock, wall: Clock) -> tuple[MetricsCollector, list[MetricsCollector]]:
    """A coordinator collector with two workers' snapshots, as a 2-worker cluster has."""
    coord = MetricsCollector(
        "coordinator", 1.0, role="coordinator", clock=clock, wall_clock=wall,
        device_sampler=NoisySampler(wall),
    )  # fmt: skip
    coord.set_model_info("bench-model", "q4", 30, 2)
    workers = []
    for i, name in enumerate(WORKERS):
        worker = MetricsCollector(
            name, 1.0, clock=clock, wall_clock=wall, device_sampler=NoisySampler(wall, i + 2)
        )
        worker.update_device_status(name, stage=i, assigned_layers=list(range(15 * i, 15 * i + 15)))
        coord.add_peer(name)
        workers.append(worker)
    return coord, workers


def tick(
    coord: MetricsCollector, workers: list[MetricsCollector], clock: Clock, rng: random.Random
) -> None:
    """One simulated second: a few requests, stage forwards, pings, fresh device samples."""
    for _ in range(rng.randint(0, 3)):
        trace = coord.track_request(prompt_tokens=rng.randint(5, 50))
        trace.started()
        for _ in range(rng.randint(1, 8)):
            trace.token()
        trace.finish("stop")
    for i, worker in enumerate(workers):
        worker.record_stage_forward(i, "decode", rng.uniform(0.001, 0.004), 1)
        worker.record_device_sample(worker._sampler.sample())
        coord.update_remote_snapshot(worker.device_id, worker.export_metrics())
        coord.record_ping(worker.device_id, rng.uniform(0.0002, 0.001))
        coord.record_rpc(worker.device_id, "Forward", rng.uniform(0.002, 0.005), "OK", 4096, 64)
    coord.record_device_sample(coord._sampler.sample())
    clock.now += 1.0


def new_store(path: Path, **kwargs: object) -> HistoryStore:
    tiers = tiers_from_config(HistoryConfig(), 1.0)
    store = HistoryStore(path, tiers, **kwargs)  # type: ignore[arg-type]
    store.start()
    return store


def section_record(work: Path, ticks: int) -> None:
    print("\n== record: amortized cost of one sample ==")
    now = time.time()
    clock, wall = Clock(1000.0), Clock(now - ticks)
    coord, workers = coordinator(clock, wall)
    rng = random.Random(3)
    store = new_store(work / "record.sqlite", queue_size=1 << 20)
    recorder = HistoryRecorder(store, coord)
    batches = []
    for _ in range(ticks):
        tick(coord, workers, clock, rng)
        wall.now += 1.0
        snapshot = coord.snapshot()
        from mlx_relay import __version__
        from mlx_relay.monitoring.prometheus_families import snapshot_families

        batches.append(
            (
                snapshot.timestamp,
                list(recorder._catalog.samples(snapshot_families(snapshot, None, __version__))),
            )
        )
    per_tick = len(batches[0][1])
    timings: list[float] = []
    rounds: list[tuple[float, float]] = []
    store.flush(120)
    size = max(10, len(batches) // 5)
    for first in range(0, len(batches), size):
        chunk = batches[first : first + size]
        cpu, begin = time.process_time(), time.perf_counter()
        for i, (timestamp, samples) in enumerate(chunk):
            start = time.perf_counter()
            store.record(timestamp, samples)
            timings.append((time.perf_counter() - start) / len(samples))
            if i % 10 == 9:  # a commit per 10 ticks, as flush_interval 10 s at a 1 s interval
                store.flush(120)
        store.flush(120)  # until the writer has packed and committed every one
        count = sum(len(samples) for _, samples in chunk)
        rounds.append(((time.process_time() - cpu) / count, (time.perf_counter() - begin) / count))
    caller = 1e6 * statistics.median(timings)
    cpu_us = 1e6 * statistics.median(r[0] for r in rounds)
    wall_us = 1e6 * statistics.median(r[1] for r in rounds)
    print(f"series per tick                {per_tick}")
    print(f"record() call per sample       {caller:.3f} us   (the caller: one queue put per tick)")
    print(f"recorded and committed, CPU    {cpu_us:.3f} us per sample   (target < 5 us)")
    print(f"  the same in wall time        {wall_us:.3f} us per sample   (median of {len(rounds)})")
    whole = []
    for _ in range(200):
        tick(coord, workers, clock, rng)
        wall.now += 1.0
        start = time.perf_counter()
        count = recorder.record_once()
        whole.append((time.perf_counter() - start) / count)
    tick_us = 1e6 * statistics.median(whole)
    print(f"whole tick per sample          {tick_us:.3f} us   (snapshot, families, record)")
    store.close()


def section_disk(work: Path, hours: float) -> None:
    print(f"\n== disk: {hours:g} h of a 2-worker coordinator at a 1 s interval ==")
    ticks = int(hours * 3600)
    start = time.time() - ticks - 10
    clock, wall = Clock(1000.0), Clock(start)
    coord, workers = coordinator(clock, wall)
    path = work / "disk.sqlite"
    store = new_store(path, queue_size=1 << 20, wall_clock=wall)
    recorder = HistoryRecorder(store, coord)
    rng = random.Random(5)
    for i in range(ticks):
        tick(coord, workers, clock, rng)
        wall.now += 1.0
        recorder.record_once()
        if i % 600 == 599:
            store.flush(120)
    store.flush(120)
    stats = store.stats()
    store.close()
    size = path.stat().st_size
    raw = stats.samples_written
    print(f"series                         {stats.series}")
    print(f"raw samples                    {raw:,}")
    print(f"file size                      {size / 1e6:.2f} MB ({stats.block_rows:,} block rows)")
    print(f"bytes per raw sample           {size / raw:.2f}   (target <= 8; the whole file)")


def section_query(work: Path) -> None:
    print("\n== query: 24 h at 1-minute points over 10 series ==")
    now = time.time()
    store = new_store(work / "query.sqlite", queue_size=1 << 20)
    specs = [
        SeriesSpec(f"bench_series_{i}", f"bench_series_{i}", (), GAUGE, "ratio") for i in range(10)
    ]
    rng = random.Random(9)
    start = now - DAY
    for second in range(int(DAY)):
        store.record(start + second, [(s, rng.random()) for s in specs])
        if second % 20_000 == 0:
            store.flush(120)
    store.flush(120)
    tiers = store.tiers
    timings = []
    cpu_times = []
    for _ in range(15):
        t0, c0 = time.perf_counter(), time.process_time()
        plan = plan_query(tiers, time.time(), after=-DAY, points=1440)
        result = store.query([s.key for s in specs], plan, "avg")
        timings.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    filled = sum(v is not None for _, values in result for v in values)
    tier = plan.tier
    print(f"tier read                      {tier.index} ({tier.interval:g} s points)")
    print(f"points                         {plan.points} x 10 series, {filled} filled")
    median_ms = 1e3 * statistics.median(timings)
    print(f"query time (median of 15)      {median_ms:.2f} ms   (target < 50 ms)")
    cpu_ms = 1e3 * statistics.median(cpu_times)
    print(f"  its CPU time                 {cpu_ms:.2f} ms")
    store.close()


async def _collector_cpu(seconds: float, history: Path | None) -> float:
    collector = MetricsCollector("coordinator", 1.0, role="coordinator")
    _, workers = coordinator(Clock(1000.0), Clock(time.time()))
    for worker in workers:
        worker.record_device_sample(worker._sampler.sample())
        collector.update_remote_snapshot(worker.device_id, worker.export_metrics())
    recorder = None
    if history is not None:
        store = new_store(history)
        recorder = HistoryRecorder(store, collector, interval=1.0)
    process = psutil.Process()
    await collector.start()
    if recorder is not None:
        await recorder.start()
    cpu0, wall0 = sum(process.cpu_times()[:2]), time.perf_counter()
    await asyncio.sleep(seconds)
    cpu, wall = sum(process.cpu_times()[:2]) - cpu0, time.perf_counter() - wall0
    if recorder is not None:
        await recorder.stop()
        recorder.store.close()
    await collector.stop()
    return 100 * cpu / wall


def section_cpu(work: Path, seconds: float) -> None:
    print(f"\n== cpu: collector at a 1 s interval, {seconds:g} s per side ==")
    off = asyncio.run(_collector_cpu(seconds, None))
    on = asyncio.run(_collector_cpu(seconds, work / "cpu.sqlite"))
    print(f"process CPU, history off       {off:.3f} % of one core")
    print(f"process CPU, history on        {on:.3f} % of one core   (target < 1.5 %)")
    print(f"history's share                {on - off:+.3f} % of one core")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", choices=["record", "disk", "query", "cpu"])
    parser.add_argument("--ticks", type=int, default=600, help="record section: ticks")
    parser.add_argument("--hours", type=float, default=1.0, help="disk section: simulated hours")
    parser.add_argument("--seconds", type=float, default=30.0, help="cpu section: seconds per side")
    args = parser.parse_args()
    sections = set(args.only or ["record", "disk", "query", "cpu"])
    print(f"python {sys.version.split()[0]}, {psutil.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="mlx-relay-history-bench-") as tmp:
        work = Path(tmp)
        if "record" in sections:
            section_record(work, args.ticks)
        if "disk" in sections:
            section_disk(work, args.hours)
        if "query" in sections:
            section_query(work)
        if "cpu" in sections:
            section_cpu(work, args.seconds)


if __name__ == "__main__":
    main()
