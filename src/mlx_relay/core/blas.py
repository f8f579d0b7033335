"""A real BLAS for MLX's CPU backend, loaded before ``mlx.core`` is first imported.

The Linux ``mlx[cpu]`` wheel links a reference BLAS (a few GFLOP/s). Loading the system's
OpenBLAS into the process with ``RTLD_GLOBAL`` first makes MLX's float32 matmuls resolve to
it. This module imports no MLX, so entry points can call :func:`load_blas` before anything
else does; :mod:`mlx_relay.model.backend` checks afterwards that MLX really uses it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

BLAS_PACKAGE = "libopenblas0-pthread"
_LIBRARY = "libopenblas.so.0"
# How long an idle OpenBLAS thread spins before it sleeps: 2^20 CPU cycles (about 0.4 ms)
# instead of OpenBLAS's 2^28 (about 0.1 s). The gaps between the matmuls of one step are far
# shorter, so a step's threads stay awake; but a stage that finished its step stops taking
# cores from the stage computing next on the same host (measured: with 2 threads, 18-43 ms
# of CPU burnt in the 50-200 ms after the last matmul; 0.2-0.4 ms with this setting). The
# OPENBLAS_THREAD_TIMEOUT environment variable, when set, wins.
THREAD_TIMEOUT_ENV = "OPENBLAS_THREAD_TIMEOUT"
THREAD_TIMEOUT_EXPONENT = 20
_LOOPBACK = {"127.0.0.1", "localhost", "::1", "0.0.0.0", "::"}


@dataclass(frozen=True)
class BlasLibrary:
    """The BLAS this process loaded.

    Attributes:
        name: ``openblas``, or ``bundled`` when none was found (MLX's own reference BLAS).
        path: The loaded library's file, or None.
        threads: The BLAS thread count (0 when no library is loaded).
        before_mlx: Whether it was loaded before ``mlx.core`` was imported.
    """

    name: str
    path: Path | None
    threads: int
    before_mlx: bool = True


_loaded: BlasLibrary | None = None
_handle: ctypes.CDLL | None = None


def candidate_paths() -> list[Path]:
    """Where Debian and Ubuntu put the pthread OpenBLAS, for this machine's architecture."""
    multiarch = sysconfig.get_config_var("MULTIARCH")
    roots = [Path("/usr/lib") / multiarch] if multiarch else []
    roots += [Path("/usr/lib64"), Path("/usr/lib")]
    return [root / "openblas-pthread" / _LIBRARY for root in roots]


def load_blas(paths: list[Path] | None = None) -> BlasLibrary:
    """Load OpenBLAS globally so that MLX, imported later, computes with it (idempotent).

    Call before ``mlx.core`` is imported. A missing library is one warning naming the
    package to install; MLX then keeps its bundled BLAS.

    Args:
        paths: Library files to try, in order (default: :func:`candidate_paths`).

    Returns:
        What was loaded.
    """
    global _loaded, _handle
    if _loaded is not None:
        return _loaded
    if sys.platform != "linux":
        # macOS: Accelerate is MLX's BLAS already.
        _loaded = BlasLibrary("system", None, 0)
        return _loaded
    before_mlx = "mlx.core" not in sys.modules
    if not before_mlx:
        logger.warning("mlx.core was imported before the BLAS was loaded; MLX may not use it")
    for path in paths if paths is not None else candidate_paths():
        if not path.is_file():
            continue
        # Read by OpenBLAS when it is loaded; os.environ writes the process environment.
        os.environ.setdefault(THREAD_TIMEOUT_ENV, str(THREAD_TIMEOUT_EXPONENT))
        try:
            _handle = ctypes.CDLL(str(path), mode=os.RTLD_GLOBAL)
        except OSError as exc:
            logger.warning("cannot load %s: %s", path, exc)
            continue
        _loaded = BlasLibrary("openblas", path, _get_threads(), before_mlx)
        return _loaded
    logger.warning(
        "no OpenBLAS found (install the Debian package %s): MLX's CPU matmuls use its "
        "slow bundled BLAS",
        BLAS_PACKAGE,
    )
    _loaded = BlasLibrary("bundled", None, 0)
    return _loaded


def loaded_blas() -> BlasLibrary | None:
    """What :func:`load_blas` loaded, or None before it ran."""
    return _loaded


def set_threads(threads: int) -> BlasLibrary:
    """Set the BLAS thread count of this process (no-op without a loaded library).

    Raises:
        ValueError: ``threads`` is below 1.
    """
    global _loaded
    if threads < 1:
        raise ValueError(f"BLAS threads must be >= 1, got {threads}")
    library = _loaded or load_blas()
    if _handle is None:
        return library
    _handle.openblas_set_num_threads(ctypes.c_int(threads))
    _loaded = BlasLibrary(library.name, library.path, _get_threads(), library.before_mlx)
    return _loaded


def _get_threads() -> int:
    if _handle is None:
        return 0
    return int(_handle.openblas_get_num_threads())


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_threads(computing_processes: int, cores: int | None = None) -> int:
    """BLAS threads per process so that ``computing_processes`` on one host share its cores
    without oversubscribing them."""
    cores = available_cores() if cores is None else cores
    return max(1, cores // max(1, computing_processes))


def same_host(a: str, b: str) -> bool:
    """Whether two configured hosts name the same machine (all loopback names are one)."""
    return a == b or (a in _LOOPBACK and b in _LOOPBACK)


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def defining_file(symbol: str) -> Path | None:
    """The file the dynamic linker's global lookup finds ``symbol`` in, or None.

    MLX's extension module is loaded without ``RTLD_GLOBAL``, so its calls into the BLAS bind
    through this same global lookup before its own dependencies (the wheel's BLAS).
    """
    process = ctypes.CDLL(None)
    try:
        address = ctypes.cast(getattr(process, symbol), ctypes.c_void_p)
    except AttributeError:
        return None
    info = _DlInfo()
    if process.dladdr(address, ctypes.byref(info)) == 0 or not info.dli_fname:
        return None
    return Path(info.dli_fname.decode()).resolve()


def loaded_in_process(path: Path) -> bool:
    """Whether ``path`` is mapped into this process (from ``/proc/self/maps``)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    real = str(path.resolve())
    return any(line.endswith(real) for line in maps.splitlines())
