"""The macOS ioreg parser on recorded IOAccelerator outputs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from mlx_relay.monitoring.device import read_ioreg
from mlx_relay.monitoring.ioreg import IOREG_COMMAND, parse_ioreg, parse_performance_statistics

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "ioreg"


def _fixture(name: str) -> str:
    return (FIXTURES / name).read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("name", "model", "cores", "utilization", "memory"),
    [
        ("m1.txt", "Apple M1", 8, 0.14, 412090368),
        ("m2_pro.txt", "Apple M2 Pro", 19, 0.87, 5368709120),
        ("m3_max_idle.txt", "Apple M3 Max", 40, 0.0, 37224448),
    ],
)
def test_apple_silicon(name: str, model: str, cores: int, utilization: float, memory: int) -> None:
    (gpu,) = parse_ioreg(_fixture(name))
    assert gpu.model == model
    assert gpu.core_count == cores
    assert gpu.utilization_ratio == pytest.approx(utilization)
    assert gpu.memory_used_bytes == memory
    assert gpu.io_class.startswith("AGXAccelerator")
    assert gpu.statistics["Renderer Utilization %"] == int(gpu.statistics["Renderer Utilization %"])


def test_intel_mac_with_two_accelerators() -> None:
    intel, amd = parse_ioreg(_fixture("intel_amd.txt"))
    assert (intel.model, intel.utilization_ratio, intel.memory_used_bytes) == (
        "Intel UHD Graphics 630",
        0.03,
        25165824,
    )
    assert amd.io_class == "AMDRadeonX5000_AMDNavi14GraphicsAccelerator"
    assert amd.model is None  # a <data> value, not a string
    assert amd.utilization_ratio == pytest.approx(0.42)
    assert amd.memory_used_bytes == 578813952


def test_no_statistics() -> None:
    assert parse_ioreg("") == []
    assert parse_ioreg('+-o IOAccelerator  <class X>\n    {\n      "IOClass" = "X"\n    }\n') == []


def test_statistics_values() -> None:
    stats = parse_performance_statistics('"a"=1,"b b %"=-2,"name"="x, y","d"=<00ff>')
    assert stats == {"a": 1, "b b %": -2, "name": "x, y", "d": "<00ff>"}


def test_read_ioreg_runs_the_documented_command() -> None:
    seen: list[Sequence[str]] = []

    def run(command: Sequence[str]) -> str:
        seen.append(command)
        return _fixture("intel_amd.txt")

    reading = read_ioreg(run)
    assert seen == [IOREG_COMMAND]
    assert reading.source == "ioreg"
    assert reading.utilization_ratio == pytest.approx(0.42)  # the busiest GPU
    assert reading.memory_used_bytes == 25165824 + 578813952
    assert reading.name == "Intel UHD Graphics 630"


def test_read_ioreg_without_statistics_gives_a_reason() -> None:
    reading = read_ioreg(lambda command: "")
    assert reading.utilization_ratio is None
    assert reading.unavailable_reason and "no IOAccelerator" in reading.unavailable_reason
