"""In-process workers on port 0 for tests, and a minimal pipeline driver over their stubs."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from mlx_relay.core.config import ClusterConfig
from mlx_relay.proto import relay_pb2 as pb
from mlx_relay.proto import relay_pb2_grpc as pb_grpc
from mlx_relay.wire import encode_token_ids
from mlx_relay.worker.worker_server import WorkerServer


def worker_config(
    model_dir: Path,
    ranges: Sequence[tuple[int, int]],
    *,
    inference: dict[str, Any] | None = None,
    network: dict[str, Any] | None = None,
    monitoring: dict[str, Any] | None = None,
) -> ClusterConfig:
    """A config with one worker per ``[start, end)`` range, ids ``w0``, ``w1``..., port 0."""
    devices = [
        {"id": f"w{i}", "host": "127.0.0.1", "port": 0, "layers": list(r)}
        for i, r in enumerate(ranges)
    ]
    data: dict[str, Any] = {"model": {"path": str(model_dir)}, "devices": devices}
    for key, value in (("inference", inference), ("network", network), ("monitoring", monitoring)):
        if value:
            data[key] = value
    return ClusterConfig.from_dict(data)


@dataclass
class RunningWorker:
    server: WorkerServer
    channel: grpc.aio.Channel
    stub: pb_grpc.WorkerStub


@contextlib.asynccontextmanager
async def running_workers(
    config: ClusterConfig, *, enable_monitoring: bool = False
) -> AsyncIterator[list[RunningWorker]]:
    """Start every worker of ``config`` (ready), yield them with a channel and stub each."""
    servers = [
        WorkerServer(config, w.id, enable_monitoring=enable_monitoring) for w in config.workers
    ]
    running: list[RunningWorker] = []
    try:
        for server in servers:
            await server.start()
        for server in servers:
            await server.wait_until_ready(timeout=60)
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
            running.append(RunningWorker(server, channel, pb_grpc.WorkerStub(channel)))
        yield running
    finally:
        for worker in running:
            await worker.channel.close()
        for server in servers:
            await server.stop(grace=0.5)


@contextlib.asynccontextmanager
async def stand_in_worker(handlers: dict[str, grpc.RpcMethodHandler]) -> AsyncIterator[str]:
    """A real gRPC server answering the Worker service's methods named in ``handlers`` (the
    others UNIMPLEMENTED) on a free loopback port; yields its address."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("mlxrelay.v1.Worker", handlers),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


def entry(
    request_id: str,
    position: int,
    tensor: pb.Tensor,
    *,
    step: int = 0,
    sampling: pb.SamplingParams | None = None,
) -> pb.ForwardRequest:
    """A one-entry Forward request."""
    message = pb.ForwardEntry(request_id=request_id, position=position, tensor=tensor, step=step)
    if sampling is not None:
        message.sampling.CopyFrom(sampling)
    return pb.ForwardRequest(entries=[message])


async def pipeline_step(
    stubs: Sequence[pb_grpc.WorkerStub],
    request_id: str,
    position: int,
    token_ids: Sequence[int],
    *,
    step: int = 0,
    sampling: pb.SamplingParams | None = None,
) -> pb.ForwardResult:
    """Run token ids through every stage in order; the last stage's result."""
    tensor = encode_token_ids(token_ids)
    result = pb.ForwardResult()
    for stub in stubs:
        response = await stub.Forward(
            entry(request_id, position, tensor, step=step, sampling=sampling), timeout=30
        )
        result = response.results[0]
        tensor = result.tensor
    return result


async def generate(
    stubs: Sequence[pb_grpc.WorkerStub],
    request_id: str,
    prompt: Sequence[int],
    max_tokens: int,
    sampling: pb.SamplingParams | None = None,
) -> list[pb.ForwardResult]:
    """Generate like ``generate_tokens``: prefill ``prompt[:-1]``, then one token per call."""
    if len(prompt) > 1:
        await pipeline_step(stubs, request_id, 0, prompt[:-1], sampling=sampling)
    position, token = len(prompt) - 1, prompt[-1]
    results = []
    for step in range(max_tokens):
        result = await pipeline_step(
            stubs, request_id, position, [token], step=step, sampling=sampling
        )
        results.append(result)
        position, token = position + 1, result.token_id
    return results
