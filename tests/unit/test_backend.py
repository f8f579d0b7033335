"""The CPU engine: the system BLAS really serves MLX's matmuls, BLAS threads are shared out
per host, and ``model.compute: auto`` picks dense float32 weights only where they pay."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map

from mlx_relay.core.blas import (
    BLAS_ENV,
    BLAS_PACKAGE,
    BLIS,
    OPENBLAS,
    ROUTED,
    BlasLibrary,
    default_threads,
    defining_file,
    installed_path,
    load_blas,
    loaded_blas,
    loaded_in_process,
    loaded_router,
    rest_threads,
    same_host,
    set_threads,
)
from mlx_relay.core.blas_route import (
    VECTOR_SIDE,
    RouteCalls,
    compiler,
    route_calls,
    route_helpers,
    set_route_small,
    set_route_spin,
    set_route_threads,
)
from mlx_relay.core.types import LayerRange
from mlx_relay.model.backend import (
    WEIGHT_ALIGNMENT,
    align_weights,
    backend_name,
    blas_in_use,
    choose_compute,
    data_address,
    dense_bytes,
    is_quantized,
)
from mlx_relay.model.load import load_model
from mlx_relay.model.shard import Shard, parameter_arrays
from tests.support.tiny_model import make_tiny_model_dir

GIB = 1024**3
DEFAULT_SPIN = 2e-3  # the router's own (blas_route.c)


def test_mlx_matmuls_run_on_the_system_blas() -> None:
    library = loaded_blas()
    assert library is not None, "tests/conftest.py loads the BLAS before MLX"
    if library.path is None:
        pytest.skip(f"no system BLAS on this machine (Debian package {BLAS_PACKAGE})")
    # With OpenBLAS installed (as `make test` does) and a C compiler, the router.
    routed = installed_path(OPENBLAS) is not None and compiler() is not None
    assert library.name == (ROUTED if routed else "openblas")
    assert loaded_in_process(library.path)
    # MLX's extension binds its BLAS calls through the global lookup first, which finds
    # the loaded library, not the wheel's own reference BLAS that is mapped beside it.
    assert defining_file("cblas_sgemm") == library.path.resolve()
    assert blas_in_use(library) == library.name
    a = mx.random.normal((64, 96))
    b = mx.random.normal((96, 32))
    assert mx.allclose(a @ b, mx.sum(a[:, :, None] * b[None], axis=1), atol=1e-4).item()


NO_ROUTER = "no BLAS router here (needs libopenblas0-pthread and a C compiler)"


def routed() -> tuple[ctypes.CDLL, BlasLibrary]:
    """The loaded router and library; the test is skipped where there is no router."""
    router = loaded_router()
    if router is None:
        pytest.skip(NO_ROUTER)
    library = loaded_blas()
    assert library is not None
    return router, library


def router_lanes() -> int:
    router = loaded_router()
    assert router is not None
    return int(router.mlx_relay_route_lanes())


def test_the_router_sends_each_product_to_the_code_for_its_shape() -> None:
    router = loaded_router()
    if router is None:
        pytest.skip(NO_ROUTER)
    library = loaded_blas()
    assert library is not None and library.path is not None
    lanes = router_lanes()
    # The kernel takes x @ w.T with weights whose depth is a multiple of its vector lanes.
    weights = mx.random.normal((384, VECTOR_SIDE + 16))
    ragged = mx.random.normal((384, VECTOR_SIDE + lanes // 2))
    attention_keys = mx.random.normal((300, VECTOR_SIDE))
    ragged_keys = mx.random.normal((300, VECTOR_SIDE - lanes // 2))
    mx.eval(weights, ragged, attention_keys, ragged_keys)
    vector, kernel, wide, small = 0, 1, 2, 3
    # Decode steps and prompts alike: every x @ w.T with weights goes to the kernel.
    cases = [(1, weights, kernel), (2, weights, kernel), (16, weights, kernel)]
    cases += [(17, weights, kernel), (300, weights, kernel)]
    cases += [(1, ragged, vector), (3, ragged, wide), (1, attention_keys, small)]
    cases += [(2, attention_keys, small), (17, attention_keys, small)]
    cases += [(64, attention_keys, small), (2, ragged_keys, wide)]
    for rows, w, route in cases:
        x = mx.random.normal((rows, w.shape[1]))
        mx.eval(x)
        before = route_calls(router)
        product = x @ w.T
        mx.eval(product)
        assert moved_calls(before, route_calls(router)) == [int(i == route) for i in range(4)], (
            rows,
            w.shape,
        )
        reference = mx.sum(x[:, None, :] * w[None], axis=2)
        assert mx.allclose(product, reference, atol=1e-3).item(), (rows, w.shape)
    # A product the kernel does not take (alpha and beta of addmm): OpenBLAS's sgemm.
    x, bias = mx.random.normal((3, weights.shape[1])), mx.random.normal((3, weights.shape[0]))
    mx.eval(x, bias)
    before = route_calls(router)
    fused = mx.addmm(bias, x, weights.T, alpha=0.5, beta=2.0)
    mx.eval(fused)
    assert moved_calls(before, route_calls(router)) == [0, 0, 1, 0]
    reference = 2.0 * bias + 0.5 * mx.sum(x[:, None, :] * weights[None], axis=2)
    assert mx.allclose(fused, reference, atol=1e-3).item()
    # Attention's second product: weights over the positions times the values.
    cases = [(1, attention_keys, small), (64, attention_keys, small), (2, ragged_keys, wide)]
    for rows, values, route in cases:
        x = mx.random.normal((rows, values.shape[0]))
        mx.eval(x)
        before = route_calls(router)
        product = x @ values
        mx.eval(product)
        assert moved_calls(before, route_calls(router)) == [int(i == route) for i in range(4)]
        reference = mx.sum(x[:, :, None] * values[None], axis=1)
        assert mx.allclose(product, reference, atol=1e-3).item(), rows


def moved_calls(before: RouteCalls, after: RouteCalls) -> list[int]:
    """Calls routed between two readings: sgemv, kernel, wide, small."""
    return [
        after.vector - before.vector,
        after.kernel - before.kernel,
        after.wide - before.wide,
        after.small - before.small,
    ]


def test_small_products_give_each_row_the_same_bits_alone_in_a_batch_and_over_any_span() -> None:
    """Attention's products: a head's scores and values do not depend on the other sequences
    of a decode step, on how many positions past the last one in use the product spans (the
    attention windows), nor on a prompt's rows coming at once or in chunks (one thread or
    the router's threads)."""
    router = loaded_router()
    if router is None:
        pytest.skip(NO_ROUTER)
    head, used = 64, 70  # positions in use, not a multiple of any tile
    queries = mx.random.normal((13, head))
    keys = mx.random.normal((256, head))
    values = mx.random.normal((256, head))
    mx.eval(queries, keys, values)
    before = route_calls(router)
    scores = queries @ keys.T  # over 256 positions
    for span in (used, 128):
        assert mx.array_equal((queries @ keys[:span].T), scores[:, :span]).item(), span
    for row in range(queries.shape[0]):
        assert mx.array_equal((queries[row : row + 1] @ keys.T)[0], scores[row]).item(), row
    # The weights of the positions past those in use are zero: adding them changes no bit.
    weights = mx.softmax(scores[:, :used], axis=-1)
    padded = mx.concatenate([weights, mx.zeros((weights.shape[0], 256 - used))], axis=1)
    mx.eval(weights, padded)
    out = weights @ values[:used]
    for span in (128, 256):
        assert mx.array_equal(padded[:, :span] @ values[:span], out).item(), span
    for row in range(weights.shape[0]):
        assert mx.array_equal((weights[row : row + 1] @ values[:used])[0], out[row]).item(), row
    calls = route_calls(router)
    assert calls.small - before.small == 3 + 2 * queries.shape[0] + 3
    assert calls.wide == before.wide
    reference = mx.sum(weights[:, :, None] * values[None, :used], axis=1)
    assert mx.allclose(out, reference, atol=1e-4).item()
    # A prompt of 512 positions: its scores and outputs at once (on the router's threads,
    # from 2^23 multiply-adds) and in chunks of 7, 33 and 1 rows (on the calling thread).
    prompt = mx.random.normal((512, head))
    mx.eval(prompt)
    set_route_threads(router, 2)
    try:
        whole = prompt @ keys.T
        probs = mx.softmax(whole, axis=-1)
        mixed = probs @ values
        mx.eval(whole, probs, mixed)
        for lo, hi in ((0, 7), (7, 40), (40, 41), (505, 512)):
            assert mx.array_equal(prompt[lo:hi] @ keys.T, whole[lo:hi]).item(), (lo, hi)
            assert mx.array_equal(probs[lo:hi] @ values, mixed[lo:hi]).item(), (lo, hi)
    finally:
        library = loaded_blas()
        assert library is not None
        set_route_threads(router, library.threads)
    assert mx.allclose(mixed, mx.sum(probs[:, :, None] * values[None], axis=1), atol=1e-4).item()
    # OpenBLAS's sgemm (the router's small products off) computes the same products.
    set_route_small(router, False)
    try:
        calls = route_calls(router)
        assert mx.allclose(queries @ keys.T, scores, atol=1e-4).item()
        assert mx.allclose(weights @ values[:used], out, atol=1e-4).item()
        assert route_calls(router).wide - calls.wide == 2
    finally:
        set_route_small(router, True)


def test_the_kernel_gives_each_row_the_same_bits_alone_in_a_batch_and_on_any_threads() -> None:
    """A decode step's products do not depend on the other sequences in the batch."""
    router, library = routed()
    # Weight rows and batch rows that do not fill the kernel's tiles (4 x 6).
    weights = mx.random.normal((4 * 97 + 3, 12 * router_lanes()))
    batch = mx.random.normal((15, weights.shape[1]))
    mx.eval(weights, batch)
    before = route_calls(router)
    together = batch @ weights.T
    mx.eval(together)
    try:
        for threads in (1, 2, 3):
            set_route_threads(router, threads)
            for row in range(batch.shape[0]):
                alone = batch[row : row + 1] @ weights.T
                assert mx.array_equal(alone[0], together[row]).item(), (threads, row)
            pair = batch[5:7] @ weights.T
            assert mx.array_equal(pair, together[5:7]).item(), threads
    finally:
        set_route_threads(router, library.threads)
    assert route_calls(router).kernel - before.kernel == 1 + 3 * (batch.shape[0] + 1)
    reference = mx.sum(batch[:, None, :] * weights[None], axis=2)
    assert mx.allclose(together, reference, atol=1e-3).item()


def test_a_prompts_rows_get_the_same_bits_at_once_or_in_chunks() -> None:
    """A prompt prefilled whole or in chunks (chunked prefill, a stage's batch of prompts),
    past the kernel's blocks of 128 rows, on one thread or several: the same bits."""
    router, library = routed()
    weights = mx.random.normal((6 * 40 + 5, 12 * router_lanes()))
    prompt = mx.random.normal((300, weights.shape[1]))
    mx.eval(weights, prompt)
    whole = prompt @ weights.T
    mx.eval(whole)
    try:
        for threads in (1, 2):
            set_route_threads(router, threads)
            for lo, hi in ((0, 1), (1, 17), (17, 145), (145, 300), (0, 300)):
                chunk = prompt[lo:hi] @ weights.T
                assert mx.array_equal(chunk, whole[lo:hi]).item(), (threads, lo, hi)
    finally:
        set_route_threads(router, library.threads)
    reference = mx.sum(prompt[:, None, :] * weights[None], axis=2)
    assert mx.allclose(whole, reference, atol=1e-3).item()


def test_helpers_spin_through_a_step_and_sleep_once_it_ends() -> None:
    """Between a step's products the helpers spin (no wake-up for the next product); a
    stage whose step is over sends them to sleep at once, leaving the cores to others."""
    router, library = routed()
    weights = mx.random.normal((256, 12 * router_lanes()))  # the kernel's shape
    batch = mx.random.normal((4, weights.shape[1]))
    mx.eval(weights, batch)
    set_route_spin(router, 600.0)  # longer than this test: only a rest ends the spin
    try:
        set_route_threads(router, 2)
        spinning_result = batch @ weights.T
        mx.eval(spinning_result)
        started, _ = route_helpers(router)
        assert started >= 1
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            assert route_helpers(router) == (started, 0), "spinning, not asleep"
            time.sleep(0.01)
        rest_threads()
        deadline = time.monotonic() + 10
        while route_helpers(router)[1] < started and time.monotonic() < deadline:
            time.sleep(0.005)
        assert route_helpers(router) == (started, started)
        # A rest with nothing spinning changes nothing; the next product wakes them all
        # (the caller waits for every helper) and gives the same bits.
        rest_threads()
        woken_result = batch @ weights.T
        mx.eval(woken_result)
        assert route_helpers(router) == (started, 0), "the product did not wake the helpers"
        assert mx.array_equal(woken_result, spinning_result).item()
    finally:
        set_route_spin(router, DEFAULT_SPIN)
        set_route_threads(router, library.threads)
        rest_threads()


def test_one_row_products_as_matrix_vector_products_keep_every_layout() -> None:
    """A one-row ``sgemm`` becomes a ``sgemv``: transposed operands, strides and ``addmm``'s
    alpha and beta must all come out as the product's."""
    router = loaded_router()
    if router is None:
        pytest.skip(NO_ROUTER)
    # A depth the kernel cannot take (not a multiple of its lanes): all to sgemv.
    k, n = VECTOR_SIDE + 36, VECTOR_SIDE + 8
    for transposed_x in (False, True):
        for transposed_w in (False, True):
            x = mx.random.normal((k, 1)).T if transposed_x else mx.random.normal((1, k))
            w = mx.random.normal((n, k)).T if transposed_w else mx.random.normal((k, n))
            reference = mx.sum(x[:, :, None] * w[None], axis=1)
            bias = mx.random.normal((1, n))
            before = route_calls(router)
            assert mx.allclose(x @ w, reference, atol=1e-3).item()
            fused = mx.addmm(bias, x, w, alpha=0.5, beta=2.0)
            assert mx.allclose(fused, 2.0 * bias + 0.5 * reference, atol=1e-3).item()
            assert route_calls(router).vector - before.vector == 2


@pytest.mark.parametrize("name", ["openblas", "blis"])
def test_mlx_relay_blas_picks_one_library(name: str) -> None:
    known = {"openblas": OPENBLAS, "blis": BLIS}[name]
    path = installed_path(known)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package {known.package})")
    # A fresh process: the library must be loaded before MLX is.
    script = (
        "from mlx_relay.core.blas import load_blas, loaded_router, set_threads\n"
        "library = load_blas()\n"
        "import mlx.core as mx\n"
        "from mlx_relay.model.backend import blas_in_use\n"
        "assert set_threads(1).threads == 1\n"
        "print(blas_in_use(), library.path, loaded_router() is None)\n"
    )
    env = {**os.environ, BLAS_ENV: name}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, check=True, capture_output=True, text=True
    ).stdout.split()
    assert out == [name, str(path), "True"]


def test_an_unknown_mlx_relay_blas_is_refused_by_name() -> None:
    env = {**os.environ, BLAS_ENV: "mkl"}
    script = "from mlx_relay.cli import main; raise SystemExit(main(['--help']))"
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "mlx-relay: error: MLX_RELAY_BLAS: expected one of auto, blis, openblas, got 'mkl'"
    ]


def test_a_library_loaded_after_mlx_is_not_reported_as_in_use() -> None:
    library = loaded_blas()
    if library is None or library.path is None:
        pytest.skip(f"no OpenBLAS on this machine (Debian package {BLAS_PACKAGE})")
    late = BlasLibrary(library.name, library.path, library.threads, before_mlx=False)
    assert blas_in_use(late) == "bundled"
    missing = BlasLibrary("openblas", Path("/nonexistent/libopenblas.so.0"), 1)
    assert blas_in_use(missing) == "bundled"


def test_blas_threads_are_set_and_shared_out_per_host() -> None:
    library = load_blas()
    if library.path is None:
        pytest.skip(f"no OpenBLAS on this machine (Debian package {BLAS_PACKAGE})")
    before = library.threads
    try:
        assert set_threads(1).threads == 1
    finally:
        set_threads(max(1, before))
    with pytest.raises(ValueError, match=">= 1"):
        set_threads(0)
    assert default_threads(2, cores=2) == 1
    assert default_threads(1, cores=16) == 16
    assert default_threads(3, cores=16) == 5
    assert default_threads(4, cores=2) == 1
    assert same_host("127.0.0.1", "localhost") and same_host("::1", "127.0.0.1")
    assert not same_host("10.0.0.1", "10.0.0.2")


def test_auto_compute_picks_dense_float32_only_on_cpu_where_it_fits() -> None:
    fits = choose_compute("auto", "cpu", 1 * GIB, 8 * GIB, 0.5, quantized=True)
    assert fits.compute == "float32"
    assert "fit 50% of the available memory (8.0 GiB)" in fits.reason
    too_big = choose_compute("auto", "cpu", 5 * GIB, 8 * GIB, 0.5, quantized=True)
    assert too_big.compute == "quantized"
    assert "exceed 50%" in too_big.reason
    assert choose_compute("auto", "cuda", 1, 8 * GIB, 0.5, quantized=True).compute == "quantized"
    assert choose_compute("auto", "metal", 1, 8 * GIB, 0.5, quantized=True).compute == "quantized"
    assert choose_compute("float32", "cuda", 9 * GIB, GIB, 0.5, quantized=True).compute == "float32"
    assert choose_compute("quantized", "cpu", 1, GIB, 0.5, quantized=True).compute == "quantized"
    assert backend_name() == "cpu"


def test_a_stage_dequantizes_only_its_own_layers(tmp_path: Path) -> None:
    path = make_tiny_model_dir(tmp_path / "q", arch="llama", num_layers=4, quantize=True)
    quantized = load_model(path, LayerRange(1, 3))
    assert is_quantized(quantized)
    expected = dense_bytes(quantized)
    dense = load_model(path, LayerRange(1, 3), compute="float32")
    assert not is_quantized(dense)
    arrays = parameter_arrays(dense)
    assert {a.dtype for a in arrays} == {mx.float32}
    assert sum(a.nbytes for a in arrays) == expected
    assert dense.model.layers[0] is None and dense.model.layers[3] is None
    assert Shard(dense, LayerRange(1, 3)).compute == "float32"
    assert Shard(quantized, LayerRange(1, 3)).compute == "quantized"
    # auto on this CPU backend: a tiny stage fits any machine's memory.
    assert not is_quantized(load_model(path, LayerRange(1, 3), compute="auto"))


def test_dense_weights_start_on_a_cache_line_and_compute_the_same_bits(tmp_path: Path) -> None:
    """The router's kernel loads whole cache lines: a stage's float32 matrices are moved to
    aligned memory at load (MLX's own arrays start 8 bytes past a boundary), values kept."""
    path = make_tiny_model_dir(tmp_path / "m", arch="llama", num_layers=2, hidden_size=128)
    dense = load_model(path, LayerRange(0, 2), compute="float32")
    matrices = [a for a in parameter_arrays(dense) if a.ndim == 2 and a.size >= 4096]
    assert matrices, "the tiny model must have matrices to align"
    assert all(data_address(a) % WEIGHT_ALIGNMENT == 0 for a in matrices)
    # The same weights in MLX's own (unaligned) arrays give the same logits, bit for bit.
    plain = load_model(path, LayerRange(0, 2), compute="float32")
    plain.update(
        tree_map(
            lambda a: mx.array(np.array(a)) if isinstance(a, mx.array) else a, plain.parameters()
        )
    )
    mx.eval(plain.parameters())
    unaligned = [a for a in parameter_arrays(plain) if a.ndim == 2 and a.size >= 4096]
    assert any(data_address(a) % WEIGHT_ALIGNMENT for a in unaligned)
    tokens = mx.array([[5, 17, 42, 3, 99, 7, 250, 11]])
    assert mx.array_equal(dense(tokens), plain(tokens)).item()
    # Aligned already: nothing moves.
    assert align_weights(dense) == 0


def test_the_kernel_serves_callers_on_several_threads_at_once() -> None:
    """Workers of one process compute on their own threads: a caller that finds the
    router's threads busy computes its product alone, and every product is right."""
    import threading

    import numpy as np

    router, library = routed()
    rng = np.random.default_rng(7)
    n, k = 1000, 16 * router_lanes()
    weights = rng.standard_normal((n, k), dtype=np.float32)
    sgemm = router.cblas_sgemm
    pointer, count = ctypes.c_void_p, ctypes.c_int
    sgemm.argtypes = [count] * 6 + [ctypes.c_float, pointer, count, pointer, count]
    sgemm.argtypes += [ctypes.c_float, pointer, count]
    sgemm.restype = None
    errors: list[str] = []

    def caller(rows: int) -> None:
        x = rng.standard_normal((rows, k), dtype=np.float32)
        reference = x.astype(np.float64) @ weights.T.astype(np.float64)
        for _ in range(200):
            out = np.zeros((rows, n), np.float32)
            sgemm(101, 111, 112, rows, n, k, 1.0, x.ctypes.data, k, weights.ctypes.data, k,
                  0.0, out.ctypes.data, n)  # fmt: skip
            if not np.allclose(out, reference, atol=1e-3):
                errors.append(f"{rows} rows: off by {np.abs(out - reference).max()}")
                return

    set_route_threads(router, 2)
    try:
        threads = [threading.Thread(target=caller, args=(rows,)) for rows in (1, 3, 8, 16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in threads), "a caller never returned"
    finally:
        set_route_threads(router, library.threads)
    assert errors == []
