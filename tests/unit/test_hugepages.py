"""Computing programs execute themselves once with glibc's malloc in transparent huge pages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_relay.core import hugepages

KEEP = "glibc.malloc.trim_threshold=268435456:glibc.malloc.mmap_threshold=33554432"
ADDED = f"glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1:{KEEP}"


def test_the_tunable_joins_the_others() -> None:
    assert hugepages.with_tunable("") == ADDED
    assert hugepages.with_tunable("glibc.malloc.tcache_count=0") == (
        f"glibc.malloc.tcache_count=0:{ADDED}"
    )
    # The user's own arena count and thresholds stay.
    assert hugepages.with_tunable("glibc.malloc.arena_max=2") == (
        f"glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1:{KEEP}"
    )
    assert hugepages.with_tunable("glibc.malloc.mmap_threshold=1048576") == (
        "glibc.malloc.mmap_threshold=1048576:glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1"
        ":glibc.malloc.trim_threshold=268435456"
    )


@pytest.mark.parametrize(
    ("text", "enabled"),
    [
        ("always [madvise] never\n", True),
        ("[always] madvise never\n", True),
        ("always madvise [never]\n", False),
    ],
)
def test_the_kernel_setting_is_read(tmp_path: Path, text: str, enabled: bool) -> None:
    setting = tmp_path / "enabled"
    setting.write_text(text)
    assert hugepages.kernel_thp_enabled(setting) is enabled
    assert not hugepages.kernel_thp_enabled(tmp_path / "missing")


@pytest.mark.parametrize(
    "environ",
    [
        {"MLX_RELAY_HUGEPAGES": "0"},
        {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=2"},  # the user's own choice stays
        {"MLX_RELAY_HUGEPAGES_REEXEC": "1"},  # executed again once already
    ],
)
def test_never_executed_again_when_not_wanted(environ: dict[str, str]) -> None:
    assert not hugepages.wanted(environ)


CHILD = r"""
import json, os, sys
from mlx_relay.core.hugepages import reexec_with_hugepages
reexec_with_hugepages()
import mlx.core as mx
weights = mx.ones(((64 << 20) // 4,))
mx.eval(weights)
huge = 0
for line in open("/proc/self/smaps_rollup"):
    if line.startswith("AnonHugePages:"):
        huge = int(line.split()[1]) << 10
print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES", ""), "huge": huge,
                  "pid": os.getpid(), "argv": sys.argv}))
"""


def run_child(**env: str) -> dict[str, object]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MLX_RELAY_HUGEPAGES")}
    environ.pop("GLIBC_TUNABLES", None)
    run = subprocess.run(
        [sys.executable, "-c", CHILD, "an-argument"],
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    return dict(json.loads(run.stdout.splitlines()[-1]))


@pytest.mark.skipif(
    not hugepages.wanted({}),
    reason="needs Linux, glibc 2.35 or later and the kernel's transparent huge pages on",
)
def test_a_program_runs_again_with_its_large_blocks_in_huge_pages() -> None:
    child = run_child()
    assert child["tunables"] == ADDED
    assert child["argv"] == ["-c", "an-argument"]  # the same arguments
    assert int(str(child["huge"])) >= 32 << 20, "most of the 64 MB array in huge pages"
    off = run_child(MLX_RELAY_HUGEPAGES="0")
    assert off["tunables"] == ""
