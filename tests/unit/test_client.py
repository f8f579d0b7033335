"""WorkerClient against a scripted Worker service on a real gRPC server (port 0)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from mlx_relay.coordinator.client import (
    StageError,
    WorkerClient,
    WorkerTimedOut,
)
from mlx_relay.core.config import NetworkConfig
from mlx_relay.core.errors import QueueFull, WorkerUnavailable
from mlx_relay.proto import relay_pb2, relay_pb2_grpc


@dataclass
class Script:
    """What the fake worker does; tests change it between calls."""

    fail_status: list[grpc.StatusCode] = field(default_factory=list)
    forward_code: grpc.StatusCode | None = None
    forward_delay: float = 0.0
    calls: dict[str, int] = field(default_factory=dict)
    metadata: list[dict[str, str]] = field(default_factory=list)


class FakeWorker(relay_pb2_grpc.WorkerServicer):
    def __init__(self, script: Script) -> None:
        self.script = script

    def _count(self, name: str, context: Any) -> None:
        self.script.calls[name] = self.script.calls.get(name, 0) + 1
        self.script.metadata.append(dict(context.invocation_metadata()))

    async def Forward(self, request: Any, context: Any) -> relay_pb2.ForwardResponse:
        self._count("Forward", context)
        if self.script.forward_delay:
            await asyncio.sleep(self.script.forward_delay)
        if self.script.forward_code is not None:
            await context.abort(self.script.forward_code, "scripted failure")
        entry = request.entries[0]
        return relay_pb2.ForwardResponse(
            results=[relay_pb2.ForwardResult(request_id=entry.request_id, token_id=7)],
            device_id="fake",
            compute_seconds=0.001,
        )

    async def EndSession(self, request: Any, context: Any) -> relay_pb2.EndSessionResponse:
        self._count("EndSession", context)
        return relay_pb2.EndSessionResponse(request_id=request.request_id, existed=True)

    async def Ping(self, request: Any, context: Any) -> relay_pb2.PingResponse:
        self._count("Ping", context)
        return relay_pb2.PingResponse(payload=request.payload, sent_at=request.sent_at)

    async def GetStatus(self, request: Any, context: Any) -> relay_pb2.StatusResponse:
        self._count("GetStatus", context)
        if self.script.fail_status:
            await context.abort(self.script.fail_status.pop(0), "scripted status failure")
        return relay_pb2.StatusResponse(device_id="fake", layer_start=0, layer_end=2)


@dataclass
class FakeServer:
    address: str
    script: Script
    health: Any
    server: grpc.aio.Server


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str, int, int]] = []

    def record_rpc(
        self,
        peer: str,
        method: str,
        seconds: float,
        code: str,
        sent_bytes: int = 0,
        received_bytes: int = 0,
    ) -> None:
        assert seconds >= 0
        self.calls.append((peer, method, code, sent_bytes, received_bytes))


@pytest.fixture
async def fake() -> AsyncIterator[FakeServer]:
    script = Script()
    server = grpc.aio.server()
    relay_pb2_grpc.add_WorkerServicer_to_server(FakeWorker(script), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield FakeServer(f"127.0.0.1:{port}", script, health, server)
    await server.stop(0)


def network(**overrides: Any) -> NetworkConfig:
    values: dict[str, Any] = {
        "request_timeout": 2.0,
        "ping_timeout": 1.0,
        "retries": 2,
        "retry_backoff": 0.01,
    }
    values.update(overrides)
    return NetworkConfig(**values)


def forward_request(request_id: str = "r1") -> relay_pb2.ForwardRequest:
    return relay_pb2.ForwardRequest(entries=[relay_pb2.ForwardEntry(request_id=request_id)])


async def test_ping_echoes_and_records_the_call(fake: FakeServer) -> None:
    recorder = Recorder()
    client = WorkerClient("w0", fake.address, network(), recorder=recorder)
    try:
        rtt = await client.ping(b"x" * 100)
    finally:
        await client.close()
    assert 0 < rtt < 1.0
    [(peer, method, code, sent, received)] = recorder.calls
    assert (peer, method, code) == ("w0", "Ping", "OK")
    assert sent >= 100 and received >= 100


async def test_status_is_retried_while_unavailable(fake: FakeServer) -> None:
    fake.script.fail_status = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE]
    recorder = Recorder()
    client = WorkerClient("w0", fake.address, network(retries=2), recorder=recorder)
    try:
        status = await client.get_status()
    finally:
        await client.close()
    assert (status.layer_start, status.layer_end) == (0, 2)
    assert fake.script.calls["GetStatus"] == 3
    assert [c[2] for c in recorder.calls] == ["UNAVAILABLE", "UNAVAILABLE", "OK"]


async def test_status_gives_up_after_the_configured_retries(fake: FakeServer) -> None:
    fake.script.fail_status = [grpc.StatusCode.UNAVAILABLE] * 5
    client = WorkerClient("w0", fake.address, network(retries=1))
    try:
        with pytest.raises(WorkerUnavailable, match=r"'w0'.*GetStatus.*unreachable"):
            await client.get_status()
    finally:
        await client.close()
    assert fake.script.calls["GetStatus"] == 2


async def test_status_without_retry_fails_at_once(fake: FakeServer) -> None:
    fake.script.fail_status = [grpc.StatusCode.UNAVAILABLE]
    client = WorkerClient("w0", fake.address, network(retries=3))
    try:
        with pytest.raises(WorkerUnavailable):
            await client.get_status(retry=False)
    finally:
        await client.close()
    assert fake.script.calls["GetStatus"] == 1


async def test_forward_is_never_retried(fake: FakeServer) -> None:
    fake.script.forward_code = grpc.StatusCode.UNAVAILABLE
    client = WorkerClient("w0", fake.address, network(retries=3))
    try:
        with pytest.raises(WorkerUnavailable) as info:
            await client.forward(forward_request())
    finally:
        await client.close()
    assert info.value.device_id == "w0"
    assert fake.script.calls["Forward"] == 1


async def test_forward_deadline_names_the_worker(fake: FakeServer) -> None:
    fake.script.forward_delay = 5.0
    client = WorkerClient("w0", fake.address, network(request_timeout=0.3))
    start = time.monotonic()
    try:
        with pytest.raises(WorkerTimedOut, match=r"worker 'w0': no answer to Forward within 0.3"):
            await client.forward(forward_request())
    finally:
        await client.close()
    assert time.monotonic() - start < 3.0


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (grpc.StatusCode.RESOURCE_EXHAUSTED, QueueFull),
        (grpc.StatusCode.INVALID_ARGUMENT, StageError),
        (grpc.StatusCode.NOT_FOUND, StageError),
    ],
)
async def test_forward_errors_are_typed(
    fake: FakeServer, code: grpc.StatusCode, error: type[Exception]
) -> None:
    fake.script.forward_code = code
    client = WorkerClient("w0", fake.address, network())
    try:
        with pytest.raises(error, match="w0"):
            await client.forward(forward_request())
    finally:
        await client.close()


async def test_message_size_limit_is_explicit(fake: FakeServer) -> None:
    client = WorkerClient("w0", fake.address, network(max_message_mb=1))
    try:
        with pytest.raises(StageError, match="max_message_mb"):
            await client.ping(b"x" * (1024 * 1024 + 10))
        assert await client.ping(b"x" * 1000) > 0
    finally:
        await client.close()


async def test_bearer_token_is_sent(fake: FakeServer) -> None:
    client = WorkerClient("w0", fake.address, network(auth_token="s3cret"))
    try:
        await client.ping()
        await client.forward(forward_request())
    finally:
        await client.close()
    assert [m.get("authorization") for m in fake.script.metadata] == ["Bearer s3cret"] * 2


async def test_no_token_no_authorization_header(fake: FakeServer) -> None:
    client = WorkerClient("w0", fake.address, network())
    try:
        await client.ping()
    finally:
        await client.close()
    assert "authorization" not in fake.script.metadata[0]


async def test_end_session_reports_existence(fake: FakeServer) -> None:
    client = WorkerClient("w0", fake.address, network())
    try:
        assert await client.end_session("r1") is True
    finally:
        await client.close()


async def test_wait_serving_follows_health(fake: FakeServer) -> None:
    await fake.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    client = WorkerClient("w0", fake.address, network())
    try:
        assert await client.health() == "NOT_SERVING"
        waiter = asyncio.create_task(client.wait_serving(5.0))
        await asyncio.sleep(0.2)
        assert not waiter.done()
        await fake.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await asyncio.wait_for(waiter, 5.0)
        assert await client.health() == "SERVING"
    finally:
        await client.close()


async def test_wait_serving_times_out_with_last_status(fake: FakeServer) -> None:
    await fake.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    client = WorkerClient("w0", fake.address, network())
    try:
        with pytest.raises(WorkerUnavailable, match=r"not serving.*health NOT_SERVING"):
            await client.wait_serving(0.5)
    finally:
        await client.close()


async def test_nothing_listening_is_unavailable_with_address() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = WorkerClient("w9", f"127.0.0.1:{port}", network(retries=0))
    try:
        with pytest.raises(WorkerUnavailable, match=f"'w9'.*127.0.0.1:{port}"):
            await client.wait_serving(0.5)
        with pytest.raises(WorkerUnavailable, match="unreachable"):
            await client.forward(forward_request())
    finally:
        await client.close()


async def test_recording_failure_does_not_fail_the_call(fake: FakeServer) -> None:
    class Broken:
        def record_rpc(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("collector broken")

    client = WorkerClient("w0", fake.address, network(), recorder=Broken())
    try:
        response = await client.forward(forward_request("abc"))
    finally:
        await client.close()
    assert response.results[0].request_id == "abc"
