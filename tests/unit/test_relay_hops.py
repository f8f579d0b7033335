"""The relay's pure parts: each hop's deadline and how a downstream failure is named."""

from __future__ import annotations

import grpc
import grpc.aio
import pytest

from mlx_relay.core.errors import WorkerUnavailable
from mlx_relay.worker.relay import hop_timeout
from mlx_relay.worker_client import (
    FAILED_DEVICE_KEY,
    StageError,
    WorkerTimedOut,
    translate_rpc_error,
)


def rpc_error(code: grpc.StatusCode, details: str, failed: str | None) -> grpc.aio.AioRpcError:
    trailing = grpc.aio.Metadata(*([(FAILED_DEVICE_KEY, failed)] if failed else []))
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details)


def test_a_hop_keeps_a_margin_of_what_its_caller_left() -> None:
    assert hop_timeout(None, 30.0) == 30.0
    assert hop_timeout(10.0, 30.0) == pytest.approx(9.0)
    assert hop_timeout(0.2, 30.0) == pytest.approx(0.15)
    assert hop_timeout(100.0, 30.0) == 30.0
    # Three hops in a row: each one ends before its caller's deadline.
    first = hop_timeout(3.0, 3.0)
    second = hop_timeout(first, 3.0)
    assert 0 < second < first < 3.0


def test_a_relayed_timeout_names_the_stage_that_did_not_answer() -> None:
    exc = rpc_error(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "no answer to Forward within 2.7 s (deadline exceeded)",
        "worker-2",
    )
    error = translate_rpc_error("worker-0", "Forward", exc, 3.0)
    assert isinstance(error, WorkerTimedOut)
    assert error.device_id == "worker-2"
    assert str(error) == "worker 'worker-2': no answer to Forward within 2.7 s (deadline exceeded)"


def test_a_relayed_failure_keeps_its_kind_and_names_the_stage() -> None:
    down = translate_rpc_error(
        "worker-0",
        "Forward",
        rpc_error(grpc.StatusCode.UNAVAILABLE, "Forward failed: unreachable", "worker-1"),
    )
    assert type(down) is WorkerUnavailable and down.device_id == "worker-1"
    bad = translate_rpc_error(
        "worker-0",
        "Forward",
        rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "hidden states: wrong dtype", "worker-1"),
    )
    assert isinstance(bad, StageError) and bad.device_id == "worker-1"
    assert bad.code == "INVALID_ARGUMENT"
    own = translate_rpc_error(
        "worker-0", "Forward", rpc_error(grpc.StatusCode.UNAVAILABLE, "connection refused", None)
    )
    assert own.device_id == "worker-0"  # type: ignore[attr-defined]
