"""Sampling this machine's resources: psutil, MLX memory, and the GPU through NVML or ioreg.

:class:`DeviceSampler.sample` is blocking (it may run a subprocess on macOS), so the collector
calls it through ``asyncio.to_thread``; it never touches MLX arrays, only MLX's memory
counters, which are safe to read from any thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psutil

from mlx_relay.monitoring.ioreg import IOREG_COMMAND, parse_ioreg
from mlx_relay.monitoring.snapshot import DeviceMetrics

logger = logging.getLogger(__name__)


def busy_ratio(previous: Any, current: Any) -> float | None:
    """Busy share of CPU time between two ``psutil.cpu_times()`` readings, 0..1.

    Idle and iowait count as idle; guest time is already inside user/nice on Linux so it is
    not added twice. None when no time passed.
    """
    fields = current._fields
    deltas = {f: getattr(current, f) - getattr(previous, f) for f in fields}
    total = sum(v for f, v in deltas.items() if f not in ("guest", "guest_nice"))
    idle = deltas.get("idle", 0.0) + deltas.get("iowait", 0.0)
    if total <= 0:
        return None
    return min(1.0, max(0.0, (total - idle) / total))


@dataclass(frozen=True)
class GpuReading:
    name: str | None = None
    source: str | None = None
    utilization_ratio: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    unavailable_reason: str | None = None


class NvmlReader:
    """NVIDIA GPUs through NVML (package ``nvidia-ml-py``); averaged utilization, summed memory."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._handles: list[Any] = []
        self.unavailable_reason: str | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            if count == 0:
                self.unavailable_reason = "NVML found no NVIDIA GPU"
                return
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            self._nvml = pynvml
        except ImportError:
            self.unavailable_reason = "NVML unavailable (nvidia-ml-py not installed)"
        except Exception as exc:  # pynvml raises NVMLError subclasses per failure kind
            self.unavailable_reason = f"no NVIDIA GPU (NVML: {exc})"

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def read(self) -> GpuReading:
        nvml = self._nvml
        if nvml is None:
            return GpuReading(unavailable_reason=self.unavailable_reason)
        try:
            utilization = [nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self._handles]
            memory = [nvml.nvmlDeviceGetMemoryInfo(h) for h in self._handles]
            name = nvml.nvmlDeviceGetName(self._handles[0])
        except Exception as exc:
            return GpuReading(source="nvml", unavailable_reason=f"NVML read failed: {exc}")
        if isinstance(name, bytes):
            name = name.decode()
        if len(self._handles) > 1:
            name = f"{name} x{len(self._handles)}"
        return GpuReading(
            name=name,
            source="nvml",
            utilization_ratio=sum(utilization) / len(utilization) / 100.0,
            memory_used_bytes=sum(int(m.used) for m in memory),
            memory_total_bytes=sum(int(m.total) for m in memory),
        )


def read_ioreg(run: Callable[[Sequence[str]], str] | None = None) -> GpuReading:
    """GPU statistics from ``ioreg`` on macOS: highest utilization, summed memory."""
    try:
        text = run(IOREG_COMMAND) if run else _run(IOREG_COMMAND)
    except (OSError, subprocess.SubprocessError) as exc:
        return GpuReading(source="ioreg", unavailable_reason=f"ioreg failed: {exc}")
    gpus = [g for g in parse_ioreg(text) if g.utilization_ratio is not None]
    if not gpus:
        return GpuReading(unavailable_reason="ioreg reports no IOAccelerator statistics")
    memory = [g.memory_used_bytes for g in gpus if g.memory_used_bytes is not None]
    return GpuReading(
        name=gpus[0].model or gpus[0].io_class,
        source="ioreg",
        utilization_ratio=max(g.utilization_ratio or 0.0 for g in gpus),
        memory_used_bytes=sum(memory) if memory else None,
    )


def _run(command: Sequence[str]) -> str:
    return subprocess.run(
        list(command), capture_output=True, text=True, timeout=5, check=True
    ).stdout


def _chip_name() -> str | None:
    if platform.system() == "Darwin":
        try:
            return _run(("sysctl", "-n", "machdep.cpu.brand_string")).strip() or None
        except (OSError, subprocess.SubprocessError):
            return None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith(("model name", "hardware")):
                    return line.split(":", 1)[1].strip() or None
    except OSError:
        pass
    return platform.processor() or None


def _mlx_info() -> tuple[str | None, str | None]:
    try:
        import mlx.core as mx

        return getattr(mx, "__version__", None), str(mx.default_device().type).rsplit(".", 1)[-1]
    except Exception as exc:  # MLX missing or no usable backend
        logger.debug("MLX information unavailable: %s", exc)
        return None, None


class DeviceSampler:
    """Reads this machine's resources into a :class:`DeviceMetrics`.

    Args:
        disk_path: Path whose filesystem is reported (default: the working directory).
        gpu: ``"auto"`` (NVML if an NVIDIA GPU answers, else ioreg on macOS), ``"nvml"``,
            ``"ioreg"`` or ``"none"``.
        wall_clock: Source of ``sampled_at`` (unix seconds), injectable for tests.
    """

    def __init__(
        self,
        disk_path: str | None = None,
        *,
        gpu: str = "auto",
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._disk_path = disk_path or os.getcwd()
        self._gpu_mode = gpu
        self._wall_clock = wall_clock
        self._process = psutil.Process()
        self._lock = threading.Lock()
        self._previous_total: Any = None
        self._previous_cores: list[Any] | None = None
        self._static: tuple[str, str | None, str | None, str | None] | None = None
        self._nvml: NvmlReader | None = None

    def _static_info(self) -> tuple[str, str | None, str | None, str | None]:
        if self._static is None:
            mlx_version, mlx_device = _mlx_info()
            platform_name = f"{platform.system()}-{platform.machine()}"
            self._static = (platform_name, _chip_name(), mlx_version, mlx_device)
        return self._static

    def _gpu(self) -> GpuReading:
        mode = self._gpu_mode
        if mode == "none":
            return GpuReading(unavailable_reason="GPU sampling disabled")
        if mode in ("auto", "nvml"):
            if self._nvml is None:
                self._nvml = NvmlReader()
            if self._nvml.available or mode == "nvml":
                return self._nvml.read()
        if mode == "ioreg" or platform.system() == "Darwin":
            return read_ioreg()
        nvml_reason = self._nvml.unavailable_reason if self._nvml else "NVML unavailable"
        return GpuReading(unavailable_reason=f"{nvml_reason}; and not macOS (no ioreg)")

    def _cpu(self) -> tuple[float | None, list[float] | None, str | None]:
        total = psutil.cpu_times()
        cores = psutil.cpu_times(percpu=True)
        with self._lock:
            previous_total, previous_cores = self._previous_total, self._previous_cores
            self._previous_total, self._previous_cores = total, cores
        if previous_total is None or previous_cores is None:
            return None, None, "first sample: utilization needs two readings"
        ratio = busy_ratio(previous_total, total)
        per_core = [busy_ratio(p, c) or 0.0 for p, c in zip(previous_cores, cores, strict=False)]
        if ratio is None:
            return None, None, "no CPU time elapsed since the previous sample"
        return ratio, per_core, None

    @staticmethod
    def _mlx_memory() -> tuple[int | None, int | None, int | None, str | None]:
        try:
            import mlx.core as mx

            return mx.get_active_memory(), mx.get_peak_memory(), mx.get_cache_memory(), None
        except Exception as exc:
            return None, None, None, f"MLX memory counters unavailable: {exc}"

    def sample(self) -> DeviceMetrics:
        """Take one sample (blocking: run it off the event loop).

        ``sampled_at`` is the instant the CPU interval ends; the other reads follow within
        the time this call takes (milliseconds).
        """
        platform_name, chip, mlx_version, mlx_device = self._static_info()
        sampled_at = self._wall_clock()
        cpu, per_core, cpu_reason = self._cpu()
        memory = psutil.virtual_memory()
        disk = psutil.disk_usage(self._disk_path)
        with self._process.oneshot():
            rss = self._process.memory_info().rss
            cpu_times = self._process.cpu_times()
            threads = self._process.num_threads()
            fds = self._process.num_fds() if hasattr(self._process, "num_fds") else None
        try:
            net = psutil.net_io_counters()
            net_reason = None if net is not None else "no network interfaces visible"
        except (OSError, RuntimeError) as exc:
            net, net_reason = None, f"network counters unavailable: {exc}"
        active, peak, cache, mlx_reason = self._mlx_memory()
        gpu = self._gpu()
        used = memory.total - memory.available
        return DeviceMetrics(
            platform=platform_name,
            chip=chip,
            mlx_version=mlx_version,
            mlx_device=mlx_device,
            sampled_at=sampled_at,
            cpu_count=psutil.cpu_count() or 1,
            cpu_utilization_ratio=cpu,
            cpu_per_core_ratio=per_core,
            cpu_unavailable_reason=cpu_reason,
            memory_total_bytes=memory.total,
            memory_available_bytes=memory.available,
            memory_used_bytes=used,
            memory_used_ratio=used / memory.total if memory.total else 0.0,
            process_resident_memory_bytes=rss,
            process_cpu_seconds_total=cpu_times.user + cpu_times.system,
            process_threads=threads,
            process_open_fds=fds,
            disk_path=self._disk_path,
            disk_used_ratio=disk.percent / 100.0,
            disk_free_bytes=disk.free,
            network_receive_bytes_total=net.bytes_recv if net else None,
            network_transmit_bytes_total=net.bytes_sent if net else None,
            network_unavailable_reason=net_reason,
            mlx_memory_active_bytes=active,
            mlx_memory_peak_bytes=peak,
            mlx_memory_cache_bytes=cache,
            mlx_unavailable_reason=mlx_reason,
            gpu_name=gpu.name,
            gpu_source=gpu.source,
            gpu_utilization_ratio=gpu.utilization_ratio,
            gpu_memory_used_bytes=gpu.memory_used_bytes,
            gpu_memory_total_bytes=gpu.memory_total_bytes,
            gpu_unavailable_reason=gpu.unavailable_reason,
        )


def read_process_stats() -> dict[str, Any]:
    """This process's resident memory, threads, open file descriptors and their limit."""
    process = psutil.Process()
    with process.oneshot():
        rss = process.memory_info().rss
        threads = process.num_threads()
        fds = process.num_fds() if hasattr(process, "num_fds") else None
    fd_limit: int | None = None
    with contextlib.suppress(ImportError, OSError, ValueError):
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        fd_limit = soft if soft > 0 else None
    return {
        "rss_bytes": rss,
        "memory_total_bytes": psutil.virtual_memory().total,
        "threads": threads,
        "open_fds": fds,
        "fd_limit": fd_limit,
    }
