"""The BLAS router is built once per machine into the cache, from the packaged C source."""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

import pytest

from mlx_relay.core.blas_route import build_router, compiler, router_source


def test_the_router_is_built_once_into_the_cache(tmp_path: Path) -> None:
    if compiler() is None:
        pytest.skip("no C compiler (make run and make test install g++)")
    built = build_router(tmp_path)
    assert built is not None and built.parent == tmp_path / "native"
    assert built.name.startswith("blas_route-") and built.suffix == ".so"
    # Nothing left beside it from the build.
    assert [p.name for p in built.parent.iterdir()] == [built.name]
    library = ctypes.CDLL(str(built), mode=os.RTLD_LOCAL)
    for symbol in (
        "cblas_sgemm",
        "mlx_relay_route_set",
        "mlx_relay_route_threads",
        "mlx_relay_route_calls",
    ):
        assert getattr(library, symbol)
    stamp = built.stat().st_mtime_ns
    assert build_router(tmp_path) == built and built.stat().st_mtime_ns == stamp


def test_without_a_compiler_the_router_is_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with caplog.at_level(logging.WARNING, logger="mlx_relay.core.blas_route"):
        assert build_router(tmp_path) is None
    assert [r.getMessage() for r in caplog.records] == [
        "no C compiler found to build the BLAS router: OpenBLAS serves all shapes"
    ]


def test_a_compiler_error_is_one_warning_and_no_library(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    failing = tmp_path / "failing-cc"
    failing.write_text("#!/bin/sh\necho 'blas_route.c: error: no space left' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("CC", str(failing))
    with caplog.at_level(logging.WARNING, logger="mlx_relay.core.blas_route"):
        assert build_router(tmp_path) is None
    assert len(caplog.records) == 1
    assert "no space left" in caplog.records[0].getMessage()
    assert list((tmp_path / "native").iterdir()) == []


def test_the_source_ships_with_the_package() -> None:
    assert b"void cblas_sgemm(" in router_source()
