"""Parse macOS ``ioreg -r -d 1 -w 0 -c IOAccelerator`` output: GPU utilization without sudo.

Apple-silicon GPUs (AGXAccelerator*) publish a ``PerformanceStatistics`` dictionary with
``Device Utilization %`` and ``In use system memory``; AMD GPUs in Intel Macs publish
``GPU Activity(%)`` and ``vramUsedBytes``. The parser is pure so it can be tested on recorded
output on any platform.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

IOREG_COMMAND = ("ioreg", "-r", "-d", "1", "-w", "0", "-c", "IOAccelerator")

_ENTRY = re.compile(r"^\+-o (\S+)", re.MULTILINE)
_STATS = re.compile(r'"PerformanceStatistics" = \{(.*)\}\s*$', re.MULTILINE)
_PAIR = re.compile(r'"([^"]+)"\s*=\s*("(?:[^"\\]|\\.)*"|<[^>]*>|[^,}]+)')
_STRING = re.compile(r'^\s*"([^"]+)" = "([^"]*)"\s*$', re.MULTILINE)
_INT = re.compile(r'^\s*"([^"]+)" = (\d+)\s*$', re.MULTILINE)

_UTILIZATION_KEYS = ("Device Utilization %", "GPU Activity(%)")
_MEMORY_KEYS = ("In use system memory", "vramUsedBytes", "Alloc system memory")


@dataclass(frozen=True)
class IoregGpu:
    """One accelerator's statistics from ioreg."""

    io_class: str
    model: str | None
    core_count: int | None
    utilization_ratio: float | None
    memory_used_bytes: int | None
    statistics: dict[str, int | str]


def parse_performance_statistics(body: str) -> dict[str, int | str]:
    """Parse the inside of a ``PerformanceStatistics = {...}`` dictionary."""
    values: dict[str, int | str] = {}
    for key, raw in _PAIR.findall(body):
        raw = raw.strip()
        if raw.startswith('"'):
            values[key] = raw[1:-1]
        elif re.fullmatch(r"-?\d+", raw):
            values[key] = int(raw)
        else:
            values[key] = raw
    return values


def _first_int(stats: dict[str, int | str], keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = stats.get(key)
        if isinstance(value, int):
            return value
    return None


def parse_ioreg(text: str) -> list[IoregGpu]:
    """Every accelerator in the output that has performance statistics, in output order."""
    starts = [m.start() for m in _ENTRY.finditer(text)] or [0]
    gpus: list[IoregGpu] = []
    for i, start in enumerate(starts):
        block = text[start : starts[i + 1] if i + 1 < len(starts) else len(text)]
        stats_match = _STATS.search(block)
        if stats_match is None:
            continue
        stats = parse_performance_statistics(stats_match.group(1))
        strings = dict(_STRING.findall(block))
        ints = {k: int(v) for k, v in _INT.findall(block)}
        entry = _ENTRY.search(block)
        utilization = _first_int(stats, _UTILIZATION_KEYS)
        gpus.append(
            IoregGpu(
                io_class=strings.get("IOClass") or (entry.group(1) if entry else "IOAccelerator"),
                model=strings.get("model"),
                core_count=ints.get("gpu-core-count"),
                utilization_ratio=None
                if utilization is None
                else min(1.0, max(0.0, utilization / 100.0)),
                memory_used_bytes=_first_int(stats, _MEMORY_KEYS),
                statistics=stats,
            )
        )
    return gpus
