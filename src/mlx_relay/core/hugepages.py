"""Weights in transparent huge pages: glibc's malloc asked to back its large blocks with 2 MB
pages.

Every decode step streams all of a stage's weights from memory. In 4 KB pages that is a
page-table walk every 4 KB (the bundled model's 0.54 GB of float32 weights: 132,000 pages a
step); in 2 MB pages, 270. MLX allocates its arrays with ``malloc``, and glibc (2.35 and
later) asks the kernel for transparent huge pages for its blocks when the tunable
``glibc.malloc.hugetlb=1`` is set (with one arena, :data:`ONE_ARENA`, and freed blocks kept
for reuse, :data:`KEEP_FREED`), which glibc reads
only when a process starts. So a computing program (``mlx-relay``, the benches) calls
:func:`reexec_with_hugepages` first thing: once, it executes itself again with the tunables
added to ``GLIBC_TUNABLES`` (same process id, arguments and environment otherwise); child
processes inherit them.

Measured on the development machine (2 cores, the bundled model's compiled decode step,
float32, two alternating pairs of runs): batch 16 71.2 / 75.4 -> 63.8 / 65.7 ms, batch 1
26.1 / 27.1 -> 26.0 / 25.4 ms; the same bits (only where the memory lies changes); 809 of
the process's 900 MB then in huge pages.

Nothing happens off Linux, without glibc 2.35, when the kernel's transparent huge pages are
off (``/sys/kernel/mm/transparent_hugepage/enabled`` at ``never``), when the tunable is set
already, or with ``MLX_RELAY_HUGEPAGES=0``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

ENV = "MLX_RELAY_HUGEPAGES"
TUNABLES = "GLIBC_TUNABLES"
TUNABLE = "glibc.malloc.hugetlb=1"
# One malloc arena: a worker loads its weights on its MLX thread, whose own arena's blocks
# glibc does not back with huge pages (measured: 168 of a worker's 515 MB in huge pages with
# the first tunable alone, 452 of 589 MB with both; one request on the 2-stage pipeline
# 30.5 / 30.6 -> 30.9 / 30.4 tok/s, 16 in flight 162.7 / 161.1 -> 163.2 / 167.1).
ONE_ARENA = "glibc.malloc.arena_max=1"
# Freed blocks stay with malloc: up to 256 MB free at the top of the heap before it is given
# back, and blocks up to 32 MB from the heap, not mapped and unmapped each time (glibc's
# adaptive default maps a few-MB block afresh in many steps, and every new huge page is
# zeroed when first touched). A decode step's temporaries then reuse the pages of the last
# step's: the bundled model's batch-16 step 88.9 / 86.6 -> 77.0 / 77.5 ms in alternating
# runs (64 MB: 80.8 / 82.0), batch 1 unchanged, the process's memory the same (~855 MB).
KEEP_FREED = ("glibc.malloc.trim_threshold=268435456", "glibc.malloc.mmap_threshold=33554432")
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
# Set before the program executes itself again: it does so at most once.
_REEXECUTED = "MLX_RELAY_HUGEPAGES_REEXEC"


def glibc_version() -> tuple[int, int] | None:
    """glibc's version in this process, or None (another C library, or not Linux)."""
    try:
        name, version = (os.confstr("CS_GNU_LIBC_VERSION") or "").split()  # "glibc 2.36"
    except (AttributeError, ValueError, OSError):
        return None
    if name != "glibc":
        return None
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def kernel_thp_enabled(setting: Path = THP_SETTING) -> bool:
    """Whether the kernel gives transparent huge pages to a process asking for them
    (``always`` or ``madvise`` selected)."""
    try:
        text = setting.read_text()
    except OSError:
        return False
    return "[always]" in text or "[madvise]" in text


def wanted(environ: os._Environ[str] | dict[str, str]) -> bool:
    """Whether this process should execute itself again with the tunable."""
    if sys.platform != "linux" or environ.get(ENV, "1").strip() == "0":
        return False
    if _REEXECUTED in environ or "glibc.malloc.hugetlb" in environ.get(TUNABLES, ""):
        return False
    version = glibc_version()
    return version is not None and version >= (2, 35) and kernel_thp_enabled()


def with_tunable(value: str) -> str:
    """``GLIBC_TUNABLES`` with :data:`TUNABLE` added, and :data:`ONE_ARENA` and
    :data:`KEEP_FREED` where the value does not set them already (tunables are
    colon-separated)."""
    others = [ONE_ARENA, *KEEP_FREED]
    added = [TUNABLE] + [t for t in others if t.split("=")[0] not in value]
    return ":".join([value, *added] if value else added)


def reexec_with_hugepages(argv: Sequence[str] | None = None) -> None:
    """Execute this program again, once, with glibc's malloc backing large blocks with huge
    pages (see the module's docs); returns at once when that is not wanted or not possible.

    Call first thing in a program's entry point, before anything else runs: threads,
    open files that should not survive, output.

    Args:
        argv: the interpreter's arguments to execute again (default ``sys.orig_argv[1:]``,
            what started this process: a script, ``-m module``, options).
    """
    if not wanted(os.environ):
        return
    arguments = list(sys.orig_argv[1:] if argv is None else argv)
    environ = dict(os.environ)
    environ[TUNABLES] = with_tunable(environ.get(TUNABLES, ""))
    environ[_REEXECUTED] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *arguments], environ)
    except OSError as exc:  # the interpreter cannot be executed again: go on without
        logger.debug("not executed again for huge pages: %s", exc)
