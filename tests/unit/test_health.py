"""HealthMonitor: thresholds, custom checks (sync, async, raising, hanging), rollup, lifecycle."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from mlx_relay.core.config import Thresholds
from mlx_relay.monitoring import HealthCheck, HealthMonitor, HealthStatus, MetricsCollector
from mlx_relay.monitoring.health_rules import (
    Level,
    PeerState,
    judge_peers,
    judge_process,
    worst_status,
)

H, W, C, U = HealthStatus.HEALTHY, HealthStatus.WARNING, HealthStatus.CRITICAL, HealthStatus.UNKNOWN


def monitor(readings: dict[str, float | None] | None = None, **kwargs: Any) -> HealthMonitor:
    values = readings if readings is not None else {"memory": 10.0, "cpu": 10.0, "disk": 10.0}
    process = {
        "rss_bytes": 100 * 2**20,
        "memory_total_bytes": 8 * 2**30,
        "threads": 5,
        "open_fds": 10,
        "fd_limit": 1024,
    }
    return HealthMonitor(
        "w0", resource_reader=lambda: values, process_reader=lambda: process, **kwargs
    )


def ok() -> dict[str, Any]:
    return {"status": HealthStatus.HEALTHY, "message": "fine", "details": {"n": 1}}


def test_rollup_is_the_worst_status() -> None:
    assert worst_status([]) is U
    assert worst_status([H, H]) is H
    assert worst_status([H, W]) is W
    assert worst_status([W, U]) is U
    assert worst_status([U, C, W, H]) is C
    assert HealthStatus("critical") is C and C.value == "critical"


async def test_resource_thresholds_and_transitions() -> None:
    readings: dict[str, float | None] = {"memory": 50.0, "cpu": None, "disk": 10.0}
    m = monitor(readings)
    assert (await m.run_check("system_resources"))["status"] is H
    readings["memory"] = 86.0  # default warning 85, critical 95
    result = await m.run_check("system_resources")
    assert result["status"] is W
    assert result["message"] == "memory 86.0% >= 85% (warning)"
    assert result["details"]["memory_percent"] == 86.0
    readings["memory"] = 96.0
    readings["disk"] = 90.0
    result = await m.run_check("system_resources")
    assert result["status"] is C
    assert result["message"] == "memory 96.0% >= 95% (critical); disk 90.0% >= 85% (warning)"
    m.memory_critical_threshold = 97.0
    m.memory_warning_threshold = 96.5
    m.disk_warning_threshold = 91.0
    assert (await m.run_check("system_resources"))["status"] is H
    readings["cpu"] = 99.0
    assert (await m.run_check("system_resources"))["status"] is C  # cpu critical at 98
    transitions = [
        (t["from_status"], t["to_status"])
        for t in m.get_health_summary()["transitions"]
        if t["check"] == "system_resources"
    ]
    assert transitions == [
        ("unknown", "healthy"),
        ("healthy", "warning"),
        ("warning", "critical"),
        ("critical", "healthy"),
        ("healthy", "critical"),
    ]


async def test_thresholds_come_from_config() -> None:
    m = monitor({"memory": 72.0}, thresholds=Thresholds(memory_warning=70, memory_critical=80))
    assert (m.memory_warning_threshold, m.memory_critical_threshold) == (70.0, 80.0)
    assert (await m.run_check("system_resources"))["status"] is W


async def test_no_readings_is_unknown() -> None:
    m = monitor({"memory": None, "cpu": None, "disk": None})
    assert (await m.run_check("system_resources"))["status"] is U


def test_process_verdict() -> None:
    levels = Level(50.0, 90.0)
    assert judge_process(100, 1000, 4, 10, 1000, levels)["status"] is H
    assert judge_process(600, 1000, 4, 10, 1000, levels)["status"] is W
    fds = judge_process(100, 1000, 4, 990, 1000, levels)
    assert fds["status"] is C and fds["details"]["open_fds_percent"] == 99.0
    assert judge_process(100, 1000, 4, None, None, levels)["details"]["open_fds"] is None


async def test_process_health_reads_this_process() -> None:
    m = HealthMonitor("w0")
    result = await m.run_check("process_health")
    assert result["status"] is H
    assert result["details"]["resident_memory_bytes"] > 10 * 2**20
    assert result["details"]["threads"] >= 1


async def test_custom_checks_sync_async_raising() -> None:
    m = monitor()

    async def async_warning() -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"status": HealthStatus.WARNING, "message": "slow disk", "details": {}}

    def raising() -> dict[str, Any]:
        raise OSError("sensor unplugged")

    m.register_check(HealthCheck("custom_sync", "sync", ok, interval_seconds=5))
    m.register_check(HealthCheck("custom_async", "async", async_warning))
    m.register_check(HealthCheck("custom_raise", "raises", raising))
    m.register_check(HealthCheck("custom_bad", "bad result", lambda: 42))  # type: ignore[arg-type, return-value]
    results = await m.run_all_checks()
    assert results["custom_sync"] == {"status": H, "message": "fine", "details": {"n": 1}}
    assert results["custom_async"]["status"] is W
    assert results["custom_raise"]["status"] is C
    assert "sensor unplugged" in results["custom_raise"]["message"]
    assert results["custom_bad"]["status"] is C
    summary = m.get_health_summary()
    assert summary["overall_status"] == "critical"
    assert summary["checks"]["custom_sync"]["interval_seconds"] == 5
    assert summary["checks"]["custom_sync"]["details"] == {"n": 1}
    assert summary["checks"]["custom_raise"]["duration_seconds"] >= 0
    m.unregister_check("custom_raise")
    m.unregister_check("custom_bad")
    m.set_service_state(serving=True, model_loaded=True)
    assert m.overall_status is W  # custom_async remains
    with pytest.raises(KeyError):
        await m.run_check("custom_raise")


async def test_hanging_checks_time_out_without_blocking_the_loop() -> None:
    m = monitor()
    release = threading.Event()

    def hangs_in_a_thread() -> dict[str, Any]:
        release.wait(10)
        return ok()

    async def hangs_async() -> dict[str, Any]:
        await asyncio.sleep(10)
        return ok()

    m.register_check(HealthCheck("blocking", "sync hang", hangs_in_a_thread, timeout_seconds=0.3))
    m.register_check(HealthCheck("sleeping", "async hang", hangs_async, timeout_seconds=0.3))
    m.register_check(HealthCheck("quick", "fine", ok))
    ticks = 0

    async def heartbeat() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    beat = asyncio.create_task(heartbeat())
    try:
        results = await m.run_all_checks()
        assert ticks >= 5  # the loop kept running while the blocking check hung
        assert results["blocking"]["status"] is C
        assert "timed out" in results["blocking"]["message"]
        assert results["sleeping"]["status"] is C
        assert "timed out" in results["sleeping"]["message"]
        assert results["quick"]["status"] is H
        # While the first run is still stuck in its thread, a new run joins it (no second
        # thread) and times out in turn.
        again = await m.run_check("blocking")
        assert again["status"] is C and "timed out" in again["message"]
    finally:
        release.set()
        beat.cancel()
    for _ in range(200):
        if (await m.run_check("blocking"))["status"] is H:
            break
        await asyncio.sleep(0.01)
    assert m.get_check("blocking").status == "healthy"
    await m.stop()


async def test_service_and_peer_state_update_at_once() -> None:
    m = monitor()
    assert m.get_check("service_availability").status == "unknown"
    m.set_service_state(serving=True, model_loaded=False, message="loading layers 0-14")
    check = m.get_check("service_availability")
    assert (check.status, check.message) == ("warning", "loading layers 0-14")
    m.set_service_state(serving=True, model_loaded=True)
    assert m.get_check("service_availability").status == "healthy"
    m.set_service_state(serving=False, model_loaded=True)
    assert m.get_check("service_availability").status == "critical"
    assert (await m.run_check("distributed_health"))["status"] is H  # no peers known
    m.set_peer_states({"w1": (True, True), "w2": (True, False, "memory critical")})
    peers = m.get_check("distributed_health")
    assert (peers.status, peers.message) == ("warning", "unhealthy: w2")
    m.set_peer_states({"w1": PeerState(False, False, "connection refused"), "w2": (True, True)})
    peers = m.get_check("distributed_health")
    assert (peers.status, peers.message) == ("critical", "unreachable: w1")
    assert peers.details["peers"]["w1"]["message"] == "connection refused"


async def test_rolled_up_status_reaches_the_collector_and_listeners() -> None:
    collector = MetricsCollector("w0")
    seen: list[HealthStatus] = []
    m = monitor(metrics_collector=collector)
    m.add_listener(seen.append)
    m.set_service_state(serving=True, model_loaded=True)
    await m.run_all_checks()
    own = collector.snapshot().devices["w0"]
    assert (own.health_status, own.is_healthy) == ("healthy", True)
    m.set_service_state(serving=False, model_loaded=False)
    own = collector.snapshot().devices["w0"]
    assert (own.health_status, own.is_healthy) == ("critical", False)
    assert seen == [H, C]


async def test_start_runs_checks_on_their_intervals_and_stop_cancels() -> None:
    m = monitor(check_interval=0.05)
    runs = 0

    def counted() -> dict[str, Any]:
        nonlocal runs
        runs += 1
        return ok()

    m.register_check(HealthCheck("counted", "counts", counted, interval_seconds=0.05))
    await m.start()
    deadline = time.monotonic() + 5
    while runs < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert runs >= 3
    assert m.get_check("system_resources").last_run_timestamp is not None
    await m.stop()
    # Stopped means no check task is left at all, not "nothing seen for a while".
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
    stopped_at = runs
    await m.run_check("counted")  # on demand it still runs, exactly once
    assert runs == stopped_at + 1


async def test_spec_usage_works_as_written() -> None:
    # The monitoring API's documented usage (docs/monitoring-api.md), with mlx_relay imports.
    from mlx_relay.monitoring.health import HealthCheck, HealthStatus

    metrics_collector = MetricsCollector(device_id="coordinator", collection_interval=2.0)
    health_monitor = HealthMonitor(device_id="coordinator")
    await metrics_collector.start()
    await health_monitor.start()
    try:
        metrics_collector.update_device_status(
            device_id="device1", model_loaded=True, assigned_layers=[0, 1, 2], is_healthy=True
        )
        health_monitor.memory_warning_threshold = 75.0
        health_monitor.memory_critical_threshold = 90.0
        health_monitor.cpu_warning_threshold = 70.0

        def custom_check() -> dict[str, Any]:
            return {
                "status": HealthStatus.HEALTHY,
                "message": "Custom check passed",
                "details": {"custom_metric": 42},
            }

        health_monitor.register_check(
            HealthCheck(
                name="custom_check",
                description="Custom application health check",
                check_function=custom_check,
                interval_seconds=30.0,
            )
        )
        await health_monitor.run_check("custom_check")
        health_data = health_monitor.get_health_summary()
        assert health_data["checks"]["custom_check"]["details"] == {"custom_metric": 42}
        assert health_data["overall_status"] in ("healthy", "warning", "critical", "unknown")
        metrics = metrics_collector.export_metrics()
        assert metrics["devices"]["device1"]["assigned_layers"] == [0, 1, 2]
        assert metrics["device"]["memory_total_bytes"] > 0
        assert metrics_collector.get_throughput()["requests_per_second"] == 0.0
    finally:
        await health_monitor.stop()
        await metrics_collector.stop()


def test_set_peer_state_updates_one_peer_and_keeps_the_others() -> None:
    m = HealthMonitor("c", check_interval=60.0)
    m.set_peer_state("w1", PeerState(True, True))
    m.set_peer_state("w2", PeerState(False, False, "connection refused"))
    check = m.get_health_summary()["checks"]["distributed_health"]
    assert check["status"] == "critical" and check["message"] == "unreachable: w2"
    m.set_peer_state("w2", PeerState(True, True))
    check = m.get_health_summary()["checks"]["distributed_health"]
    assert check["status"] == "healthy" and set(check["details"]["peers"]) == {"w1", "w2"}


def test_a_stage_that_lost_a_replica_is_degraded_and_one_that_lost_all_is_down() -> None:
    up, down = PeerState(True, True, stage=0), PeerState(False, False, "refused", stage=1)
    degraded = judge_peers({"a": up, "b": PeerState(True, True, stage=1), "b2": down})
    assert degraded["status"] == HealthStatus.WARNING
    assert degraded["message"] == "stage 1 degraded (b2 unreachable)"
    assert degraded["details"]["stages"] == {
        "0": {"replicas": ["a"], "status": "healthy"},
        "1": {"replicas": ["b", "b2"], "status": "degraded"},
    }
    lost = judge_peers({"a": up, "b": PeerState(False, False, stage=1), "b2": down})
    assert lost["status"] == HealthStatus.CRITICAL
    assert lost["message"] == "unreachable: b, b2"
    assert lost["details"]["stages"]["1"]["status"] == "down"
