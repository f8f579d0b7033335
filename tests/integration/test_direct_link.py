"""Direct links (``network.direct_link``): Forward calls on a plain TCP connection beside
each worker's gRPC port, with the tokens, token check, size limit, metrics and failures of
the gRPC stream, against real workers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from mlx_relay.coordinator.orchestrator import InferenceRequest
from mlx_relay.core.config import NetworkConfig
from mlx_relay.core.errors import WorkerUnavailable
from mlx_relay.direct_link import HEADER, MAGIC, frame, open_link
from mlx_relay.proto import relay_pb2 as pb
from mlx_relay.stream_client import ACCEPTED_KEY, DIRECT_PORT_KEY
from mlx_relay.wire import encode_token_ids
from mlx_relay.worker import direct_link as worker_link
from mlx_relay.worker.forward_stream import StreamCalls
from mlx_relay.worker.worker_server import WorkerServer
from mlx_relay.worker_client import WorkerClient
from tests.support.cluster import local_cluster
from tests.support.worker_cluster import entry, running_workers, stand_in_worker, worker_config

PROMPT = "Each worker holds a contiguous range of transformer layers"


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int, int]] = []

    def record_rpc(
        self, peer: str, method: str, seconds: float, code: str, sent: int = 0, received: int = 0
    ) -> None:
        self.calls.append((method, code, sent, received))


@pytest.fixture
def on_links(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The device id of each worker as it takes a call on a direct link."""
    taken: list[str] = []

    class Counted(StreamCalls):
        def take(self, call: pb.ForwardCall, received: float) -> None:
            taken.append(self._servicer.state.device_id)
            super().take(call, received)

    monkeypatch.setattr(worker_link, "StreamCalls", Counted)
    return taken


async def test_the_pipeline_runs_on_direct_links_with_the_tokens_of_grpc_streams(
    tiny_model_dir: Path, on_links: list[str]
) -> None:
    tokens = {}
    for direct in (True, False):
        on_links.clear()
        async with local_cluster(
            tiny_model_dir, 3, network={"direct_link": direct}, enable_monitoring=True
        ) as cluster:
            ports = [w.direct_link_port for w in cluster.workers]
            requests = [
                InferenceRequest(prompt=PROMPT[: 20 + 9 * i], max_tokens=8) for i in range(3)
            ]
            responses = await asyncio.gather(
                *(cluster.orchestrator.process_request(r) for r in requests)
            )
            # Once the first answers have named the links, the next requests take them.
            responses += await asyncio.gather(
                *(cluster.orchestrator.process_request(r) for r in requests)
            )
            collector = cluster.orchestrator.metrics_collector
            assert collector is not None
            snapshot = collector.export_metrics()
            assert sum(w.kv_sessions for w in cluster.workers) == 0
        tokens[direct] = [r.token_ids for r in responses]
        if direct:
            assert all(p > 0 for p in ports) and len(set(ports)) == 3
            # The coordinator's calls to the first stage and each relay hop's.
            assert set(on_links) == {"worker-0", "worker-1", "worker-2"}
            # Recorded as Forward calls, as on the stream.
            forwards = [e for e in snapshot["network"]["rpc"] if e["method"] == "Forward"]
            assert {e["peer"] for e in forwards} == {"worker-0"}
        else:
            assert ports == [0, 0, 0] and on_links == []
    assert tokens[True] == tokens[False]
    assert tokens[True][:3] == tokens[True][3:]


async def first_call_on_link(client: WorkerClient, taken: list[str]) -> pb.ForwardResponse:
    """Calls until one arrives on the worker's direct link (the first goes on the stream,
    whose answer names the link); returns that call's response."""
    for i in range(200):
        before = len(taken)
        reply = await client.forward(entry(f"r{i}", 0, encode_token_ids([1, 2, 3])))
        if len(taken) > before:
            return reply
        await asyncio.sleep(0.01)  # the link opens beside the calls
    raise AssertionError("no call went on the direct link")


async def test_a_client_moves_to_the_link_and_records_its_calls(
    tiny_model_dir: Path, on_links: list[str]
) -> None:
    config = worker_config(tiny_model_dir, [(0, 4)], network={"auth_token": "s3cret"})
    recorder = Recorder()
    async with running_workers(config) as (worker,):
        client = WorkerClient(
            "w0", f"127.0.0.1:{worker.server.port}", config.network, recorder=recorder
        )
        try:
            reply = await first_call_on_link(client, on_links)
            again = await client.forward(entry("again", 0, encode_token_ids([4, 5])))
        finally:
            await client.close()
    assert reply.results and again.results[0].request_id == "again"
    assert on_links[-2:] == ["w0", "w0"]
    # Every call, on the stream or the link, is one Forward with its bytes both ways.
    assert len(recorder.calls) == len(on_links) + 1
    assert all(m == "Forward" and c == "OK" and s > 0 and r > 0 for m, c, s, r in recorder.calls)


async def test_a_link_without_the_token_is_refused(tiny_model_dir: Path) -> None:
    config = worker_config(tiny_model_dir, [(0, 4)], network={"auth_token": "s3cret"})
    async with running_workers(config) as (worker,):
        port = worker.server.direct_link_port
        limit = 1 << 20
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await open_link("127.0.0.1", port, "wrong", limit)
        with pytest.raises(grpc.aio.AioRpcError):
            await open_link("127.0.0.1", port, None, limit)
        link = await open_link("127.0.0.1", port, "s3cret", limit)
        try:
            answer = await link.forward(entry("r", 0, encode_token_ids([1, 2, 3])), timeout=10)
        finally:
            link.close()
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "network.auth_token" in (refused.value.details() or "")
    assert not answer.code and answer.response.results[0].request_id == "r"


def closed_by_worker(port: int, data: bytes, hello: bool = False) -> bytes:
    """What the worker sends back to ``data`` (after the hello and its answer when
    ``hello``) until it closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        if hello:
            sock.sendall(MAGIC + frame(b""))
            welcome = b""
            while len(welcome) < HEADER.size:
                welcome += sock.recv(HEADER.size - len(welcome))
            assert welcome == frame(b"")  # taken
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
    return received


async def test_bad_bytes_close_only_their_connection(tiny_model_dir: Path) -> None:
    config = worker_config(tiny_model_dir, [(0, 4)], network={"max_message_mb": 1})
    async with running_workers(config) as (worker,):
        port = worker.server.direct_link_port
        loop = asyncio.get_running_loop()
        not_a_link = await loop.run_in_executor(
            None, closed_by_worker, port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        too_large = HEADER.pack((1 << 20) + 1)
        oversized = await loop.run_in_executor(None, closed_by_worker, port, too_large, True)
        not_a_call = await loop.run_in_executor(
            None, closed_by_worker, port, frame(b"\xff\xff\xff"), True
        )
        link = await open_link("127.0.0.1", port, None, 1 << 20)
        try:
            answer = await link.forward(entry("r", 0, encode_token_ids([1, 2, 3])), timeout=10)
        finally:
            link.close()
    assert not_a_link == b""
    # Taken, then closed without an answer at the frame over the 1 MB limit or the bad one.
    assert oversized == b"" and not_a_call == b""
    assert not answer.code and answer.response.results[0].request_id == "r"


StreamHandler = Callable[[AsyncIterator[pb.ForwardCall], Any], Awaitable[None]]


def stream_server(stream: StreamHandler) -> contextlib.AbstractAsyncContextManager[str]:
    """A real gRPC server whose ``ForwardStream`` is ``stream``; yields its address."""
    handler = grpc.stream_stream_rpc_method_handler(
        stream,
        request_deserializer=pb.ForwardCall.FromString,
        response_serializer=pb.ForwardAnswer.SerializeToString,
    )
    return stand_in_worker({"ForwardStream": handler})


def naming_a_dead_port() -> contextlib.AbstractAsyncContextManager[str]:
    """A worker stand-in whose ``ForwardStream`` names a direct link port nothing listens
    on, and answers each call with its request id as the device id."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]

    async def stream(calls: AsyncIterator[pb.ForwardCall], context: Any) -> None:
        await context.send_initial_metadata(((ACCEPTED_KEY, "1"), (DIRECT_PORT_KEY, str(dead))))
        async for call in calls:
            response = pb.ForwardResponse(device_id=call.request.entries[0].request_id)
            await context.write(pb.ForwardAnswer(call_id=call.call_id, response=response))

    return stream_server(stream)


async def test_a_link_that_cannot_be_opened_leaves_the_calls_on_the_stream(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="mlx_relay.worker_client")
    async with naming_a_dead_port() as address:
        client = WorkerClient("w", address, NetworkConfig())
        try:
            replies = []
            for i in range(5):
                replies.append((await client.forward(entry(f"r{i}", 0, pb.Tensor()))).device_id)
                await asyncio.sleep(0.05)  # time for the link to be tried
        finally:
            await client.close()
    assert replies == [f"r{i}" for i in range(5)]
    tried = [r for r in caplog.records if "cannot be opened" in r.getMessage()]
    assert len(tried) == 1  # once per port named, not once per call


def stuck_stage() -> contextlib.AbstractAsyncContextManager[str]:
    """A worker stand-in that takes ForwardStreams and never answers a call on them."""

    async def stream(calls: AsyncIterator[pb.ForwardCall], context: Any) -> None:
        await context.send_initial_metadata(((ACCEPTED_KEY, "1"),))
        async for _ in calls:
            pass

    return stream_server(stream)


async def test_a_worker_going_away_fails_the_call_on_its_link_as_unreachable(
    tiny_model_dir: Path, on_links: list[str]
) -> None:
    config = worker_config(tiny_model_dir, [(0, 2), (2, 4)])
    async with stuck_stage() as stuck, running_workers(config) as (first, _):
        client = WorkerClient("w0", f"127.0.0.1:{first.server.port}", config.network)
        try:
            await first_call_on_link(client, on_links)
            held = entry("held", 0, encode_token_ids([1, 2, 3]))
            held.route.append(pb.Hop(device_id="w1", address=stuck))
            before = len(on_links)
            call = asyncio.ensure_future(client.forward(held, timeout=60))
            async with asyncio.timeout(10):
                while len(on_links) == before:
                    await asyncio.sleep(0.01)  # until the worker has taken it on the link
            await first.server.stop(grace=0)
            with pytest.raises(WorkerUnavailable) as lost:
                await call
        finally:
            await client.close()
    # Unreachable, named at once: not the stuck hop's deadline (WorkerTimedOut, w1).
    assert lost.value.device_id == "w0"
    assert "connection lost" in str(lost.value)


async def test_a_restarted_worker_gets_a_new_link_and_the_client_moves_to_it(
    tiny_model_dir: Path, on_links: list[str]
) -> None:
    config = worker_config(tiny_model_dir, [(0, 4)])
    first = WorkerServer(config, "w0")
    await first.start(wait=True)
    address = f"127.0.0.1:{first.port}"
    # The same worker again, on the same gRPC port: its direct link gets a new port.
    device = config.devices[0].model_copy(update={"port": first.port})
    again = config.model_copy(update={"devices": [device]})
    client = WorkerClient("w0", address, config.network)
    second: WorkerServer | None = None
    try:
        await first_call_on_link(client, on_links)
        old_port = first.direct_link_port
        await first.stop(grace=0)
        second = WorkerServer(again, "w0")
        await second.start(wait=True)
        # The old link closed with the worker: the next calls go on the stream, which
        # reconnects, until the new worker's link is open.
        reply = await first_call_on_link(client, on_links)
    finally:
        await client.close()
        await first.stop(grace=0)
        if second is not None:
            await second.stop(grace=0)
    assert second.direct_link_port not in (0, old_port)
    assert reply.results
