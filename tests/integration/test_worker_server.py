"""Real workers on port 0 with the tiny model: pipeline correctness, health, status, lifecycle."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mlx_relay.core.blas import default_threads, loaded_blas
from mlx_relay.core.config import ClusterConfig
from mlx_relay.core.errors import ConfigError, PipelineNotReady, WorkerUnavailable
from mlx_relay.core.types import LayerRange
from mlx_relay.model.generate import generate_tokens
from mlx_relay.model.load import load_model
from mlx_relay.model.partition import assign_layers
from mlx_relay.model.sampling import SamplingParams
from mlx_relay.proto import relay_pb2 as pb
from mlx_relay.proto import relay_pb2_grpc as pb_grpc
from mlx_relay.wire import encode_token_ids
from mlx_relay.worker.stage import StageRuntime
from mlx_relay.worker.worker_server import WorkerServer
from tests.support.rounds import wait_rounds
from tests.support.worker_cluster import (
    entry,
    generate,
    pipeline_step,
    running_workers,
    worker_config,
)

PROMPT = [5, 17, 42, 99, 3, 8]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def reference(model_dir: Path, params: SamplingParams, max_tokens: int) -> list[Any]:
    model = load_model(model_dir)
    return list(generate_tokens(model, PROMPT, max_tokens, params))


@pytest.mark.parametrize(
    "ranges",
    [[(0, 4)], [(0, 2), (2, 4)], [(0, 1), (1, 3), (3, 4)]],
    ids=["1-worker", "2-workers", "3-workers"],
)
async def test_pipeline_matches_single_process(
    tiny_model_dir: Path, ranges: list[tuple[int, int]]
) -> None:
    greedy = reference(tiny_model_dir, SamplingParams(), 8)
    seeded_params = SamplingParams(temperature=1.0, top_k=50, seed=11, top_logprobs=3)
    seeded = reference(tiny_model_dir, seeded_params, 8)
    wire_seeded = pb.SamplingParams(
        temperature=1.0, top_k=50, has_seed=True, seed=11, top_logprobs=3
    )
    async with running_workers(worker_config(tiny_model_dir, ranges)) as workers:
        stubs = [w.stub for w in workers]
        got = await generate(stubs, "greedy", PROMPT, 8)
        assert [r.token_id for r in got] == [t.token_id for t in greedy]
        assert [r.cached_tokens for r in got] == list(range(len(PROMPT), len(PROMPT) + 8))
        for r, t in zip(got, greedy, strict=True):
            assert r.logprob == pytest.approx(t.logprob, abs=1e-4)

        got = await generate(stubs, "seeded", PROMPT, 8, wire_seeded)
        assert [r.token_id for r in got] == [t.token_id for t in seeded]
        assert len({r.token_id for r in got}) > 2, "sampling should vary on random weights"
        for r, t in zip(got, seeded, strict=True):
            assert [a.token_id for a in r.top_logprobs] == [a for a, _ in t.top_logprobs]
            assert [a.logprob for a in r.top_logprobs] == pytest.approx(
                [b for _, b in t.top_logprobs], abs=1e-4
            )
        assert [w.server.kv_sessions for w in workers] == [2] * len(ranges)


async def test_non_last_stage_returns_hidden_states_for_every_position(
    tiny_model_dir: Path,
) -> None:
    async with running_workers(worker_config(tiny_model_dir, [(0, 2), (2, 4)])) as workers:
        first, last = workers
        response = await first.stub.Forward(entry("r", 0, encode_token_ids(PROMPT)))
        (result,) = response.results
        assert result.tensor.dtype == "float32"
        assert list(result.tensor.shape) == [1, len(PROMPT), 64]
        assert len(result.tensor.data) == len(PROMPT) * 64 * 4
        assert result.cached_tokens == len(PROMPT)
        assert response.device_id == "w0"
        assert response.compute_seconds > 0
        response = await last.stub.Forward(entry("r", 0, result.tensor))
        (result,) = response.results
        assert not result.HasField("tensor")
        assert 0 <= result.token_id < 384
        assert result.logprob <= 0
        assert response.device_id == "w1"


async def test_decode_entries_of_several_requests_run_as_one_batch(
    tiny_model_dir: Path,
) -> None:
    prompts = {"a": PROMPT, "b": PROMPT[:2], "c": [7] * 11}
    expected = {
        rid: [t.token_id for t in generate_tokens(load_model(tiny_model_dir), p, 6)]
        for rid, p in prompts.items()
    }
    async with running_workers(worker_config(tiny_model_dir, [(0, 2), (2, 4)])) as workers:
        stubs = [w.stub for w in workers]
        for rid, prompt in prompts.items():
            await pipeline_step(stubs, rid, 0, prompt[:-1])
        state = {rid: (len(p) - 1, p[-1]) for rid, p in prompts.items()}
        got: dict[str, list[int]] = {rid: [] for rid in prompts}
        for step in range(6):
            request = pb.ForwardRequest(
                entries=[
                    pb.ForwardEntry(
                        request_id=rid,
                        position=state[rid][0],
                        tensor=encode_token_ids([state[rid][1]]),
                        step=step,
                    )
                    for rid in prompts
                ]
            )
            for stub in stubs:
                response = await stub.Forward(request, timeout=30)
                assert [r.request_id for r in response.results] == list(prompts)
                for e, r in zip(request.entries, response.results, strict=True):
                    if r.HasField("tensor"):
                        e.tensor.CopyFrom(r.tensor)
            for r in response.results:
                got[r.request_id].append(r.token_id)
                state[r.request_id] = (state[r.request_id][0] + 1, r.token_id)
        assert got == expected
        assert [w.server.batched_rows for w in workers] == [3, 3]

        # EndSession frees a batched row on the MLX thread without waiting for a Forward.
        for stub in stubs:
            await stub.EndSession(pb.EndSessionRequest(request_id="b"), timeout=5)
        deadline = time.monotonic() + 10
        while any(w.server.batched_rows != 2 for w in workers):
            assert time.monotonic() < deadline, [w.server.batched_rows for w in workers]
            await asyncio.sleep(0.01)
        assert [w.server.kv_sessions for w in workers] == [2, 2]


async def health_status(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(response.status)


async def test_health_is_not_serving_until_layers_are_loaded(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    original = StageRuntime.load

    def gated_load(*args: Any) -> StageRuntime:
        assert gate.wait(30), "test never released the load"
        return original(*args)

    monkeypatch.setattr(StageRuntime, "load", staticmethod(gated_load))
    server = WorkerServer(worker_config(tiny_model_dir, [(0, 4)]), enable_monitoring=False)
    await server.start()
    try:
        assert server.port > 0 and not server.ready
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            assert await health_status(channel) == NOT_SERVING
            assert await health_status(channel, "mlxrelay.v1.Worker") == NOT_SERVING
            stub = pb_grpc.WorkerStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Forward(entry("r", 0, encode_token_ids([1])))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "still loading" in (info.value.details() or "")
            status = await stub.GetStatus(pb.StatusRequest(request_id="s"))
            assert not status.model_loaded
            assert (status.layer_start, status.layer_end) == (0, 4)
            pong = await stub.Ping(pb.PingRequest(request_id="p", payload=b"x"))
            assert pong.payload == b"x"

            gate.set()
            await server.wait_until_ready(timeout=30)
            assert server.ready
            assert await health_status(channel) == SERVING
            assert await health_status(channel, "mlxrelay.v1.Worker") == SERVING
    finally:
        gate.set()
        await server.stop()


async def wait_for_health(channel: grpc.aio.Channel, expected: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    status = await health_status(channel)
    while status != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        status = await health_status(channel)
    assert status == expected


async def test_critical_health_turns_not_serving_and_back(tiny_model_dir: Path) -> None:
    from mlx_relay.monitoring import HealthCheck, HealthStatus

    config = worker_config(tiny_model_dir, [(0, 4)], monitoring={"collection_interval": 0.1})
    async with running_workers(config, enable_monitoring=True) as (worker,):
        health = worker.server.health
        # Only the forced check decides: this machine's real load must not.
        for name in ("system_resources", "process_health"):
            health.unregister_check(name)
        verdict = {"status": HealthStatus.HEALTHY}

        def forced() -> dict[str, Any]:
            return {"status": verdict["status"], "message": "forced by the test", "details": {}}

        health.register_check(HealthCheck("forced", "test verdict", forced, 0.05))
        await wait_for_health(worker.channel, SERVING)
        verdict["status"] = HealthStatus.CRITICAL
        await wait_for_health(worker.channel, NOT_SERVING)
        status = await worker.stub.GetStatus(pb.StatusRequest())
        assert status.health_status == "critical" and status.model_loaded
        verdict["status"] = HealthStatus.WARNING
        await wait_for_health(worker.channel, SERVING)
        assert (await worker.stub.GetStatus(pb.StatusRequest())).health_status == "warning"


async def test_a_stop_during_the_load_does_not_wait_for_it(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    entered = threading.Event()

    def endless_load(*_args: Any) -> StageRuntime:
        entered.set()
        gate.wait(60)
        raise RuntimeError("load abandoned")

    monkeypatch.setattr(StageRuntime, "load", staticmethod(endless_load))
    server = WorkerServer(worker_config(tiny_model_dir, [(0, 4)]), enable_monitoring=False)
    await server.start()
    try:
        assert await asyncio.to_thread(entered.wait, 30)
        # The load is running on the MLX thread: the stop returns without it.
        await asyncio.wait_for(server.stop(), timeout=20)
        assert not gate.is_set() and not server.ready
    finally:
        gate.set()


def test_a_process_exits_while_its_mlx_thread_is_busy() -> None:
    script = (
        "import asyncio, time\n"
        "from mlx_relay.worker.executor import MLXExecutor\n"
        "async def main():\n"
        "    ex = MLXExecutor()\n"
        "    job = asyncio.ensure_future(ex.run(time.sleep, 600))\n"
        "    await asyncio.sleep(0.2)\n"
        "    await ex.shutdown(wait=False)\n"
        "    job.cancel()\n"
        "asyncio.run(main())\n"
        "print('exited')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "exited"


async def test_failed_load_is_reported(tiny_model_dir: Path) -> None:
    # Layers past the model's end: the config is valid, the model does not fit it.
    config = worker_config(tiny_model_dir, [(0, 6)])
    server = WorkerServer(config, enable_monitoring=False)
    await server.start()
    try:
        with pytest.raises(Exception, match="do not fit"):
            await server.wait_until_ready(timeout=30)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            assert await health_status(channel) == NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.WorkerStub(channel).Forward(entry("r", 0, encode_token_ids([1])))
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        await server.stop()


async def test_ping_status_and_end_session_with_monitoring(tiny_model_dir: Path) -> None:
    config = worker_config(tiny_model_dir, [(0, 2), (2, 4)])
    async with running_workers(config, enable_monitoring=True) as workers:
        stubs = [w.stub for w in workers]
        await generate(stubs, "a", PROMPT, 2)
        await generate(stubs, "b", PROMPT[:1], 1)

        pong = await stubs[1].Ping(pb.PingRequest(request_id="p1", payload=b"\x00abc", sent_at=1.5))
        assert (pong.request_id, pong.payload, pong.sent_at, pong.device_id) == (
            "p1",
            b"\x00abc",
            1.5,
            "w1",
        )

        status = await stubs[1].GetStatus(pb.StatusRequest(request_id="s1"))
        assert status.request_id == "s1" and status.device_id == "w1" and status.stage == 1
        assert (status.layer_start, status.layer_end, status.num_layers) == (2, 4, 4)
        assert status.model_loaded and status.model_name == tiny_model_dir.name
        assert (status.hidden_size, status.dtype) == (64, "float32")
        library = loaded_blas()
        blas = library.name if library is not None and library.path is not None else "bundled"
        assert (status.backend, status.compute, status.blas) == ("cpu", "float32", blas)
        # Two workers configured on this host: a step computing alone takes all its cores.
        assert status.blas_threads == (default_threads(1) if blas != "bundled" else 0)
        assert status.kv_sessions == 2
        assert status.health_status in ("healthy", "warning", "critical", "unknown")
        assert status.uptime_seconds > 0
        metrics = json.loads(status.metrics_json)
        assert metrics["device_id"] == "w1" and metrics["role"] == "worker"
        stage = metrics["stages"]["w1"]
        assert stage["stage"] == 1 and stage["kv_sessions"] == 2
        # "a": prefill of 5 + 2 decodes; "b": one decode (a one-token prompt has no prefill).
        assert stage["steps_total"] == {"prefill": 1, "decode": 3}
        assert stage["tokens_total"] == {"prefill": 5, "decode": 3}
        device = metrics["devices"]["w1"]
        assert device["model_loaded"] is True and device["assigned_layers"] == [2, 3]
        health = json.loads(status.health_json)
        assert health["overall_status"] == status.health_status
        assert "service_availability" in health["checks"]

        ended = await stubs[1].EndSession(pb.EndSessionRequest(request_id="a"))
        assert (ended.request_id, ended.existed) == ("a", True)
        ended = await stubs[1].EndSession(pb.EndSessionRequest(request_id="a"))
        assert ended.existed is False
        await stubs[1].EndSession(pb.EndSessionRequest(request_id="b"))
        status = await stubs[1].GetStatus(pb.StatusRequest())
        assert status.kv_sessions == 0
        assert json.loads(status.metrics_json)["stages"]["w1"]["kv_sessions"] == 0
        assert (await stubs[0].GetStatus(pb.StatusRequest())).kv_sessions == 2


async def test_monitoring_disabled_records_nothing(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlx_relay.monitoring as monitoring

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("monitoring object created with enable_monitoring=False")

    monkeypatch.setattr(monitoring.MetricsCollector, "__init__", refuse)
    monkeypatch.setattr(monitoring.HealthMonitor, "__init__", refuse)
    async with running_workers(worker_config(tiny_model_dir, [(0, 4)])) as (worker,):
        assert worker.server.collector is None and worker.server.health is None
        await generate([worker.stub], "r", PROMPT, 2)
        status = await worker.stub.GetStatus(pb.StatusRequest())
        assert (status.metrics_json, status.health_json, status.health_status) == (
            "",
            "",
            "unknown",
        )
        names = {t.get_name() for t in asyncio.all_tasks()}
        assert not [n for n in names if n.startswith(("metrics-", "health-"))], names


async def test_idle_sessions_expire(tiny_model_dir: Path) -> None:
    config = worker_config(tiny_model_dir, [(0, 4)], inference={"session_ttl_seconds": 0.3})
    async with running_workers(config) as (worker,):
        await pipeline_step([worker.stub], "idle", 0, PROMPT)
        assert worker.server.kv_sessions == 1
        deadline = time.monotonic() + 10
        while worker.server.kv_sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        status = await worker.stub.GetStatus(pb.StatusRequest())
        assert status.kv_sessions == 0
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pipeline_step([worker.stub], "idle", len(PROMPT), [1])
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_auth_token_guards_worker_rpcs_but_not_health(tiny_model_dir: Path) -> None:
    config = worker_config(tiny_model_dir, [(0, 4)], network={"auth_token": "s3cret"})
    async with running_workers(config) as (worker,):
        ping = pb.PingRequest(payload=b"hi")
        for metadata in (
            None,
            (("authorization", "Bearer wrong"),),
            (("authorization", "s3cret"),),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await worker.stub.Ping(ping, metadata=metadata)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        good = (("authorization", "Bearer s3cret"),)
        assert (await worker.stub.Ping(ping, metadata=good)).payload == b"hi"
        response = await worker.stub.Forward(entry("r", 0, encode_token_ids(PROMPT)), metadata=good)
        assert response.results[0].cached_tokens == len(PROMPT)
        assert await health_status(worker.channel) == SERVING


def test_device_selection(tiny_model_dir: Path) -> None:
    config = worker_config(tiny_model_dir, [(0, 2), (2, 4)])
    first = WorkerServer(config, enable_monitoring=False)
    assert (first.device_id, first.stage, first.layer_range) == ("w0", 0, LayerRange(0, 2))
    second = WorkerServer(config, "w1", enable_monitoring=False)
    assert (second.device_id, second.stage, second.layer_range) == ("w1", 1, LayerRange(2, 4))
    with pytest.raises(ConfigError, match="no device 'w9'"):
        WorkerServer(config, "w9")


async def test_auto_layers_are_known_after_loading(tiny_model_dir: Path) -> None:
    config = ClusterConfig.from_dict(
        {
            "model": {"path": str(tiny_model_dir)},
            "devices": [{"id": f"w{i}", "port": 0, "layers": "auto"} for i in range(2)],
        }
    )
    server = WorkerServer(config, "w1", enable_monitoring=False)
    with pytest.raises(PipelineNotReady):
        _ = server.layer_range
    async with server:
        assert server.ready and server.port > 0
        assert server.layer_range == assign_layers(config, 4)["w1"] == LayerRange(2, 4)
    assert not server.ready


async def test_port_in_use_is_a_clear_error(tiny_model_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = worker_config(tiny_model_dir, [(0, 4)]).with_worker_ports({"w0": port})
        server = WorkerServer(config, enable_monitoring=False)
        try:
            with pytest.raises(WorkerUnavailable, match=f"cannot bind 127.0.0.1:{port}"):
                await server.start()
        finally:
            await server.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_cli_worker_serves_until_sigint(tiny_model_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    config_file = tmp_path / "cluster.yaml"
    config_file.write_text(
        yaml.safe_dump(
            {
                "model": {"path": str(tiny_model_dir)},
                "devices": [{"id": "w0", "port": port, "layers": [0, 4]}],
                "monitoring": {"collection_interval": 0.5},
            }
        )
    )
    command = [sys.executable, "-m", "mlx_relay.cli", "worker", "-c", str(config_file)]
    process = subprocess.Popen(
        [*command, "--device-id", "w0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    # Retry the connection every 0.1 s while the worker starts (gRPC's default backoff
    # waits 1 s, then longer).
    quick = [
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 100),
    ]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=quick) as channel:
            deadline = time.monotonic() + 60
            status = None
            while time.monotonic() < deadline and process.poll() is None:
                try:
                    status = await health_status(channel)
                except grpc.aio.AioRpcError:
                    status = None
                if status == SERVING:
                    break
                await asyncio.sleep(0.1)
            assert status == SERVING, process.stderr.read().decode() if process.stderr else ""
            response = await pb_grpc.WorkerStub(channel).Forward(
                entry("r", 0, encode_token_ids(PROMPT))
            )
            assert response.device_id == "w0"
        process.send_signal(signal.SIGINT)
        _, stderr = await asyncio.to_thread(process.communicate, timeout=20)
        assert process.returncode == 0, stderr.decode()
        assert b"serving layers [0, 4)" in stderr
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))  # raises if the worker still listens
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def test_cpu_and_memory_pressure_are_warnings_a_full_disk_stops_serving(
    tiny_model_dir: Path,
) -> None:
    from mlx_relay.monitoring import HealthCheck, HealthStatus

    config = worker_config(tiny_model_dir, [(0, 4)], monitoring={"collection_interval": 0.1})
    async with running_workers(config, enable_monitoring=True) as (worker,):
        health = worker.server.health
        for name in ("system_resources", "process_health"):
            health.unregister_check(name)
        levels = {"cpu_status": "critical", "memory_status": "healthy", "disk_status": "healthy"}
        process = {"status": "healthy", "open_fds_percent": 10.0}

        def resources() -> dict[str, Any]:
            worst = "critical" if "critical" in levels.values() else "healthy"
            return {"status": HealthStatus(worst), "message": "injected", "details": dict(levels)}

        def process_check() -> dict[str, Any]:
            details = {"open_fds_percent": process["open_fds_percent"]}
            return {
                "status": HealthStatus(process["status"]),
                "message": "injected",
                "details": details,
            }

        health.register_check(HealthCheck("system_resources", "injected", resources, 0.05))
        health.register_check(HealthCheck("process_health", "injected", process_check, 0.05))
        await wait_for_health(worker.channel, SERVING)
        # Busy CPU: reported CRITICAL, still serving (under load this is the normal state).
        for _ in range(20):
            status = await worker.stub.GetStatus(pb.StatusRequest())
            if status.health_status == "critical":
                break
            await asyncio.sleep(0.05)
        assert status.health_status == "critical"
        watch = worker.server.health_watch
        # Three health-watch verdicts after the CRITICAL report must leave it serving.
        await wait_rounds(watch, 3)
        assert await health_status(worker.channel) == SERVING
        # Memory under pressure (the machine's and the process's resident set): a warning
        # too; holding the layers in memory is the worker's job.
        levels["memory_status"] = "critical"
        process["status"] = "critical"
        await asyncio.sleep(0.15)  # let both injected checks run with the new verdicts
        await wait_rounds(watch, 3)
        assert (await worker.stub.GetStatus(pb.StatusRequest())).health_status == "critical"
        assert await health_status(worker.channel) == SERVING
        # A full disk: the stage cannot serve and leaves the pipeline, and comes back after.
        levels["disk_status"] = "critical"
        await wait_for_health(worker.channel, NOT_SERVING)
        levels["disk_status"] = "healthy"
        await wait_for_health(worker.channel, SERVING)
        # Out of file descriptors: cannot accept connections or open files, NOT_SERVING.
        process["open_fds_percent"] = 99.0
        await wait_for_health(worker.channel, NOT_SERVING)


async def test_background_loops_survive_a_failing_round(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = worker_config(
        tiny_model_dir,
        [(0, 4)],
        inference={"session_ttl_seconds": 0.2},
        monitoring={"collection_interval": 0.1},
    )
    async with running_workers(config, enable_monitoring=True) as (worker,):
        for loop in (worker.server.health_watch, worker.server.session_sweep):
            real_step, calls = loop._step, {"n": 0}

            async def failing_once(
                real_step: Any = real_step, calls: dict[str, int] = calls
            ) -> None:
                calls["n"] += 1
                if calls["n"] == 1:
                    raise RuntimeError("injected failure")
                await real_step()

            loop._step = failing_once
            with caplog.at_level(logging.ERROR, logger="mlx_relay.core.tasks"):
                await wait_rounds(loop, 3)
            assert loop.failures == 1 and calls["n"] >= 3
            assert any(
                "round failed" in r.getMessage()
                and r.exc_info
                and "injected failure" in str(r.exc_info[1])
                for r in caplog.records
            ), caplog.text
            caplog.clear()
        # The health watch still gives verdicts after its failed round.
        assert await health_status(worker.channel) == SERVING
