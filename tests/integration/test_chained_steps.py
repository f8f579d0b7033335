"""Chained steps: the first stage starts a request's next decode step from the token the
last stage sampled, as soon as the step before comes back to it, without the coordinator
in between (mlx_relay/worker/chain.py). Same tokens as unchained steps; a chained step
fails as the step before it failed, or by its deadline, never waits forever."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from mlx_relay.coordinator.connect import (
    CHAINED_STEPS_GPU,
    chained_steps_max_batch,
    scheduler_settings,
)
from mlx_relay.coordinator.orchestrator import InferenceRequest
from mlx_relay.core.config import ClusterConfig
from mlx_relay.model.backend import backend_name
from mlx_relay.proto import relay_pb2, relay_pb2_grpc
from mlx_relay.rpc_errors import WorkerTimedOut
from mlx_relay.wire import encode_token_ids
from mlx_relay.worker import service
from mlx_relay.worker_client import WorkerClient
from tests.support.cluster import LocalCluster, cluster_dict, kv_sessions, local_cluster


def requests() -> list[InferenceRequest]:
    return [
        InferenceRequest(prompt="The first stage holds", max_tokens=9),
        InferenceRequest(prompt="Tokens come back", max_tokens=4),
        InferenceRequest(prompt="A pipeline of workers", max_tokens=12, stop=["e"]),
        InferenceRequest(prompt="Sampled", max_tokens=7, temperature=0.9, seed=11, logprobs=True),
    ]


@pytest.fixture
def chained_entries(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many chained entries the in-process workers took (the real function runs)."""
    taken: list[int] = []
    real = service.chained_inputs

    async def counting(chain: Any, request: relay_pb2.ForwardRequest, *args: Any) -> float:
        taken.extend(1 for entry in request.entries if entry.chained)
        return await real(chain, request, *args)

    monkeypatch.setattr(service, "chained_inputs", counting)
    return taken


async def run_all(model_dir: Path, stages: int, chain: int) -> tuple[list[list[int]], list[str]]:
    async with local_cluster(
        model_dir, stages, inference={"chained_steps_max_batch": chain}
    ) as cluster:
        orchestrator = cluster.orchestrator
        solo = [await orchestrator.process_request(r) for r in requests()]
        together = await asyncio.gather(*(orchestrator.process_request(r) for r in requests()))
        for _ in range(100):  # EndSession follows each request's end
            if not any(await kv_sessions(cluster.config)):
                break
            await asyncio.sleep(0.05)
        assert await kv_sessions(cluster.config) == [0] * stages
    assert [r.token_ids for r in together] == [r.token_ids for r in solo]
    assert together[3].logprobs is not None and len(together[3].logprobs) == 7
    return [r.token_ids for r in solo], [r.finish_reason for r in solo]


@pytest.mark.parametrize("stages", [1, 2, 3])
async def test_chained_steps_give_the_tokens_of_unchained_ones(
    tiny_model_dir: Path, stages: int, chained_entries: list[int]
) -> None:
    unchained = await run_all(tiny_model_dir, stages, chain=0)
    assert chained_entries == []
    chained = await run_all(tiny_model_dir, stages, chain=4)
    assert chained_entries, "no step was chained"
    assert chained == unchained
    assert [len(ids) for ids in chained[0]][:2] == [9, 4]


def entry(
    position: int, ids: list[int] | None = None, rid: str = "r", **fields: Any
) -> relay_pb2.ForwardEntry:
    message = relay_pb2.ForwardEntry(request_id=rid, position=position, **fields)
    if ids is not None:
        message.tensor.CopyFrom(encode_token_ids(ids))
    return message


@dataclass
class FirstStage:
    """Unary Forward calls to the first of two in-process stages, routed to the second."""

    cluster: LocalCluster
    route: list[relay_pb2.Hop]
    stub: relay_pb2_grpc.WorkerStub

    async def forward(self, *entries: relay_pb2.ForwardEntry) -> relay_pb2.ForwardResponse:
        request = relay_pb2.ForwardRequest(entries=list(entries), route=self.route)
        return await self.stub.Forward(request, timeout=30)

    async def token(self, *entries: relay_pb2.ForwardEntry) -> int:
        return int((await self.forward(*entries)).results[0].token_id)


@contextlib.asynccontextmanager
async def first_stage(model_dir: Path) -> AsyncIterator[FirstStage]:
    async with local_cluster(model_dir, 2, initialize=False) as cluster:
        first, last = cluster.config.workers
        route = [relay_pb2.Hop(device_id=last.id, address=last.address)]
        async with grpc.aio.insecure_channel(first.address) as channel:
            yield FirstStage(cluster, route, relay_pb2_grpc.WorkerStub(channel))


async def test_a_chained_step_waits_for_the_step_before_and_samples_what_an_unchained_one_does(
    tiny_model_dir: Path,
) -> None:
    async with first_stage(tiny_model_dir) as stage:
        # Unchained: the prompt's first token, then two decode steps.
        expected = [await stage.token(entry(0, [5, 6, 7], "one"))]
        for position in (3, 4):
            expected.append(await stage.token(entry(position, [expected[-1]], "one")))

        # Chained: the step at 4 is sent first and waits for the step at 3.
        got = [await stage.token(entry(0, [5, 6, 7], "two"))]
        chained = asyncio.ensure_future(stage.token(entry(4, rid="two", chained=True)))
        await asyncio.sleep(0.2)
        assert not chained.done()
        got.append(await stage.token(entry(3, [got[-1]], "two")))
        got.append(await chained)
    assert got == expected


async def test_a_chained_step_fails_as_the_step_before_it_or_by_its_deadline(
    tiny_model_dir: Path,
) -> None:
    async with first_stage(tiny_model_dir) as stage:
        chained = asyncio.ensure_future(stage.forward(entry(8, chained=True)))
        await asyncio.sleep(0.2)
        # The step before: position 7 of a request the stages hold no session for.
        with pytest.raises(grpc.aio.AioRpcError) as before:
            await stage.forward(entry(7, [3]))
        with pytest.raises(grpc.aio.AioRpcError) as after:
            await chained
        assert after.value.code() == before.value.code() == grpc.StatusCode.NOT_FOUND

        # On the stream a call's deadline is the worker's to keep: a chained step whose
        # step before never comes fails by it and stops waiting (else the same step sent
        # again would be refused as already waiting).
        first, last = stage.cluster.config.workers
        client = WorkerClient(first.id, first.address, stage.cluster.config.network)
        try:
            for _ in range(2):
                with pytest.raises(WorkerTimedOut):
                    await client.forward(
                        relay_pb2.ForwardRequest(
                            entries=[entry(20, chained=True)], route=stage.route
                        ),
                        timeout=0.5,
                    )
                await asyncio.sleep(0.2)
        finally:
            await client.close()

        async with grpc.aio.insecure_channel(last.address) as channel:
            stub = relay_pb2_grpc.WorkerStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Forward(
                    relay_pb2.ForwardRequest(entries=[entry(1, chained=True)]), timeout=30
                )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "a chained entry goes to the first stage only" in (refused.value.details() or "")


def test_chained_steps_are_on_by_default_where_this_machine_computes_on_a_gpu(
    tiny_model_dir: Path,
) -> None:
    default = ClusterConfig.from_dict(cluster_dict(tiny_model_dir, 2))
    assert default.inference.chained_steps_max_batch is None
    expected = 0 if backend_name() == "cpu" else CHAINED_STEPS_GPU
    assert chained_steps_max_batch(default) == expected
    assert scheduler_settings(default).chain_max_batch == expected
    chosen = cluster_dict(tiny_model_dir, 2, inference={"chained_steps_max_batch": 2})
    assert scheduler_settings(ClusterConfig.from_dict(chosen)).chain_max_batch == 2
