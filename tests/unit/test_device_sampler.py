"""DeviceSampler on this machine: real psutil and MLX readings, pure CPU arithmetic."""

from __future__ import annotations

import platform
from collections import namedtuple

import mlx.core as mx
import pytest

from mlx_relay.monitoring.device import DeviceSampler, NvmlReader, busy_ratio

CpuTimes = namedtuple("CpuTimes", "user nice system idle iowait guest guest_nice")


def test_busy_ratio_by_hand() -> None:
    before = CpuTimes(10.0, 0.0, 5.0, 80.0, 5.0, 0.0, 0.0)
    after = CpuTimes(13.0, 0.0, 6.0, 85.0, 6.0, 1.0, 0.0)
    # total 3 + 1 + 5 + 1 = 10 s (guest is inside user); idle + iowait = 6 s -> 40 % busy.
    assert busy_ratio(before, after) == pytest.approx(0.4)
    assert busy_ratio(after, after) is None


def test_rss_follows_a_real_allocation() -> None:
    sampler = DeviceSampler(gpu="none")
    before = sampler.sample().process_resident_memory_bytes
    block = bytearray(200 * 2**20)
    for offset in range(0, len(block), 4096):  # touch every page so it becomes resident
        block[offset] = 1
    after = sampler.sample().process_resident_memory_bytes
    del block
    assert after - before >= 150 * 2**20


def test_cpu_needs_two_readings_then_gives_ratios() -> None:
    sampler = DeviceSampler(gpu="none")
    first = sampler.sample()
    assert first.cpu_utilization_ratio is None
    assert first.cpu_unavailable_reason and "first sample" in first.cpu_unavailable_reason
    sum(i * i for i in range(300_000))  # burn a little CPU so time passes
    second = sampler.sample()
    assert second.cpu_utilization_ratio is not None
    assert 0.0 <= second.cpu_utilization_ratio <= 1.0
    assert second.cpu_per_core_ratio is not None
    assert len(second.cpu_per_core_ratio) == second.cpu_count
    assert second.cpu_unavailable_reason is None


def test_memory_disk_and_process_fields_are_consistent(tmp_path: object) -> None:
    sample = DeviceSampler(str(tmp_path), gpu="none").sample()
    assert sample.memory_used_bytes == sample.memory_total_bytes - sample.memory_available_bytes
    assert sample.memory_used_ratio == pytest.approx(
        sample.memory_used_bytes / sample.memory_total_bytes
    )
    assert 0.0 < sample.disk_used_ratio < 1.0
    assert sample.disk_path == str(tmp_path)
    assert sample.process_threads >= 1
    assert sample.process_cpu_seconds_total > 0
    assert sample.platform == f"{platform.system()}-{platform.machine()}"
    assert sample.mlx_version == getattr(mx, "__version__", None)
    assert sample.gpu_utilization_ratio is None
    assert sample.gpu_unavailable_reason == "GPU sampling disabled"


def test_mlx_memory_counters_see_an_mlx_allocation() -> None:
    sampler = DeviceSampler(gpu="none")
    base = sampler.sample().mlx_memory_active_bytes
    assert base is not None
    array = mx.zeros((1024, 1024), dtype=mx.float32)
    mx.eval(array)
    sample = sampler.sample()
    assert sample.mlx_memory_active_bytes is not None
    assert sample.mlx_memory_active_bytes - base >= 4 * 2**20
    assert sample.mlx_memory_peak_bytes is not None
    assert sample.mlx_memory_peak_bytes >= sample.mlx_memory_active_bytes
    del array


@pytest.mark.skipif(platform.system() == "Darwin", reason="macOS reads the GPU through ioreg")
def test_gpu_is_absent_with_a_reason_without_nvidia() -> None:
    if NvmlReader().available:
        pytest.skip("an NVIDIA GPU answers NVML on this machine")
    sample = DeviceSampler().sample()
    assert sample.gpu_utilization_ratio is None
    assert sample.gpu_memory_used_bytes is None
    assert sample.gpu_unavailable_reason is not None
    assert "NVML" in sample.gpu_unavailable_reason
    assert "not macOS" in sample.gpu_unavailable_reason


def test_nvidia_gpu_is_read_through_nvml() -> None:
    reader = NvmlReader()
    if not reader.available:
        pytest.skip(f"no NVIDIA GPU here: {reader.unavailable_reason}")
    sample = DeviceSampler().sample()
    assert sample.gpu_source == "nvml"
    assert sample.gpu_utilization_ratio is not None
    assert 0.0 <= sample.gpu_utilization_ratio <= 1.0
    assert sample.gpu_memory_total_bytes and sample.gpu_memory_used_bytes is not None
    assert sample.gpu_memory_used_bytes <= sample.gpu_memory_total_bytes
