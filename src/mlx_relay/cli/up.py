"""``mlx-relay up``: a whole cluster on this machine, N worker processes and the coordinator.

Without ``--config`` it makes a configuration with N workers on free loopback ports and
``auto`` layers over the model (the bundled one by default). The model is resolved (imported
from GGUF if needed) once, before any worker starts. Ctrl-C or SIGTERM stops the coordinator,
then every worker; no process is left behind. A worker that exits is restarted with backoff
(``supervision:`` in the configuration); one given up on stops the cluster with exit code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from mlx_relay.cli.coordinator import print_urls
from mlx_relay.cli.fleet import WorkerExited, WorkerFleet
from mlx_relay.cli.options import (
    add_compute_arguments,
    add_http_arguments,
    add_tracing_arguments,
    given_token,
    stop_signals,
    with_compute,
    with_http_overrides,
    with_tracing,
)
from mlx_relay.core.config import ClusterConfig
from mlx_relay.core.errors import ConfigError, WorkerUnavailable
from mlx_relay.core.tls_config import check_tls_files
from mlx_relay.core.types import LayerRange

STARTUP_TIMEOUT = 600.0
SUPERVISE_INTERVAL = 0.25


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "up",
        help="start a local cluster: worker processes and the coordinator",
        description=(
            "Start N workers (one process each) and the coordinator on this machine, then "
            "serve the OpenAI-compatible API, the dashboard and /metrics on one port until "
            "Ctrl-C."
        ),
    )
    parser.add_argument(
        "--workers", "-n", type=int, default=None, help="number of workers (default: 2)"
    )
    parser.add_argument(
        "--config", "-c", default=None, help="cluster configuration (default: generated)"
    )
    parser.add_argument(
        "--model", "-m", default=None, help="model directory or .gguf (default: bundled)"
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="workers per stage, each holding the stage's layers (default: 1)",
    )
    add_http_arguments(parser)
    parser.add_argument(
        "--no-monitoring", action="store_true", help="no metrics, health checks or cluster polling"
    )
    add_compute_arguments(parser)
    add_tracing_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    from mlx_relay.model.load import read_model_info, resolve_model_dir
    from mlx_relay.model.partition import assign_layers
    from mlx_relay.monitoring.alerting import configured_rules

    config = with_compute(
        with_http_overrides(_base_config(args), args.host, args.port, given_token(args)), args
    )
    config = with_tracing(config, args)
    if config.alerting.enabled:
        configured_rules(config.alerting, config.inference)  # a bad rule fails before any worker
    # Resolve (and import) the model once here, so workers start from the same directory.
    model_dir = resolve_model_dir(config.model, progress=True)
    model = config.model.model_copy(update={"path": str(model_dir)})
    config = config.model_copy(update={"model": model})
    info = read_model_info(model_dir, config.model.name)
    assignment = assign_layers(config, info.num_layers)  # fails early if they cannot be split
    if args.replicas != 1:
        config = with_replicas(config, args.replicas, assignment)
    config = with_free_worker_ports(config, avoid=config.http.port)
    monitoring = not args.no_monitoring and config.monitoring.enabled
    return asyncio.run(_up(config, monitoring))


def _base_config(args: argparse.Namespace) -> ClusterConfig:
    if args.config is not None:
        if args.workers is not None:
            raise ConfigError("--workers: the workers come from --config; give one or the other")
        config = ClusterConfig.from_yaml(args.config)
        busy = [w.id for w in config.workers if w.port == 0]
        if busy:
            raise ConfigError(
                f"{args.config}: workers {busy} have port 0; `up` needs fixed worker ports"
            )
        if args.model is not None:
            model = config.model.model_copy(update={"path": args.model})
            config = config.model_copy(update={"model": model})
        # Every device runs here: a missing TLS file is named in the user's file, at once.
        check_tls_files(config)
        return config
    workers = 2 if args.workers is None else args.workers
    if workers < 1:
        raise ConfigError(f"--workers: expected at least 1, got {workers}")
    devices: list[dict[str, Any]] = [{"id": "coordinator", "role": "coordinator"}]
    devices += [
        {"id": f"worker-{i}", "role": "worker", "host": "127.0.0.1", "port": 0, "layers": "auto"}
        for i in range(workers)
    ]
    return ClusterConfig.from_dict({"model": {"path": args.model}, "devices": devices}, "--workers")


def with_replicas(
    config: ClusterConfig, replicas: int, assignment: dict[str, LayerRange]
) -> ClusterConfig:
    """A copy where each stage has ``replicas`` workers holding its layers: the stage's
    worker and ``<id>-r1``... on its host, on free ports."""
    if replicas < 1:
        raise ConfigError(f"--replicas: expected at least 1, got {replicas}")
    if any(len(stage) > 1 for stage in config.stages):
        raise ConfigError("--replicas: the configuration already gives stages replicas")
    devices = []
    for device in config.devices:
        if device.role != "worker":
            devices.append(device)
            continue
        layers = assignment[device.id]
        devices.append(device.model_copy(update={"layers": layers}))
        devices += [
            device.model_copy(update={"id": f"{device.id}-r{r}", "port": 0, "layers": layers})
            for r in range(1, replicas)
        ]
    data = config.model_copy(update={"devices": devices}).to_dict()
    return ClusterConfig.from_dict(data, "--replicas")


def with_free_worker_ports(config: ClusterConfig, avoid: int) -> ClusterConfig:
    """A copy with every worker of port 0 on a free port of its host (never ``avoid``)."""
    sockets: list[socket.socket] = []
    try:
        ports: dict[str, int] = {}
        for worker in config.workers:
            if worker.port != 0:
                continue
            while True:
                sock = socket.socket()
                sock.bind((worker.host, 0))
                sockets.append(sock)
                if sock.getsockname()[1] != avoid:
                    break
            ports[worker.id] = sockets[-1].getsockname()[1]
    finally:
        for sock in sockets:
            sock.close()
    return config.with_worker_ports(ports)


async def _up(config: ClusterConfig, monitoring: bool) -> int:
    from mlx_relay.server.runtime import CoordinatorRuntime

    work_dir = Path(tempfile.mkdtemp(prefix="mlx-relay-up-"))
    config_path = work_dir / "cluster.yaml"
    config_path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    fleet = WorkerFleet(config, config_path, work_dir, monitoring=monitoring)
    runtime = CoordinatorRuntime(config, enable_monitoring=monitoring)
    with stop_signals() as stop:
        try:
            fleet.start()
            if not await _wait_for_workers(fleet, stop):
                return 130
            starting = asyncio.create_task(runtime.start())
            if not await _until(starting, stop, fleet):
                return 130
            services = runtime.services
            _count_restarts(fleet, services.metrics_collector if services else None)
            print_urls(runtime.url, monitoring)
            print(f"worker logs in {work_dir}", file=sys.stderr, flush=True)
            await _serve_until_stopped(stop, fleet)
            return 0
        except WorkerExited as exc:
            print(f"mlx-relay up: error: {exc}", file=sys.stderr)
            return 1
        finally:
            print("stopping the cluster", file=sys.stderr, flush=True)
            await runtime.stop()
            fleet.stop()
            shutil.rmtree(work_dir, ignore_errors=True)


async def _wait_for_workers(fleet: WorkerFleet, stop: asyncio.Event) -> bool:
    """Show each worker's loading state until all serve; False if stopped first."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    loop = asyncio.get_running_loop()
    deadline = loop.time() + STARTUP_TIMEOUT
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        tasks = {
            w.device_id: progress.add_task(f"{w.device_id} ({w.address}): starting", total=1)
            for w in fleet.workers
        }
        while not stop.is_set():
            done = await fleet.poll_serving()
            for worker in fleet.workers:
                progress.update(
                    tasks[worker.device_id],
                    description=f"{worker.device_id} ({worker.address}): {worker.status}",
                    completed=1 if worker.serving else 0,
                )
            if done:
                return True
            if loop.time() > deadline:
                late = next(w for w in fleet.workers if not w.serving)
                raise WorkerUnavailable(
                    late.device_id, f"not serving after {STARTUP_TIMEOUT:.0f} s ({late.status})"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.25)
    return False


async def _until(task: asyncio.Task[None], stop: asyncio.Event, fleet: WorkerFleet) -> bool:
    """Wait for ``task`` while supervising the workers; False if stopped first. The task is
    cancelled when stopped or when a worker is given up on (WorkerExited is raised)."""
    while not task.done():
        try:
            fleet.supervise()
        except WorkerExited:
            await _cancel(task)
            raise
        if stop.is_set():
            await _cancel(task)
            return False
        await asyncio.wait({task}, timeout=0.25)
    task.result()
    return True


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def _count_restarts(fleet: WorkerFleet, collector: Any | None) -> None:
    """Show each worker's restarts in the coordinator's cluster view, now and on each restart."""
    if collector is None:
        return
    for worker in fleet.workers:
        collector.set_worker_restarts(worker.device_id, worker.restarts)
    fleet.on_restart = collector.set_worker_restarts


async def _serve_until_stopped(stop: asyncio.Event, fleet: WorkerFleet) -> None:
    """Supervise the workers until stopped (WorkerExited when one is given up on)."""
    while not stop.is_set():
        fleet.supervise()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SUPERVISE_INTERVAL)
