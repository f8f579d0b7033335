"""hypothesis fuzzes a live worker's RPCs: Forward, EndSession and Ping with random shapes,
dtypes, byte lengths, request ids, positions, steps and sampling parameters, to a first
stage (token ids in) and a last stage (hidden states in, sampled tokens out), worker
subprocesses of their own.

Every answer is OK or INVALID_ARGUMENT / NOT_FOUND / RESOURCE_EXHAUSTED (never UNKNOWN or
INTERNAL, never a hang), both workers stay up and serving, a real request still gets the
tokens it got before, and each worker's resident memory stays bounded.

Deterministic and bounded: hypothesis is derandomized, keeps no example database, runs a
fixed number of examples and does not shrink.
"""

from __future__ import annotations

import itertools
import math
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from mlx_relay.cli.fleet import worker_command
from mlx_relay.proto import relay_pb2 as pb
from mlx_relay.proto import relay_pb2_grpc as pb_grpc
from mlx_relay.wire import encode_token_ids
from tests.support.cluster import child_environment, cluster_dict, free_ports

HIDDEN = 64  # the tiny model's width
VOCAB = 384  # and its vocabulary
MAX_PROMPT = 16
MAX_SESSIONS = 4
MAX_MESSAGE_MB = 1
EXAMPLES = 300
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
# Resident memory a worker may gain over the whole fuzz run (its caches are bounded by
# max_sessions and max_prompt_tokens; anything near this would be a leak).
RSS_GROWTH_LIMIT = 200 * 2**20
PROMPT = [5, 17, 42, 99, 3, 8]
IDS = ["a", "b", "c", "d", "e"]


@dataclass
class Worker:
    device_id: str
    address: str
    process: subprocess.Popen[bytes]
    channel: grpc.Channel
    stub: pb_grpc.WorkerStub
    log: Path

    @property
    def rss(self) -> int:
        return int(psutil.Process(self.process.pid).memory_info().rss)

    def serving(self) -> bool:
        health = health_pb2_grpc.HealthStub(self.channel)
        try:
            answer = health.Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError:
            return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


@pytest.fixture(scope="module")
def workers(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Worker]]:
    work = tmp_path_factory.mktemp("worker-fuzz")
    data = cluster_dict(
        tiny_model_dir,
        2,
        ports=free_ports(2),
        layers=[(0, 2), (2, 4)],
        inference={"max_prompt_tokens": MAX_PROMPT, "max_sessions": MAX_SESSIONS},
        network={"max_message_mb": MAX_MESSAGE_MB},
    )
    config_path = work / "cluster.yaml"
    config_path.write_text(yaml.safe_dump(data))
    started: list[Worker] = []
    try:
        for device in data["devices"][1:]:
            log = work / f"{device['id']}.log"
            with open(log, "ab") as out:
                process = subprocess.Popen(
                    worker_command(config_path, device["id"], monitoring=False, grace=0.5),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=child_environment(),
                )
            address = f"127.0.0.1:{device['port']}"
            channel = grpc.insecure_channel(address)
            stub = pb_grpc.WorkerStub(channel)
            started.append(Worker(device["id"], address, process, channel, stub, log))
        deadline = time.monotonic() + 120
        for worker in started:
            while not worker.serving():
                assert worker.process.poll() is None, worker.log.read_text()[-3000:]
                assert time.monotonic() < deadline, worker.log.read_text()[-3000:]
                time.sleep(0.1)
        yield started
    finally:
        for worker in started:
            worker.channel.close()
            worker.process.terminate()
            try:
                worker.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait(timeout=10)


# -- strategies ---------------------------------------------------------------------------

request_ids = st.one_of(st.sampled_from(IDS), st.just(""), st.text(max_size=12))
positions = st.one_of(st.integers(0, 24), st.integers(-(2**63), 2**63 - 1))
dtypes = st.sampled_from(["int32", "float32", "float16", "bfloat16", "int8", "", "float64"])
_ITEMSIZE = {"int32": 4, "float32": 4, "float16": 2, "bfloat16": 2}


@st.composite
def tensors(draw: st.DrawFn, first: bool) -> pb.Tensor:
    """Mostly well-shaped tensors with random content, sometimes anything at all."""
    length = draw(st.integers(0, MAX_PROMPT + 4))
    good_shape = [1, length] if first else [1, length, HIDDEN]
    shape = draw(
        st.one_of(
            st.just(good_shape),
            st.lists(st.integers(-3, 80), max_size=4),
            st.lists(st.integers(-(2**62), 2**62), max_size=3),
        )
    )
    dtype = draw(st.one_of(st.just("int32" if first else "float32"), dtypes))
    count = math.prod(shape) if shape and all(0 <= d <= 4096 for d in shape) else 0
    if first and dtype == "int32" and count <= 64 and draw(st.booleans()):
        ids = draw(st.lists(st.integers(-5, 400), min_size=count, max_size=count))
        data = b"".join(i.to_bytes(4, "little", signed=True) for i in ids)
    else:
        size = count * _ITEMSIZE.get(dtype, 1)
        if count > 64 or draw(st.booleans()):
            data = draw(st.binary(min_size=size, max_size=size)) if size <= 4096 else b"\0" * size
        else:
            data = draw(st.binary(max_size=512))
    return pb.Tensor(data=data, dtype=dtype, shape=shape)


floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
samplings = st.builds(
    pb.SamplingParams,
    temperature=st.one_of(st.just(0.0), floats),
    top_p=st.one_of(st.just(0.0), floats),
    top_k=st.integers(-(2**31), 2**31 - 1),
    has_seed=st.booleans(),
    seed=st.integers(0, 2**64 - 1),
    top_logprobs=st.one_of(st.integers(0, 25), st.integers(-(2**31), 2**31 - 1)),
)


@st.composite
def valid_tensors(draw: st.DrawFn, first: bool) -> pb.Tensor:
    """What a stage accepts: token ids in the vocabulary, or finite float32 hidden states."""
    length = draw(st.integers(1, MAX_PROMPT))
    if first:
        return encode_token_ids(
            draw(st.lists(st.integers(0, VOCAB - 1), min_size=length, max_size=length))
        )
    values = draw(st.lists(st.floats(-4, 4, width=32), min_size=HIDDEN, max_size=HIDDEN))
    row = struct.pack(f"<{HIDDEN}f", *values)
    return pb.Tensor(data=row * length, dtype="float32", shape=[1, length, HIDDEN])


valid_samplings = st.builds(
    pb.SamplingParams,
    temperature=st.floats(0, 2, width=32),
    top_p=st.floats(0, 1, width=32),
    top_k=st.integers(0, 500),
    has_seed=st.booleans(),
    seed=st.integers(0, 2**64 - 1),
    top_logprobs=st.integers(0, 20),
)


def entries(first: bool, fresh: list[str]) -> st.SearchStrategy[pb.ForwardEntry]:
    """Random entries, and steps as the coordinator sends them (new requests of the
    example's ``fresh`` ids at position 0; a second one of the same id is then refused)."""
    anything = st.builds(
        pb.ForwardEntry,
        request_id=request_ids,
        position=positions,
        tensor=st.one_of(tensors(first), st.none()),
        sampling=samplings,
        step=st.integers(-(2**63), 2**63 - 1),
    )
    served = st.builds(
        pb.ForwardEntry,
        request_id=st.sampled_from(fresh),
        position=st.just(0),
        tensor=valid_tensors(first),
        sampling=valid_samplings,
        step=st.integers(0, 8),
    )
    return st.one_of(served, anything)


def forwards(
    first: bool, fresh: list[str], next_hop: pb.Hop | None
) -> st.SearchStrategy[pb.ForwardRequest]:
    """Forward calls; to the first stage, with or without the route on to the last."""
    routes = st.sampled_from([[], [next_hop]]) if next_hop is not None else st.just([])
    return st.builds(
        pb.ForwardRequest, entries=st.lists(entries(first, fresh), max_size=4), route=routes
    )


calls = st.one_of(
    st.tuples(st.just("forward"), st.integers(0, 1), st.data()),
    st.tuples(st.just("end"), request_ids, st.none()),
    st.tuples(
        st.just("ping"),
        st.one_of(st.binary(max_size=256), st.integers(0, 2 * MAX_MESSAGE_MB * 2**20)),
        st.none(),
    ),
)


def code_of(method: Any, message: Any, timeout: float) -> grpc.StatusCode:
    try:
        method(message, timeout=timeout)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def greedy_tokens(workers: list[Worker], rid: str) -> list[int]:
    """Four greedy tokens of PROMPT through both stages, then the sessions ended."""
    tokens: list[int] = []
    ids, position = PROMPT, 0
    try:
        for step in range(4):
            tensor = encode_token_ids(ids)
            for worker in workers:
                entry = pb.ForwardEntry(request_id=rid, position=position, tensor=tensor, step=step)
                result = worker.stub.Forward(pb.ForwardRequest(entries=[entry]), timeout=30)
                tensor = result.results[0].tensor
            tokens.append(result.results[0].token_id)
            position += len(ids)
            ids = [tokens[-1]]
    finally:
        for worker in workers:
            worker.stub.EndSession(pb.EndSessionRequest(request_id=rid), timeout=10)
    return tokens


def test_every_answer_is_ok_or_a_clear_refusal_and_the_workers_stay_up(
    workers: list[Worker],
) -> None:
    before = greedy_tokens(workers, "reference-before")
    rss_before = [w.rss for w in workers]
    answers: dict[str, set[str]] = {}
    example = itertools.count()
    next_hop = pb.Hop(device_id=workers[1].device_id, address=workers[1].address)

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],  # no shrinking: a failure shows its example as generated
        suppress_health_check=list(HealthCheck),
    )
    @given(calls=st.lists(calls, min_size=1, max_size=4))
    def fuzz(calls: list[tuple[str, Any, Any]]) -> None:
        fresh = [f"{next(example)}-{i}" for i in range(3)]
        sent = set(IDS) | set(fresh)
        try:
            for kind, arg, data in calls:
                if kind == "forward":
                    worker = workers[arg]
                    hop = next_hop if arg == 0 else None
                    request = data.draw(forwards(arg == 0, fresh, hop))
                    sent.update(e.request_id for e in request.entries if e.request_id)
                    code = code_of(worker.stub.Forward, request, 30)
                elif kind == "end":
                    worker = workers[0]
                    message = pb.EndSessionRequest(request_id=arg)
                    code = code_of(worker.stub.EndSession, message, 10)
                else:
                    worker = workers[1]
                    payload = arg if isinstance(arg, bytes) else b"\0" * arg
                    message = pb.PingRequest(request_id="p", payload=payload, sent_at=1.5)
                    code = code_of(worker.stub.Ping, message, 10)
                answers.setdefault(kind, set()).add(code.name)
                assert code in ALLOWED, (kind, code)
        finally:
            # Every session the example may have opened ends (max_sessions is small).
            for worker in workers:
                for rid in sent:
                    worker.stub.EndSession(pb.EndSessionRequest(request_id=rid), timeout=10)

    fuzz()
    for worker in workers:
        assert worker.process.poll() is None, worker.log.read_text()[-3000:]
        assert worker.serving()
    # The fuzzing reached past the checks: some calls were served, others refused.
    assert "OK" in answers["forward"] and "INVALID_ARGUMENT" in answers["forward"], answers
    assert "OK" in answers["ping"] and "RESOURCE_EXHAUSTED" in answers["ping"], answers
    assert greedy_tokens(workers, "reference-after") == before
    growth = [w.rss - r for w, r in zip(workers, rss_before, strict=True)]
    assert max(growth) < RSS_GROWTH_LIMIT, growth
