"""The BLAS router: MLX's ``cblas_sgemm`` sent to BLIS or OpenBLAS by the call's shape.

Neither Debian library is fastest everywhere on x86 CPUs. Measured on the development
machine (2 cores, float32, ``x @ w.T``): a one-row product with the output head's
576 x 49152 weights takes 7 ms with BLIS and 8-26 ms with OpenBLAS 0.3.21 (which packs the
whole matrix first), while a 128-token prompt's matmuls run about 1.4x faster on OpenBLAS
(prefill 366 vs 266 tok/s on the bundled model). The router is a small C file
(``native/blas_route.c``) compiled once per machine with the system C compiler, the one
MLX itself needs for its compiled CPU kernels, into the mlx-relay cache directory. Loaded
with ``RTLD_GLOBAL`` before MLX, its ``cblas_sgemm`` is the one MLX binds to; it forwards
calls of at most ``NARROW_ROWS`` rows (decode steps of a few sequences) to BLIS and the
rest to OpenBLAS.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from mlx_relay.core.cache_dir import default_cache_dir

logger = logging.getLogger(__name__)

SOURCE = "blas_route.c"
# Calls with at most this many rows go to the narrow library (BLIS). Measured on the bundled
# model, decode tok/s at batch 1, 4, 8, 16 with at most 1 row routed: 19.1, 47.5, 85.5, 146.9;
# with at most 8: 18.6, 54.7, 92.9, 150.1.
NARROW_ROWS = 8


@dataclass(frozen=True)
class RouteCalls:
    """``cblas_sgemm`` calls routed so far in this process."""

    narrow: int
    wide: int


def router_source() -> bytes:
    """The router's C source, shipped inside the package."""
    return (resources.files("mlx_relay.core") / "native" / SOURCE).read_bytes()


def compiler() -> str | None:
    """The C compiler to build the router with: ``$CC``, else ``cc`` or ``gcc`` on PATH."""
    if env := os.environ.get("CC"):
        return shutil.which(env)
    return shutil.which("cc") or shutil.which("gcc")


def build_router(cache_dir: Path | None = None) -> Path | None:
    """The compiled router for this source, built into the cache on first use.

    Several workers starting at once may each build it; each writes a private file and
    renames it into place, so none loads a half-written library.

    Returns:
        The shared library, or None (one warning saying why) when it cannot be built.
    """
    source = router_source()
    digest = hashlib.sha256(source).hexdigest()[:16]
    out_dir = (cache_dir or default_cache_dir()) / "native"
    library = out_dir / f"blas_route-{digest}.so"
    if library.is_file():
        return library
    cc = compiler()
    if cc is None:
        logger.warning("no C compiler found to build the BLAS router: OpenBLAS serves all shapes")
        return None
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir) as scratch:
            source_file = Path(scratch) / SOURCE
            source_file.write_bytes(source)
            built = Path(scratch) / library.name
            command = [cc, "-O2", "-shared", "-fPIC", "-o", str(built), str(source_file)]
            subprocess.run(command, check=True, capture_output=True, text=True, timeout=60)
            os.replace(built, library)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        logger.warning("cannot build the BLAS router with %s: %s", cc, detail)
        return None
    logger.info("built the BLAS router %s", library)
    return library


def function_address(handle: ctypes.CDLL, symbol: str) -> int:
    """The address of ``symbol`` as defined by ``handle``'s own library (not the global one)."""
    address = ctypes.cast(getattr(handle, symbol), ctypes.c_void_p).value
    if not address:
        raise OSError(f"{symbol} has no address in {handle._name}")
    return address


def connect(router: ctypes.CDLL, narrow: ctypes.CDLL, wide: ctypes.CDLL) -> None:
    """Point the router's narrow calls at ``narrow``'s ``cblas_sgemm`` and the rest at
    ``wide``'s. Call before MLX computes anything."""
    route_set = router.mlx_relay_route_set
    route_set.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
    ]
    route_set.restype = None
    route_set(
        function_address(narrow, "cblas_sgemm"),
        function_address(wide, "cblas_sgemm"),
        NARROW_ROWS,
        0,
        0,
    )


def route_calls(router: ctypes.CDLL) -> RouteCalls:
    """How many calls the router sent each way so far."""
    calls = router.mlx_relay_route_calls
    calls.argtypes = [ctypes.c_int]
    calls.restype = ctypes.c_uint64
    return RouteCalls(int(calls(0)), int(calls(1)))
