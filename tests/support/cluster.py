"""Whole local clusters for tests: real WorkerServers plus a DistributedOrchestrator.

``local_cluster`` runs the workers in this process on port 0 (fast, for most tests);
``process_cluster`` runs each worker as a ``mlx-relay worker`` subprocess on a fixed free
port, so a test can kill one and start it again on the same port.

    async with local_cluster(tiny_model_dir, num_workers=2) as cluster:
        response = await cluster.orchestrator.process_request(InferenceRequest(prompt="Hi"))
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mlx_relay.cli.fleet import worker_command
from mlx_relay.coordinator.client import WorkerClient
from mlx_relay.coordinator.orchestrator import DistributedOrchestrator
from mlx_relay.core.config import ClusterConfig
from mlx_relay.core.errors import RelayError
from mlx_relay.worker.worker_server import WorkerServer

# Fast failure detection for tests; any section can still be overridden per test.
TEST_NETWORK = {"connect_timeout": 60.0, "request_timeout": 30.0, "retry_backoff": 0.05}


def cluster_dict(
    model_dir: Path,
    num_workers: int,
    *,
    ports: Sequence[int] | None = None,
    layers: Sequence[tuple[int, int]] | None = None,
    network: dict[str, Any] | None = None,
    http: dict[str, Any] | None = None,
    monitoring: dict[str, Any] | None = None,
    inference: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    devices: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A cluster configuration as plain data: a coordinator and workers ``worker-0``...
    on loopback (port 0 unless ``ports`` is given), layers ``auto`` unless given; ``model``
    adds settings of the model section (e.g. ``compute``), ``devices`` settings of the
    devices it names by id (e.g. ``tls``)."""
    entries: list[dict[str, Any]] = [{"id": "coordinator", "role": "coordinator"}]
    for i in range(num_workers):
        entries.append(
            {
                "id": f"worker-{i}",
                "role": "worker",
                "host": "127.0.0.1",
                "port": ports[i] if ports else 0,
                "layers": list(layers[i]) if layers else "auto",
            }
        )
    for entry in entries:
        entry.update((devices or {}).get(entry["id"], {}))
    return {
        "model": {"path": str(model_dir), **(model or {})},
        "devices": entries,
        "network": {**TEST_NETWORK, **(network or {})},
        "http": http or {},
        "monitoring": monitoring or {},
        "inference": inference or {},
    }


@dataclass
class LocalCluster:
    """Workers and orchestrator of one test cluster; ``config`` has the real ports."""

    config: ClusterConfig
    orchestrator: DistributedOrchestrator
    workers: list[WorkerServer] = field(default_factory=list)
    processes: list[WorkerProcess] = field(default_factory=list)
    config_path: Path | None = None


@contextlib.asynccontextmanager
async def local_cluster(
    model_dir: Path,
    num_workers: int = 2,
    *,
    enable_monitoring: bool = False,
    worker_monitoring: bool | None = None,
    layers: Sequence[tuple[int, int]] | None = None,
    network: dict[str, Any] | None = None,
    http: dict[str, Any] | None = None,
    monitoring: dict[str, Any] | None = None,
    inference: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    devices: dict[str, dict[str, Any]] | None = None,
    initialize: bool = True,
    tracing: dict[str, Any] | None = None,
    tracer_providers: dict[str, Any] | None = None,
) -> AsyncIterator[LocalCluster]:
    """Start ``num_workers`` in-process workers on port 0 and an orchestrator over them.

    ``worker_monitoring`` defaults to ``enable_monitoring``. With ``initialize=False`` the
    orchestrator is created but not initialised. ``tracing`` is the config's section;
    ``tracer_providers`` hands a TracerProvider to the device of that id (``coordinator``
    or a worker).
    """
    data = cluster_dict(
        model_dir,
        num_workers,
        layers=layers,
        network=network,
        http=http,
        monitoring=monitoring,
        inference=inference,
        model=model,
        devices=devices,
    )
    if tracing:
        data["tracing"] = tracing
    config = ClusterConfig.from_dict(data)
    if worker_monitoring is None:
        worker_monitoring = enable_monitoring
    providers = tracer_providers or {}
    servers = [
        WorkerServer(
            config,
            w.id,
            enable_monitoring=worker_monitoring,
            tracer_provider=providers.get(w.id),
        )
        for w in config.workers
    ]
    orchestrator: DistributedOrchestrator | None = None
    try:
        for server in servers:
            await server.start()
        for server in servers:
            await server.wait_until_ready(timeout=120)
        config = config.with_worker_ports({s.device_id: s.port for s in servers})
        orchestrator = DistributedOrchestrator(
            config,
            enable_monitoring=enable_monitoring,
            tracer_provider=providers.get(config.coordinator_id),
        )
        if initialize:
            await orchestrator.initialize()
        yield LocalCluster(config, orchestrator, workers=servers)
    finally:
        if orchestrator is not None:
            await orchestrator.shutdown()
        for server in servers:
            await server.stop(grace=0.5)


async def kv_sessions(config: ClusterConfig) -> list[int]:
    """Each worker's live KV sessions, as its GetStatus reports them."""
    counts = []
    for worker in config.workers:
        client = WorkerClient(worker.id, worker.address, config.network)
        try:
            counts.append((await client.get_status()).kv_sessions)
        finally:
            await client.close()
    return counts


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


class WorkerProcess:
    """One ``mlx-relay worker`` subprocess; output goes to ``log_path``."""

    def __init__(
        self, config_path: Path, device_id: str, address: str, log_path: Path, monitoring: bool
    ) -> None:
        self.config_path = config_path
        self.device_id = device_id
        self.address = address
        self.log_path = log_path
        self.monitoring = monitoring
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        command = worker_command(
            self.config_path, self.device_id, monitoring=self.monitoring, grace=0.5
        )
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=child_environment()
            )

    def kill(self) -> None:
        """SIGKILL: the worker dies without any cleanup, like a crashed machine."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self, grace: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def wait_serving(self, config: ClusterConfig, timeout: float = 120.0) -> None:
        """Wait until the worker answers SERVING; fail at once if the process exits."""
        client = WorkerClient(self.device_id, self.address, config.network)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if not self.alive:
                    raise RuntimeError(
                        f"worker {self.device_id} exited during start-up:\n{self.log_tail()}"
                    )
                with contextlib.suppress(RelayError):
                    if await client.health(timeout=1.0, retry=False) == "SERVING":
                        return
                await asyncio.sleep(0.1)
        finally:
            await client.close()
        raise TimeoutError(f"worker {self.device_id} not serving:\n{self.log_tail()}")


@contextlib.asynccontextmanager
async def process_cluster(
    model_dir: Path,
    work_dir: Path,
    num_workers: int = 2,
    *,
    enable_monitoring: bool = False,
    worker_monitoring: bool = False,
    network: dict[str, Any] | None = None,
    monitoring: dict[str, Any] | None = None,
    inference: dict[str, Any] | None = None,
    tracing: dict[str, Any] | None = None,
) -> AsyncIterator[LocalCluster]:
    """Start ``num_workers`` worker subprocesses on free ports (config written to
    ``work_dir``) and an initialised orchestrator; every process is stopped on exit.
    ``tracing`` is the config's section (the workers read it from the file)."""
    ports = free_ports(num_workers)
    data = cluster_dict(
        model_dir,
        num_workers,
        ports=ports,
        network=network,
        monitoring=monitoring,
        inference=inference,
    )
    if tracing:
        data["tracing"] = tracing
    config = ClusterConfig.from_dict(data)
    config_path = work_dir / "cluster.yaml"
    config_path.write_text(yaml.safe_dump(data))
    processes = [
        WorkerProcess(
            config_path, w.id, w.address, work_dir / f"{w.id}.log", monitoring=worker_monitoring
        )
        for w in config.workers
    ]
    orchestrator: DistributedOrchestrator | None = None
    try:
        for process in processes:
            process.start()
        await asyncio.gather(*(p.wait_serving(config) for p in processes))
        orchestrator = DistributedOrchestrator(config, enable_monitoring=enable_monitoring)
        await orchestrator.initialize()
        yield LocalCluster(config, orchestrator, processes=processes, config_path=config_path)
    finally:
        if orchestrator is not None:
            await orchestrator.shutdown()
        for process in processes:
            process.stop()
        leftover = [p.device_id for p in processes if p.alive]
        assert not leftover, f"worker processes still running: {leftover}"


def child_environment() -> dict[str, str]:
    """The environment for child processes: this one, unbuffered."""
    return {**os.environ, "PYTHONUNBUFFERED": "1"}
