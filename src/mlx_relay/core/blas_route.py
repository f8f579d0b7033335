"""The BLAS router: MLX's ``cblas_sgemm`` sent to the code fastest at the call's shape.

MLX asks for every float32 product as a ``sgemm``. Measured on the development machine (2
cores, float32):

- activations times a layer's weights (``x @ w.T``: decode steps and prompts): the router's
  own kernel (``native/blas_route.c``) streams each weight row from memory once for all rows
  (a prompt's a block of 128 rows at a time), fetching the next rows while it computes, on
  every core, where a general ``sgemm`` packs the weights first. One pass over 30 layers of
  the bundled model's shapes read from memory (each of up, down, o and k/v once): 1 row 9.9
  ms (OpenBLAS's threaded ``sgemv`` 10.5), 4 rows 10.1 (OpenBLAS's ``sgemm`` 29.2, BLIS's
  30.5), 8 rows 13.1 (30.1, 36.4), 16 rows 18.0 (31.0, 42.7); a prompt's product in cache,
  256 rows x 1,536 x 576, 1.30 ms against 2.03 for OpenBLAS's ``sgemm``, 1,024 rows 5.1
  against 7.5. Its outputs are summed in one order whatever the rows and threads: a
  sequence's products are the same bits alone and in a batch, and a prompt's rows the same
  prefilled at once or in chunks.
- attention's products (a side of at most :data:`VECTOR_SIDE`: in a decode step one query
  row a head, its scores over the positions in use, then their weights over the values): a
  general ``sgemm``'s set-up costs more than such a product (OpenBLAS: 1.1 us for one row of
  scores over 64 positions, 8,640 such calls in a batch-16 step of the bundled model). The
  router computes them on the calling thread (a long prompt's on its threads), each output
  summed in one order whatever the rows and the positions spanned.
- other one-row products with weights: OpenBLAS's threaded ``sgemv``.
- the rest (transposed activations, ``alpha``/``beta`` other than 1/0, depths that are not a
  multiple of the vector lanes): OpenBLAS's ``sgemm``.

The router is compiled once per machine with the system C compiler (the one MLX itself needs
for its compiled CPU kernels) for this machine's vector instructions, into the mlx-relay
cache directory. Loaded with ``RTLD_GLOBAL`` before MLX, its ``cblas_sgemm`` is the one MLX
binds to.
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
# Products with weights of up to this many rows run in the router's kernel: all of them
# (decode steps and prompts; OpenBLAS's sgemm took prompts before: 1.4-1.6x slower on one
# product in cache, 1.05-1.27x on a whole prefill).
KERNEL_ROWS = 1 << 30
# Products go to the kernel or sgemv only when both sides exceed this: attention's products
# (one side is the head dimension, at most 128 in the supported models) go to the router's
# small products (or OpenBLAS's sgemm where those cannot take them), whose results do not depend on
# how many positions they span, as the attention windows of mlx_relay.model.shard need for
# exact equality with full attention (sgemv's blocking breaks it: measured on the tiny test
# models).
VECTOR_SIDE = 128
# The flags the router is built with: the machine's own vector instructions.
CFLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-pthread", "-shared", "-fPIC")


@dataclass(frozen=True)
class RouteCalls:
    """``cblas_sgemm`` calls routed so far in this process: one-row products with weights that
    the kernel cannot take (to OpenBLAS's ``sgemv``), products with weights (the router's
    kernel), the rest (OpenBLAS's ``sgemm``), and small products (attention's)."""

    vector: int
    kernel: int
    wide: int
    small: int


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
    # Built for this machine's CPU: a cache shared with another CPU gets its own build.
    digest = hashlib.sha256(source + " ".join(CFLAGS).encode() + cpu_identity()).hexdigest()[:16]
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
            command = [cc, *CFLAGS, "-o", str(built), str(source_file)]
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


def connect(router: ctypes.CDLL, wide: ctypes.CDLL) -> None:
    """Point the router's other one-row products at ``wide``'s ``cblas_sgemv`` and its larger
    ones at ``wide``'s ``cblas_sgemm``. Call before MLX computes anything."""
    route_set = router.mlx_relay_route_set
    route_set.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    route_set.restype = None
    route_set(
        function_address(wide, "cblas_sgemv"),
        function_address(wide, "cblas_sgemm"),
        KERNEL_ROWS,
        VECTOR_SIDE,
    )
    router.mlx_relay_route_threads.argtypes = [ctypes.c_int]
    router.mlx_relay_route_threads.restype = None
    router.mlx_relay_route_rest.argtypes = []
    router.mlx_relay_route_rest.restype = None
    router.mlx_relay_route_spin.argtypes = [ctypes.c_double]
    router.mlx_relay_route_spin.restype = None
    router.mlx_relay_route_helpers.argtypes = [ctypes.c_int]
    router.mlx_relay_route_helpers.restype = ctypes.c_int
    router.mlx_relay_route_small.argtypes = [ctypes.c_int]
    router.mlx_relay_route_small.restype = None
    router.mlx_relay_route_rows.argtypes = [ctypes.c_int]
    router.mlx_relay_route_rows.restype = None


def set_route_threads(router: ctypes.CDLL, threads: int) -> None:
    """The threads the router's kernel computes on (the caller's included)."""
    router.mlx_relay_route_threads(threads)


def rest_route_threads(router: ctypes.CDLL) -> None:
    """The router's helper threads waiting for the next product sleep now (they spin
    through the short gaps within a step)."""
    router.mlx_relay_route_rest()


def set_route_spin(router: ctypes.CDLL, seconds: float) -> None:
    """How long an idle helper thread spins before it sleeps (default 2 ms)."""
    router.mlx_relay_route_spin(seconds)


def set_route_small(router: ctypes.CDLL, on: bool) -> None:
    """Whether the router computes small products (attention's) itself (the default) or sends
    them to OpenBLAS's ``sgemm``."""
    router.mlx_relay_route_small(int(on))


def set_route_rows(router: ctypes.CDLL, rows: int) -> None:
    """Products with weights of up to ``rows`` rows go to the router's kernel, larger ones to
    OpenBLAS's ``sgemm`` (default :data:`KERNEL_ROWS`: all)."""
    router.mlx_relay_route_rows(rows)


def route_helpers(router: ctypes.CDLL) -> tuple[int, int]:
    """The router's helper threads: started, and sleeping now."""
    return int(router.mlx_relay_route_helpers(0)), int(router.mlx_relay_route_helpers(1))


def cpu_identity() -> bytes:
    """What names this machine's CPU for the router's build: its model and instruction set."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.uname().machine.encode()
    keys = ("model name", "flags", "Features", "CPU part")
    lines = {line for line in text.splitlines() if line.split(":")[0].strip() in keys}
    return "\n".join(sorted(lines)).encode()


def route_calls(router: ctypes.CDLL) -> RouteCalls:
    """How many calls the router sent each way so far."""
    calls = router.mlx_relay_route_calls
    calls.argtypes = [ctypes.c_int]
    calls.restype = ctypes.c_uint64
    return RouteCalls(int(calls(0)), int(calls(1)), int(calls(2)), int(calls(3)))
