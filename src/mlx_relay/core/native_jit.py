"""MLX's compiled CPU kernels, built for this machine's vector instructions.

On the CPU backend ``mx.compile`` fuses a graph's element-wise operations (a decode step's
SiLU and gating in every MLP, its masks and scales) into C++ kernels that MLX builds at run
time with the ``g++`` on ``PATH`` and caches under ``$TMPDIR/mlx/<version>/cpu``. The Linux
wheel passes no ``-march``: the kernels use baseline x86-64 instructions, and every fused
multiply-add of MLX's ``exp`` polynomial is a call into libm.

:func:`prepare` puts a ``g++`` first on ``PATH`` that runs the real one with
:data:`FLAGS`: this machine's instructions (``-march=native``), no fusing of ``a * b + c``
that the kernel's source does not ask for (``-ffp-contract=off``), and what lets the
element loops vectorize (MLX's ``exp`` inlined, its selects of special values as blends), so
each kernel computes the same bits as MLX's own build (tested, also on infinities, NaNs and
values past exp's range). Measured on the development machine (2 cores): a compiled SiLU
gate of 16 x 1,536 values 493 us -> 236 us with ``-march=native`` alone -> 19.6 us
vectorized; the bundled model's compiled decode step, float32, batch 16 77.3 -> 69.2 ms
(``-march=native`` alone), then 68.4 / 69.2 -> 63.7 / 63.2 ms (fastest of 10 steps, two
alternating pairs), batch 1 29.2 -> 27.3 ms, then 26.9 / 26.3 -> 25.5 / 26.0 ms.

The kernels built so are cached apart from MLX's default ones (an older cache would keep
serving the baseline builds): ``TMPDIR`` of the process points into the mlx-relay cache,
at a directory named for this CPU and compiler. Python's own temporary files in this
process stay where they were; child processes inherit both variables (the workers ``up``
starts use the same kernels). ``MLX_RELAY_NATIVE_JIT=0`` turns it off.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlx_relay.core.blas_route import cpu_identity
from mlx_relay.core.cache_dir import default_cache_dir

logger = logging.getLogger(__name__)

ENV = "MLX_RELAY_NATIVE_JIT"
COMPILER = "g++"
FLAGS = (
    "-march=native",
    "-ffp-contract=off",
    # With these the element loops vectorize: MLX's exp (and so SiLU, sigmoid) inlined, and
    # its selects of special values turned from branches into blends. Neither changes a
    # value (no trap is observed; inlining keeps every operation and its order).
    "-fno-trapping-math",
    "-finline-limit=100000",
    *(("-mprefer-vector-width=512",) if platform.machine() in ("x86_64", "AMD64") else ()),
)
# The wrapper's second line: how a process tells an inherited wrapper from a compiler.
MARK = "# mlx-relay: MLX's CPU kernels for this machine (mlx_relay.core.native_jit)"
# Compiled once through the wrapper before it is trusted: the flags must be accepted.
_PROBE = 'extern "C" float probe(float x) { return x * 2.0f + 1.0f; }\n'


@dataclass(frozen=True)
class NativeJit:
    """The wrapper in use: the directory first on ``PATH`` holding the ``g++`` that adds
    :data:`FLAGS`, and the ``TMPDIR`` under which MLX caches the kernels it builds."""

    bin_dir: Path
    kernel_dir: Path


_active: NativeJit | None = None
_prepared = False


def prepare(cache_dir: Path | None = None) -> NativeJit | None:
    """Build MLX's CPU kernels in this process with :data:`FLAGS` (idempotent; Linux only).

    Call before MLX compiles anything (before ``mlx.core`` is imported: the environment is
    changed). Does nothing when turned off by ``MLX_RELAY_NATIVE_JIT=0``, when there is no
    ``g++`` (MLX then runs graphs uncompiled anyway) or when it refuses the flags (one
    warning).

    Returns:
        The wrapper in use, or None.
    """
    global _active, _prepared
    if _prepared:
        return _active
    _prepared = True
    if sys.platform != "linux":
        return None
    # A wrapper inherited from the parent process is replaced by this process's own.
    os.environ["PATH"] = os.pathsep.join(without_wrappers(os.environ.get("PATH", "")))
    if os.environ.get(ENV, "1").strip() == "0":
        return None
    real = _real_compiler()
    if real is None:
        return None
    digest = hashlib.sha256(cpu_identity() + real.encode() + " ".join(FLAGS).encode()).hexdigest()[
        :16
    ]
    root = (cache_dir or default_cache_dir()) / "jit" / digest
    try:
        wrapper = _wrapper(root / "bin", real)
        kernels = root / "tmp"
        kernels.mkdir(mode=0o700, exist_ok=True)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        flags = " ".join(FLAGS)
        logger.warning(
            "MLX's CPU kernels keep their baseline build (%s %s: %s)", real, flags, detail
        )
        return None
    # Python's temporary files in this process stay in the directory they were in.
    tempfile.tempdir = tempfile.gettempdir()
    os.environ["PATH"] = f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}"
    os.environ["TMPDIR"] = str(kernels)
    _active = NativeJit(wrapper.parent, kernels)
    logger.debug("MLX's CPU kernels build with %s %s into %s", real, " ".join(FLAGS), kernels)
    return _active


def active() -> NativeJit | None:
    """The wrapper :func:`prepare` put in place, if any."""
    return _active


def is_wrapper(path: Path) -> bool:
    """Whether ``path`` is a wrapper :func:`prepare` wrote (in any cache directory)."""
    try:
        with path.open("rb") as file:
            return MARK.encode() in file.read(256)
    except OSError:
        return False


def without_wrappers(path: str) -> list[str]:
    """The entries of a ``PATH`` value, less the directories of wrappers."""
    return [e for e in path.split(os.pathsep) if not is_wrapper(Path(e or ".") / COMPILER)]


def _real_compiler() -> str | None:
    """The first ``g++`` on ``PATH`` that is not a wrapper, symbolic links resolved."""
    for entry in without_wrappers(os.environ.get("PATH", "")):
        candidate = Path(entry or ".") / COMPILER
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return os.path.realpath(candidate)
    return None


def _wrapper(bin_dir: Path, real: str) -> Path:
    """The ``g++`` wrapper in ``bin_dir``, written and checked once.

    Raises:
        OSError, subprocess.SubprocessError: it cannot be written, or the compiler refuses
            the flags.
    """
    wrapper = bin_dir / COMPILER
    checked = bin_dir / ".checked"
    script = f'#!/bin/sh\n{MARK}\nexec {shlex.quote(real)} {" ".join(FLAGS)} "$@"\n'
    if checked.is_file() and wrapper.is_file() and wrapper.read_text() == script:
        return wrapper
    bin_dir.mkdir(parents=True, exist_ok=True)
    checked.unlink(missing_ok=True)
    # Several processes starting at once may each write it: each renames its own file.
    with tempfile.NamedTemporaryFile("w", dir=bin_dir, delete=False) as part:
        part.write(script)
    os.chmod(part.name, 0o755)
    os.replace(part.name, wrapper)
    with tempfile.TemporaryDirectory(dir=bin_dir) as scratch:
        command = [str(wrapper), "-std=c++17", "-O3", "-fPIC", "-shared", "-x", "c++", "-"]
        command += ["-o", str(Path(scratch) / "probe.so")]
        subprocess.run(
            command, input=_PROBE, check=True, capture_output=True, text=True, timeout=60
        )
    checked.touch()
    return wrapper
