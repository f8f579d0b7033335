"""Malformed Forward calls get the right status code and a clear message, and the worker keeps
serving everyone else meanwhile."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from mlx_relay.model.generate import generate_tokens
from mlx_relay.model.load import load_model
from mlx_relay.proto import relay_pb2 as pb
from mlx_relay.proto import relay_pb2_grpc as pb_grpc
from mlx_relay.wire import encode_token_ids
from tests.support.worker_cluster import (
    RunningWorker,
    entry,
    generate,
    pipeline_step,
    running_workers,
    worker_config,
)

PROMPT = [5, 17, 42, 99, 3, 8]
HIDDEN = 64
MAX_PROMPT = 16
MAX_SESSIONS = 3
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def greedy_tokens(tiny_model_dir: Path) -> list[int]:
    model = load_model(tiny_model_dir)
    return [t.token_id for t in generate_tokens(model, PROMPT, 4)]


@pytest.fixture
async def workers(tiny_model_dir: Path) -> AsyncIterator[list[RunningWorker]]:
    config = worker_config(
        tiny_model_dir,
        [(0, 2), (2, 4)],
        inference={"max_prompt_tokens": MAX_PROMPT, "max_sessions": MAX_SESSIONS},
        network={"max_message_mb": 1},
    )
    async with running_workers(config) as running:
        yield running


def hidden(length: int, dtype: str = "<f4", width: int = HIDDEN) -> pb.Tensor:
    values = np.zeros((1, length, width), dtype=dtype)
    name = {"<f4": "float32", "<f2": "float16"}[dtype]
    return pb.Tensor(data=values.tobytes(), dtype=name, shape=list(values.shape))


def ids_tensor(values: list[int], shape: list[int] | None = None) -> pb.Tensor:
    data = np.asarray(values, dtype="<i4").tobytes()
    return pb.Tensor(data=data, dtype="int32", shape=shape or [1, len(values)])


BadCall = Callable[[list[pb_grpc.WorkerStub]], object]

CASES: list[tuple[str, int, pb.ForwardRequest, grpc.StatusCode, str]] = [
    (
        "float-token-ids",
        0,
        entry("bad", 0, pb.Tensor(data=b"\0" * 12, dtype="float32", shape=[1, 3])),
        INVALID,
        "request 'bad': token ids: expected dtype int32, got 'float32'",
    ),
    (
        "hidden-wrong-dtype",
        1,
        entry("bad", 0, hidden(3, "<f2")),
        INVALID,
        "hidden states: expected dtype float32, got 'float16'",
    ),
    (
        "hidden-wrong-width",
        1,
        entry("bad", 0, hidden(3, width=HIDDEN + 1)),
        INVALID,
        "expected shape [1, L, 64], got [1, 3, 65]",
    ),
    (
        "ids-wrong-rank",
        0,
        entry("bad", 0, ids_tensor([1, 2, 3], shape=[3])),
        INVALID,
        "rank 1 instead of 2",
    ),
    (
        "byte-length",
        0,
        entry("bad", 0, pb.Tensor(data=b"\0" * 10, dtype="int32", shape=[1, 3])),
        INVALID,
        "10 data bytes for shape [1, 3] int32, expected 12",
    ),
    (
        "zero-length",
        0,
        entry("bad", 0, pb.Tensor(data=b"", dtype="int32", shape=[1, 0])),
        INVALID,
        "dimension 1 must be >= 1",
    ),
    (
        "token-outside-vocab",
        0,
        entry("bad", 0, ids_tensor([1, 384])),
        INVALID,
        "token id 384 is outside the vocabulary [0, 384)",
    ),
    (
        "negative-token",
        0,
        entry("bad", 0, ids_tensor([-1, 2])),
        INVALID,
        "token id -1 is outside",
    ),
    ("empty-request-id", 0, entry("", 0, ids_tensor([1])), INVALID, "request_id must not be empty"),
    (
        "unknown-session",
        0,
        entry("ghost", 5, ids_tensor([1])),
        grpc.StatusCode.NOT_FOUND,
        "no session for request 'ghost' at position 5",
    ),
    (
        "oversize-prefill",
        0,
        entry("big", 0, ids_tensor([1] * (MAX_PROMPT + 1))),
        INVALID,
        f"17 positions in one step exceed max_prompt_tokens = {MAX_PROMPT}",
    ),
    ("no-entries", 0, pb.ForwardRequest(), INVALID, "at least one entry"),
    (
        "no-tensor",
        0,
        pb.ForwardRequest(entries=[pb.ForwardEntry(request_id="bad")]),
        INVALID,
        "carries no tensor",
    ),
    (
        "bad-sampling",
        1,
        entry("bad", 0, hidden(2), sampling=pb.SamplingParams(temperature=-1)),
        INVALID,
        "request 'bad': temperature must be >= 0",
    ),
]


@pytest.mark.parametrize(
    ("stage", "request_message", "code", "message"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
async def test_malformed_forward_is_rejected_while_others_proceed(
    workers: list[RunningWorker],
    greedy_tokens: list[int],
    stage: int,
    request_message: pb.ForwardRequest,
    code: grpc.StatusCode,
    message: str,
) -> None:
    stubs = [w.stub for w in workers]

    async def bad_call() -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stubs[stage].Forward(request_message, timeout=10)
        return info.value

    good, error = await asyncio.gather(generate(stubs, "good", PROMPT, 4), bad_call())
    assert error.code() == code
    assert message in (error.details() or "")
    assert [r.token_id for r in good] == greedy_tokens
    # Nothing was opened for the rejected request on either stage.
    assert [w.server.kv_sessions for w in workers] == [1, 1]


async def test_position_must_match_the_cached_length(workers: list[RunningWorker]) -> None:
    first = workers[0].stub
    await first.Forward(entry("p", 0, ids_tensor([1, 2, 3])))
    for position, fragment in ((2, "position 2 does not match the 3"), (0, "position 0"), (4, "")):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await first.Forward(entry("p", position, ids_tensor([4])))
        assert info.value.code() == INVALID
        assert fragment in (info.value.details() or "")
    response = await first.Forward(entry("p", 3, ids_tensor([4])))
    assert response.results[0].cached_tokens == 4


async def test_session_limit_is_resource_exhausted(workers: list[RunningWorker]) -> None:
    first = workers[0].stub
    for i in range(MAX_SESSIONS):
        await first.Forward(entry(f"s{i}", 0, ids_tensor([1, 2])))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await first.Forward(entry("one-too-many", 0, ids_tensor([1])))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"already holds {MAX_SESSIONS} of at most {MAX_SESSIONS} sessions" in (
        info.value.details() or ""
    )
    # Existing sessions continue; ending one makes room.
    assert (await first.Forward(entry("s0", 2, ids_tensor([3])))).results[0].cached_tokens == 3
    await first.EndSession(pb.EndSessionRequest(request_id="s1"))
    await first.Forward(entry("one-too-many", 0, ids_tensor([1])))
    assert workers[0].server.kv_sessions == MAX_SESSIONS


async def test_oversized_message_is_rejected_by_grpc(workers: list[RunningWorker]) -> None:
    first = workers[0].stub
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await first.Ping(pb.PingRequest(payload=b"x" * (1024 * 1024 + 1)))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await workers[1].stub.Forward(entry("huge", 0, hidden(5000)))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    pong = await first.Ping(pb.PingRequest(payload=b"x" * 1000 * 1000))
    assert len(pong.payload) == 1000 * 1000


async def test_invalid_entry_fails_the_whole_call(workers: list[RunningWorker]) -> None:
    first = workers[0]
    request = pb.ForwardRequest(
        entries=[
            pb.ForwardEntry(request_id="fine", position=0, tensor=ids_tensor([1, 2])),
            pb.ForwardEntry(request_id="broken", position=0, tensor=ids_tensor([999])),
        ]
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await first.stub.Forward(request)
    assert info.value.code() == INVALID
    assert "request 'broken'" in (info.value.details() or "")
    assert first.server.kv_sessions == 0

    request = pb.ForwardRequest(
        entries=[
            pb.ForwardEntry(request_id="x", position=0, tensor=ids_tensor([1, 2])),
            pb.ForwardEntry(request_id="x", position=0, tensor=ids_tensor([1, 2])),
        ]
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await first.stub.Forward(request)
    assert info.value.code() == INVALID
    assert "appears more than once" in (info.value.details() or "")


async def test_multi_entry_call_equals_separate_calls(tiny_model_dir: Path) -> None:
    async with running_workers(worker_config(tiny_model_dir, [(0, 4)])) as (worker,):
        singles = [
            (await pipeline_step([worker.stub], f"single{i}", 0, ids)).token_id
            for i, ids in enumerate((PROMPT, PROMPT[:3]))
        ]
        response = await worker.stub.Forward(
            pb.ForwardRequest(
                entries=[
                    pb.ForwardEntry(request_id="a", position=0, tensor=encode_token_ids(PROMPT)),
                    pb.ForwardEntry(
                        request_id="b", position=0, tensor=encode_token_ids(PROMPT[:3])
                    ),
                ]
            )
        )
        assert [r.request_id for r in response.results] == ["a", "b"]
        assert [r.token_id for r in response.results] == singles
        assert [r.cached_tokens for r in response.results] == [len(PROMPT), 3]


async def test_context_overflow_is_invalid_argument(tiny_model_dir: Path) -> None:
    config = worker_config(tiny_model_dir, [(0, 4)])
    config = config.model_copy(update={"model": config.model.model_copy(update={"max_context": 8})})
    async with running_workers(config) as (worker,):
        await worker.stub.Forward(entry("c", 0, ids_tensor([1] * 6)))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await worker.stub.Forward(entry("c", 6, ids_tensor([1, 2, 3])))
        assert info.value.code() == INVALID
        assert "6 cached + 3 new tokens exceed the model's context of 8" in (
            info.value.details() or ""
        )
