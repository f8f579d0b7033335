"""Small fakes shared by unit tests: a settable clock and a canned device sample."""

from __future__ import annotations

from mlx_relay.monitoring.snapshot import DeviceMetrics


class FakeClock:
    """A clock that returns ``now`` until told otherwise."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def at(self, t: float) -> None:
        self.now = t


def canned_device_metrics(sampled_at: float) -> DeviceMetrics:
    """A device sample with fixed, hand-checkable values (CPU 0.25, memory 600 of 1000)."""
    return DeviceMetrics(
        platform="Test-x",
        sampled_at=sampled_at,
        cpu_count=2,
        cpu_utilization_ratio=0.25,
        memory_total_bytes=1000,
        memory_available_bytes=400,
        memory_used_bytes=600,
        memory_used_ratio=0.6,
        process_resident_memory_bytes=100,
        process_cpu_seconds_total=1.0,
        process_threads=3,
        disk_path="/",
        disk_used_ratio=0.5,
        disk_free_bytes=10,
    )
