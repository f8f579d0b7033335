"""The BLAS router: MLX's ``cblas_sgemm`` sent to OpenBLAS or BLIS by the call's shape.

Neither Debian library is fastest everywhere. MLX asks for every float32 product as a
``sgemm``; measured on the development machine (2 cores, float32, weights read from memory):

- one row of activations times weights (a decode step of one sequence) is a matrix-vector
  product. OpenBLAS 0.3.21's
  ``sgemm`` packs the weights first (576 x 1536: 0.24 ms, 15 GB/s); BLIS's runs on one
  core (0.17 ms); OpenBLAS's threaded ``sgemv`` streams them once on every core (0.08 ms,
  43 GB/s). The bundled model decodes one sequence at 15, 19 and 24 tok/s that way.
- 2-8 rows (decode steps of a few sequences): BLIS's ``sgemm`` reads the weights once for
  all rows (batch 4: 54.7 tok/s vs 47.2 with OpenBLAS).
- more rows (prompts, larger batches): OpenBLAS's ``sgemm`` (prefill 366 vs 266 tok/s with
  BLIS); attention's products too, whatever their rows (see :data:`VECTOR_SIDE`).

The router is a small C file (``native/blas_route.c``) compiled once per machine with the
system C compiler, the one MLX itself needs for its compiled CPU kernels, into the
mlx-relay cache directory. Loaded with ``RTLD_GLOBAL`` before MLX, its ``cblas_sgemm`` is
the one MLX binds to; it forwards each call as above.
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
# Calls of 2 to this many rows go to BLIS. Measured on the bundled model, decode tok/s at batch
# 4, 8, 16 with up to 1 row sent to BLIS: 47.5, 85.5, 146.9; with up to 8: 54.7, 92.9, 150.1.
NARROW_ROWS = 8
# Products go to sgemv or BLIS only when both sides exceed this: attention's products (one
# side is the head dimension, at most 128 in the supported models) stay on OpenBLAS's sgemm,
# whose results do not depend on how many positions they span, as the attention windows of
# mlx_relay.model.shard need for exact equality with full attention (BLIS's sgemm and
# sgemv's blocking break it: measured on the tiny test models).
VECTOR_SIDE = 128


@dataclass(frozen=True)
class RouteCalls:
    """``cblas_sgemm`` calls routed so far in this process: one-row products with weights (to
    OpenBLAS's ``sgemv``), products with weights of up to :data:`NARROW_ROWS` rows (BLIS), the
    rest (OpenBLAS's ``sgemm``)."""

    vector: int
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
    """Point the router's one-row products at ``wide``'s ``cblas_sgemv``, its few-row ones at
    ``narrow``'s ``cblas_sgemm`` and the rest at ``wide``'s. Call before MLX computes
    anything."""
    route_set = router.mlx_relay_route_set
    route_set.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_int,
    ]
    route_set.restype = None
    route_set(
        function_address(wide, "cblas_sgemv"),
        function_address(narrow, "cblas_sgemm"),
        function_address(wide, "cblas_sgemm"),
        NARROW_ROWS,
        VECTOR_SIDE,
    )


def route_calls(router: ctypes.CDLL) -> RouteCalls:
    """How many calls the router sent each way so far."""
    calls = router.mlx_relay_route_calls
    calls.argtypes = [ctypes.c_int]
    calls.restype = ctypes.c_uint64
    return RouteCalls(int(calls(0)), int(calls(1)), int(calls(2)))
