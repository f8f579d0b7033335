"""``mlx-relay worker``: run one worker (one pipeline stage) until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from mlx_relay.cli.options import (
    add_compute_arguments,
    add_tracing_arguments,
    stop_signals,
    with_compute,
    with_tracing,
)
from mlx_relay.core.config import ClusterConfig
from mlx_relay.worker.worker_server import WorkerServer


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "worker",
        help="run one worker of a cluster",
        description=(
            "Serve one worker's layers over gRPC until interrupted (SIGINT or SIGTERM stop "
            "it gracefully). The worker binds its port first and reports NOT_SERVING on "
            "grpc.health.v1 until its layers are loaded."
        ),
    )
    parser.add_argument("--config", "-c", required=True, help="cluster configuration (YAML)")
    parser.add_argument(
        "--device-id", "-d", default=None, help="which worker of the config (default: the first)"
    )
    parser.add_argument(
        "--no-monitoring", action="store_true", help="run without metrics and health collection"
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=5.0,
        help="seconds in-flight calls may finish when stopping (default: 5)",
    )
    add_compute_arguments(parser)
    add_tracing_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_serve(args))


async def _serve(args: argparse.Namespace) -> int:
    config = with_tracing(with_compute(ClusterConfig.from_yaml(args.config), args), args)
    server = WorkerServer(config, args.device_id, enable_monitoring=not args.no_monitoring)
    with stop_signals() as stop_requested:
        try:
            await server.start()
            print(
                f"worker {server.device_id} (stage {server.stage}) listening on {server.address}, "
                "loading its layers...",
                file=sys.stderr,
            )
            ready = asyncio.create_task(server.wait_until_ready())
            stopping = asyncio.create_task(stop_requested.wait())
            await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if ready.done():
                ready.result()
                print(
                    f"worker {server.device_id} serving layers {server.layer_range} "
                    f"on {server.address}",
                    file=sys.stderr,
                )
                await stopping
            else:
                ready.cancel()
            print(f"worker {server.device_id} stopping", file=sys.stderr)
        finally:
            await server.stop(grace=args.grace)
    return 0
