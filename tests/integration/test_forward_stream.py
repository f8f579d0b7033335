"""Forward calls on one long-lived stream per worker (``ForwardStream``): the same tokens,
errors, deadlines and metrics as unary calls, against real workers and a real gRPC server
whose answers the tests script (out of order, late, failing, missing)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from mlx_relay.coordinator.orchestrator import InferenceRequest
from mlx_relay.core.config import NetworkConfig
from mlx_relay.core.errors import QueueFull, WorkerUnavailable
from mlx_relay.proto import relay_pb2 as pb
from mlx_relay.stream_client import ACCEPTED_KEY, STREAM_MAX_BYTES
from mlx_relay.wire import encode_token_ids
from mlx_relay.worker import service
from mlx_relay.worker_client import StageError, WorkerClient, WorkerTimedOut
from tests.support.cluster import local_cluster
from tests.support.worker_cluster import entry, running_workers, stand_in_worker, worker_config

PROMPT = "Each worker holds a contiguous range of transformer layers"

StreamHandler = Callable[[AsyncIterator[pb.ForwardCall], grpc.aio.ServicerContext], Awaitable[None]]


@contextlib.asynccontextmanager
async def scripted_worker(
    stream: StreamHandler | None,
    unary_calls: list[pb.ForwardRequest] | None = None,
    accept: bool = True,
) -> AsyncIterator[str]:
    """A real gRPC server at the address yielded: ``ForwardStream`` answered by ``stream``
    (none when None: UNIMPLEMENTED), after taking it as a worker does unless ``accept`` is
    false; unary ``Forward`` answering with its request's first request id as device id
    (each call appended to ``unary_calls``)."""

    async def forward(request: pb.ForwardRequest, context: Any) -> pb.ForwardResponse:
        if unary_calls is not None:
            unary_calls.append(request)
        return pb.ForwardResponse(device_id=f"unary {request.entries[0].request_id}")

    handlers: dict[str, grpc.RpcMethodHandler] = {
        "Forward": grpc.unary_unary_rpc_method_handler(
            forward,
            request_deserializer=pb.ForwardRequest.FromString,
            response_serializer=pb.ForwardResponse.SerializeToString,
        )
    }

    async def accepted(calls: AsyncIterator[pb.ForwardCall], context: Any) -> None:
        if accept:
            await context.send_initial_metadata(((ACCEPTED_KEY, "1"),))  # as a worker does
        assert stream is not None
        await stream(calls, context)

    if stream is not None:
        handlers["ForwardStream"] = grpc.stream_stream_rpc_method_handler(
            accepted,
            request_deserializer=pb.ForwardCall.FromString,
            response_serializer=pb.ForwardAnswer.SerializeToString,
        )
    async with stand_in_worker(handlers) as address:
        yield address


def step(request_id: str, payload: bytes = b"") -> pb.ForwardRequest:
    tensor = pb.Tensor(data=payload, dtype="int32", shape=[1, len(payload) // 4])
    return pb.ForwardRequest(entries=[pb.ForwardEntry(request_id=request_id, tensor=tensor)])


def answered(call: pb.ForwardCall) -> pb.ForwardAnswer:
    """The scripted answer: the call's first request id as the response's device id."""
    return pb.ForwardAnswer(
        call_id=call.call_id,
        response=pb.ForwardResponse(device_id=f"streamed {call.request.entries[0].request_id}"),
    )


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str, int, int]] = []

    def record_rpc(
        self, peer: str, method: str, seconds: float, code: str, sent: int = 0, received: int = 0
    ) -> None:
        self.calls.append((peer, method, code, sent, received))


async def test_answers_in_any_order_reach_their_own_calls() -> None:
    async def reversed_answers(calls: AsyncIterator[pb.ForwardCall], context: Any) -> None:
        first = await anext(calls)
        second = await anext(calls)
        await context.write(answered(second))
        await context.write(answered(first))
        async for call in calls:
            await context.write(answered(call))

    recorder = Recorder()
    async with scripted_worker(reversed_answers) as address:
        client = WorkerClient("w", address, NetworkConfig(), recorder=recorder)
        try:
            one = asyncio.ensure_future(client.forward(step("one")))
            await asyncio.sleep(0.05)  # "one" is written first
            two = asyncio.ensure_future(client.forward(step("two")))
            replies = await asyncio.gather(one, two)
            third = await client.forward(step("three"))
        finally:
            await client.close()
    assert [r.device_id for r in replies] == ["streamed one", "streamed two"]
    assert third.device_id == "streamed three"
    assert [(peer, method, code) for peer, method, code, _, _ in recorder.calls] == [
        ("w", "Forward", "OK")
    ] * 3
    assert all(sent > 0 and received > 0 for *_, sent, received in recorder.calls)


async def test_a_call_past_its_deadline_times_out_and_the_stream_serves_the_next() -> None:
    seen: list[float] = []

    async def ignores_the_first(calls: AsyncIterator[pb.ForwardCall], context: Any) -> None:
        async for call in calls:
            seen.append(call.timeout_seconds)
            if call.request.entries[0].request_id != "lost":
                await context.write(answered(call))

    recorder = Recorder()
    async with scripted_worker(ignores_the_first) as address:
        client = WorkerClient("w", address, NetworkConfig(), recorder=recorder)
        try:
            started = time.monotonic()
            with pytest.raises(WorkerTimedOut) as timed_out:
                await client.forward(step("lost"), timeout=0.3)
            waited = time.monotonic() - started
            reply = await client.forward(step("next"), timeout=5)
        finally:
            await client.close()
    assert str(timed_out.value) == (
        "worker 'w': no answer to Forward within 0.3 s (deadline exceeded)"
    )
    assert 0.3 <= waited < 3
    assert reply.device_id == "streamed next"
    assert seen == [0.3, 5.0]  # each call's deadline travels with it
    assert [code for _, _, code, _, _ in recorder.calls] == ["DEADLINE_EXCEEDED", "OK"]


async def test_a_stream_the_worker_never_takes_times_out_its_calls() -> None:
    async def stuck(calls: AsyncIterator[pb.ForwardCall], context: Any) -> None:
        await asyncio.sleep(60)

    async with scripted_worker(stuck, accept=False) as address:
        client = WorkerClient("w", address, NetworkConfig())
        try:
            first = asyncio.ensure_future(client.forward(step("first"), timeout=0.3))
            await asyncio.sleep(0.05)  # "second" waits behind the first's write
            second = asyncio.ensure_future(client.forward(step("second"), timeout=5))
            failures = await asyncio.gather(first, second, return_exceptions=True)
        finally:
            await client.close()
    assert isinstance(failures[0], WorkerTimedOut), failures[0]
    # Its stream was dropped with the cut-off write: the call waiting its turn fails at
    # once as unreachable, not as an error of the worker's.
    assert isinstance(failures[1], WorkerUnavailable), failures[1]
    assert not isinstance(failures[1], WorkerTimedOut)
    assert "the Forward stream was closed" in str(failures[1])


async def test_a_failed_stream_fails_its_calls_and_the_next_call_opens_a_new_one() -> None:
    streams = 0

    async def first_stream_breaks(calls: AsyncIterator[pb.ForwardCall], context: Any) -> None:
        nonlocal streams
        streams += 1
        if streams == 1:
            await anext(calls)
            await anext(calls)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "worker going away")
        async for call in calls:
            await context.write(answered(call))

    async with scripted_worker(first_stream_breaks) as address:
        client = WorkerClient("w", address, NetworkConfig())
        try:
            pending = [asyncio.ensure_future(client.forward(step(f"r{i}"))) for i in range(2)]
            failures = await asyncio.gather(*pending, return_exceptions=True)
            reply = await client.forward(step("after"))
        finally:
            await client.close()
    assert all(isinstance(f, WorkerUnavailable) for f in failures), failures
    assert all("Forward failed: unreachable (worker going away)" in str(f) for f in failures)
    assert reply.device_id == "streamed after"
    assert streams == 2


async def test_calls_written_as_the_stream_ends_fail_as_unreachable() -> None:
    # Writes racing the stream's end get INTERNAL from gRPC in place of the stream's status
    # (grpc/grpc#36066): a burst makes some of them race it, however the timing falls.
    async def ends_after_one(calls: AsyncIterator[pb.ForwardCall], context: Any) -> None:
        await anext(calls)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "worker going away")

    async with scripted_worker(ends_after_one) as address:
        client = WorkerClient("w", address, NetworkConfig())
        try:
            burst = [asyncio.ensure_future(client.forward(step(f"r{i}"))) for i in range(40)]
            failures = await asyncio.gather(*burst, return_exceptions=True)
        finally:
            await client.close()
    assert all(isinstance(f, WorkerUnavailable) for f in failures), {
        type(f).__name__ + ": " + str(f) for f in failures
    }
    assert not any(isinstance(f, StageError) for f in failures)


async def test_a_failed_call_is_the_error_its_unary_call_raises() -> None:
    async def fails_each(calls: AsyncIterator[pb.ForwardCall], context: Any) -> None:
        async for call in calls:
            request_id = call.request.entries[0].request_id
            if request_id == "bad":
                await context.write(
                    pb.ForwardAnswer(call_id=call.call_id, code="INVALID_ARGUMENT", detail="no")
                )
            elif request_id == "downstream":
                await context.write(
                    pb.ForwardAnswer(
                        call_id=call.call_id,
                        code="UNAVAILABLE",
                        detail="Forward failed: unreachable (gone)",
                        failed_device="w9",
                    )
                )
            else:
                await context.write(answered(call))

    async with scripted_worker(fails_each) as address:
        client = WorkerClient("w", address, NetworkConfig())
        try:
            with pytest.raises(StageError) as bad:
                await client.forward(step("bad"))
            with pytest.raises(WorkerUnavailable) as downstream:
                await client.forward(step("downstream"))
            reply = await client.forward(step("fine"))  # the stream outlives its failed calls
        finally:
            await client.close()
    assert (bad.value.code, bad.value.detail, bad.value.device_id) == (
        "INVALID_ARGUMENT",
        "no",
        "w",
    )
    assert downstream.value.device_id == "w9"
    assert reply.device_id == "streamed fine"


async def test_a_worker_without_the_stream_is_called_unary() -> None:
    unary: list[pb.ForwardRequest] = []
    async with scripted_worker(None, unary) as address:
        client = WorkerClient("w", address, NetworkConfig())
        try:
            replies = [await client.forward(step(f"r{i}")) for i in range(2)]
        finally:
            await client.close()
    assert [r.device_id for r in replies] == ["unary r0", "unary r1"]
    assert len(unary) == 2


async def test_a_large_call_and_the_switched_off_stream_go_unary() -> None:
    unary: list[pb.ForwardRequest] = []
    streamed: list[str] = []

    async def answers(calls: AsyncIterator[pb.ForwardCall], context: Any) -> None:
        async for call in calls:
            streamed.append(call.request.entries[0].request_id)
            await context.write(answered(call))

    async with scripted_worker(answers, unary) as address:
        client = WorkerClient("w", address, NetworkConfig())
        off = WorkerClient("w", address, NetworkConfig(forward_stream=False))
        try:
            large = await client.forward(step("large", bytes(STREAM_MAX_BYTES)))
            small = await client.forward(step("small"))
            unstreamed = await off.forward(step("off"))
        finally:
            await client.close()
            await off.close()
    assert (large.device_id, small.device_id, unstreamed.device_id) == (
        "unary large",
        "streamed small",
        "unary off",
    )
    assert streamed == ["small"]
    assert [r.entries[0].request_id for r in unary] == ["large", "off"]


async def test_the_pipeline_runs_on_streams_and_gives_the_tokens_of_unary_calls(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    streams: list[str] = []
    unary: list[str] = []
    serve_stream, forward = service.serve_stream, service.WorkerServicer.Forward

    async def counted_stream(servicer: Any, calls: Any, context: Any, limit: Any) -> None:
        streams.append(servicer.state.device_id)
        await serve_stream(servicer, calls, context, limit)

    async def counted_forward(self: Any, request: Any, context: Any) -> Any:
        unary.append(self.state.device_id)
        return await forward(self, request, context)

    monkeypatch.setattr(service, "serve_stream", counted_stream)
    monkeypatch.setattr(service.WorkerServicer, "Forward", counted_forward)
    tokens = {}
    for streamed in (True, False):
        network = {"forward_stream": streamed}
        async with local_cluster(tiny_model_dir, 3, network=network) as cluster:
            requests = [
                InferenceRequest(prompt=PROMPT[: 20 + 9 * i], max_tokens=6) for i in range(3)
            ]
            responses = await asyncio.gather(
                *(cluster.orchestrator.process_request(r) for r in requests)
            )
            tokens[streamed] = [r.token_ids for r in responses]
        if streamed:
            # One stream from the coordinator to the first stage, one per relay hop.
            assert sorted(streams) == ["worker-0", "worker-1", "worker-2"]
            assert unary == []
        else:
            assert len(streams) == 3 and unary.count("worker-0") >= 7
    assert tokens[True] == tokens[False]
    assert all(len(t) == 6 for t in tokens[True])


async def test_a_stream_holds_at_most_the_workers_call_limit(tiny_model_dir: Path) -> None:
    async def never_answers(calls: AsyncIterator[pb.ForwardCall], context: Any) -> None:
        async for _ in calls:
            pass

    config = worker_config(tiny_model_dir, [(0, 2), (2, 4)], network={"maximum_concurrent_rpcs": 2})
    async with (
        scripted_worker(never_answers) as stuck,
        running_workers(config) as (first, _),
    ):
        client = WorkerClient("w0", f"127.0.0.1:{first.server.port}", config.network)
        route = [pb.Hop(device_id="w1", address=stuck)]
        try:
            held = []
            for i in range(2):
                request = entry(f"r{i}", 0, encode_token_ids([1, 2, 3]))
                request.route.extend(route)
                held.append(asyncio.ensure_future(client.forward(request, timeout=2)))
            await asyncio.sleep(0.3)  # both are computed and waiting on the stuck next stage
            with pytest.raises(QueueFull, match="Concurrent RPC limit exceeded: 2 Forward"):
                await client.forward(entry("r2", 0, encode_token_ids([1, 2, 3])), timeout=2)
            failures = await asyncio.gather(*held, return_exceptions=True)
        finally:
            await client.close()
    # The held calls fail at their relay hop's deadline, naming the stuck stage.
    assert all(isinstance(f, WorkerTimedOut) and f.device_id == "w1" for f in failures), failures


async def test_a_stream_without_the_token_is_refused(tiny_model_dir: Path) -> None:
    config = worker_config(tiny_model_dir, [(0, 4)], network={"auth_token": "s3cret"})
    async with running_workers(config) as (worker,):
        address = f"127.0.0.1:{worker.server.port}"
        tokenless = WorkerClient("w0", address, NetworkConfig())
        holder = WorkerClient("w0", address, config.network)
        try:
            with pytest.raises(StageError) as refused:
                await tokenless.forward(entry("r", 0, encode_token_ids([1, 2, 3])))
            reply = await holder.forward(entry("r", 0, encode_token_ids([1, 2, 3])))
        finally:
            await tokenless.close()
            await holder.close()
    assert refused.value.code == "UNAUTHENTICATED"
    assert "Bearer <network.auth_token>" in refused.value.detail
    assert reply.results[0].request_id == "r"
