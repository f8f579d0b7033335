"""A real BLAS for MLX's CPU backend, loaded before ``mlx.core`` is first imported.

The Linux ``mlx[cpu]`` wheel links a reference BLAS (a few GFLOP/s). Loading the system's
OpenBLAS into the process with ``RTLD_GLOBAL`` first (behind the router of
:mod:`mlx_relay.core.blas_route`, or alone; BLIS alone on request) makes MLX's float32
matmuls resolve to it. This module imports no MLX, so entry points can call :func:`load_blas`
before anything else does; :mod:`mlx_relay.model.backend` checks afterwards that MLX really uses it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from mlx_relay.core import native_jit
from mlx_relay.core.blas_route import build_router, connect, rest_route_threads, set_route_threads
from mlx_relay.core.errors import ConfigError

logger = logging.getLogger(__name__)

BLAS_ENV = "MLX_RELAY_BLAS"
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
class KnownBlas:
    """A CPU BLAS this module can load: where Debian puts it and how its threads are set.

    Attributes:
        name: ``blis`` or ``openblas`` (the name status and ``/metrics`` report).
        package: the Debian package that installs it.
        directory: its multiarch subdirectory (the pthread build).
        library: the shared library's file name.
        set_threads: the C function that sets its thread count (one integer argument).
        get_threads: the C function that returns it.
    """

    name: str
    package: str
    directory: str
    library: str
    set_threads: str
    get_threads: str


BLIS = KnownBlas(
    "blis",
    "libblis4-pthread",
    "blis-pthread",
    "libblis.so.4",
    "bli_thread_set_num_threads",
    "bli_thread_get_num_threads",
)
OPENBLAS = KnownBlas(
    "openblas",
    "libopenblas0-pthread",
    "openblas-pthread",
    "libopenblas.so.0",
    "openblas_set_num_threads",
    "openblas_get_num_threads",
)
KNOWN_BLAS = {known.name: known for known in (BLIS, OPENBLAS)}
# Alone, tried in this order unless MLX_RELAY_BLAS names one (OpenBLAS is the faster for
# prompts and batches); with OpenBLAS installed and the router built, the router's kernel
# computes decode steps and OpenBLAS the rest.
PREFERRED = (OPENBLAS, BLIS)
ROUTED = "openblas+router"
BLAS_PACKAGE = " or ".join(known.package for known in PREFERRED)


@dataclass(frozen=True)
class BlasLibrary:
    """The BLAS this process loaded.

    Attributes:
        name: ``openblas+router`` (OpenBLAS behind the router), ``openblas`` or ``blis``;
            ``bundled`` when none was found (MLX's own reference BLAS); ``system`` off Linux
            (Accelerate on macOS).
        path: The loaded library's file, or None.
        threads: The BLAS thread count (0 when no library is loaded).
        before_mlx: Whether it was loaded before ``mlx.core`` was imported.
    """

    name: str
    path: Path | None
    threads: int
    before_mlx: bool = True


_loaded: BlasLibrary | None = None
# The libraries whose threads set_threads sets; the router, when one was loaded.
_handles: list[tuple[KnownBlas, ctypes.CDLL]] = []
_router: ctypes.CDLL | None = None


def candidate_paths(known: KnownBlas = OPENBLAS) -> list[Path]:
    """Where Debian and Ubuntu put ``known``'s pthread build, for this machine's architecture."""
    multiarch = sysconfig.get_config_var("MULTIARCH")
    roots = [Path("/usr/lib") / multiarch] if multiarch else []
    roots += [Path("/usr/lib64"), Path("/usr/lib")]
    return [root / known.directory / known.library for root in roots]


def installed_path(known: KnownBlas) -> Path | None:
    """The first of ``known``'s :func:`candidate_paths` that exists."""
    return next((path for path in candidate_paths(known) if path.is_file()), None)


def preferred_libraries() -> tuple[KnownBlas, ...]:
    """The libraries to try, in order: the one ``MLX_RELAY_BLAS`` names (``blis``,
    ``openblas``; ``auto`` or unset: :data:`PREFERRED`, routed when OpenBLAS is installed).

    Raises:
        ConfigError: ``MLX_RELAY_BLAS`` names no known library.
    """
    wanted = os.environ.get(BLAS_ENV, "auto").strip().lower()
    if wanted in ("", "auto"):
        return PREFERRED
    if wanted not in KNOWN_BLAS:
        expected = ", ".join(["auto", *KNOWN_BLAS])
        raise ConfigError(f"{BLAS_ENV}: expected one of {expected}, got {wanted!r}")
    return (KNOWN_BLAS[wanted],)


def load_blas(paths: list[Path] | None = None) -> BlasLibrary:
    """Load a real BLAS globally so that MLX, imported later, computes with it (idempotent).

    Call before ``mlx.core`` is imported. With OpenBLAS installed and a C compiler for the
    router (see :mod:`mlx_relay.core.blas_route`), the router's kernel takes decode steps and
    OpenBLAS the rest; else the first installed of :func:`preferred_libraries`. None
    installed is one warning naming the packages; MLX then keeps its bundled BLAS. Also
    has MLX build its compiled CPU kernels for this machine (:mod:`mlx_relay.core.native_jit`).

    Args:
        paths: Library files to try alone, in order (default: the :func:`candidate_paths`
            of :func:`preferred_libraries`, after the router); each file's name says which
            library it is.

    Returns:
        What was loaded.
    """
    global _loaded
    if _loaded is not None:
        return _loaded
    # MLX's compiled CPU kernels, built at run time, take this machine's instructions too.
    native_jit.prepare()
    if sys.platform != "linux":
        # macOS: Accelerate is MLX's BLAS already.
        _loaded = BlasLibrary("system", None, 0)
        return _loaded
    before_mlx = "mlx.core" not in sys.modules
    if not before_mlx:
        logger.warning("mlx.core was imported before the BLAS was loaded; MLX may not use it")
    # Read by OpenBLAS when it is loaded; os.environ writes the process environment.
    os.environ.setdefault(THREAD_TIMEOUT_ENV, str(THREAD_TIMEOUT_EXPONENT))
    tried = preferred_libraries()
    if paths is None and tried == PREFERRED and (routed := _load_routed(before_mlx)):
        _loaded = routed
        return _loaded
    if paths is None:
        paths = [path for known in tried for path in candidate_paths(known)]
    for path in paths:
        known = next((k for k in KNOWN_BLAS.values() if path.name == k.library), None)
        if known is None or not path.is_file():
            continue
        try:
            handle = ctypes.CDLL(str(path), mode=os.RTLD_GLOBAL)
        except OSError as exc:
            logger.warning("cannot load %s: %s", path, exc)
            continue
        _adopt(known, handle)
        _loaded = BlasLibrary(known.name, path, _get_threads(), before_mlx)
        return _loaded
    logger.warning(
        "no BLAS found (install the Debian package %s): MLX's CPU matmuls use its "
        "slow bundled BLAS",
        " or ".join(known.package for known in tried),
    )
    _loaded = BlasLibrary("bundled", None, 0)
    return _loaded


def _load_routed(before_mlx: bool) -> BlasLibrary | None:
    """OpenBLAS behind the router; None when OpenBLAS or the router is missing."""
    global _router
    wide_path = installed_path(OPENBLAS)
    if wide_path is None:
        return None
    router_path = build_router()
    if router_path is None:
        return None
    try:
        # OpenBLAS privately first, so that the router is the first global cblas_sgemm.
        wide = ctypes.CDLL(str(wide_path), mode=os.RTLD_LOCAL)
        router = ctypes.CDLL(str(router_path), mode=os.RTLD_GLOBAL)
        connect(router, wide)
        # OpenBLAS then serves the other BLAS and LAPACK symbols, as when loaded alone.
        ctypes.CDLL(str(wide_path), mode=os.RTLD_GLOBAL)
    except (OSError, AttributeError) as exc:
        logger.warning("cannot route the BLAS (%s): loading OpenBLAS alone", exc)
        return None
    _router = router
    _adopt(OPENBLAS, wide)
    set_route_threads(router, _get_threads())
    return BlasLibrary(ROUTED, router_path, _get_threads(), before_mlx)


def _adopt(known: KnownBlas, handle: ctypes.CDLL) -> None:
    """Remember ``handle`` for :func:`set_threads`; BLIS starts on all cores, as OpenBLAS."""
    # BLIS counts in its 64-bit dim_t, OpenBLAS in int.
    width = ctypes.c_int64 if known is BLIS else ctypes.c_int
    getattr(handle, known.set_threads).argtypes = [width]
    getattr(handle, known.get_threads).restype = width
    if known is BLIS:
        getattr(handle, known.set_threads)(available_cores())
    _handles.append((known, handle))


def loaded_blas() -> BlasLibrary | None:
    """What :func:`load_blas` loaded, or None before it ran."""
    return _loaded


def loaded_router() -> ctypes.CDLL | None:
    """The BLAS router, when :func:`load_blas` routed."""
    return _router


def set_threads(threads: int) -> BlasLibrary:
    """Set the BLAS thread count of this process (every loaded library; no-op without one).

    Raises:
        ValueError: ``threads`` is below 1.
    """
    global _loaded
    if threads < 1:
        raise ValueError(f"BLAS threads must be >= 1, got {threads}")
    library = _loaded or load_blas()
    if not _handles:
        return library
    for known, handle in _handles:
        getattr(handle, known.set_threads)(threads)
    if _router is not None:
        set_route_threads(_router, threads)
    _loaded = BlasLibrary(library.name, library.path, _get_threads(), library.before_mlx)
    return _loaded


def rest_threads() -> None:
    """A step is over: the BLAS router's idle helper threads sleep at once instead of
    spinning for the next product (no-op without the router)."""
    if _router is not None:
        rest_route_threads(_router)


def _get_threads() -> int:
    if not _handles:
        return 0
    known, handle = _handles[0]
    return int(getattr(handle, known.get_threads)())


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
