"""``mlx-relay coordinator``: the coordinator role alone, for workers started elsewhere."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from mlx_relay.cli.options import (
    add_http_arguments,
    add_tracing_arguments,
    given_token,
    stop_signals,
    with_http_overrides,
    with_tracing,
)
from mlx_relay.core.config import ClusterConfig


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "coordinator",
        help="run the coordinator of a cluster whose workers run elsewhere",
        description=(
            "Wait until every worker of the configuration is SERVING, then serve the "
            "OpenAI-compatible API, the dashboard, /api, /ws, /metrics and /health on one "
            "port until SIGINT or SIGTERM. SIGHUP reloads the alerting rules from --config."
        ),
    )
    parser.add_argument("--config", "-c", required=True, help="cluster configuration (YAML)")
    add_http_arguments(parser)
    parser.add_argument(
        "--no-monitoring", action="store_true", help="no metrics, health checks or cluster polling"
    )
    add_tracing_arguments(parser)
    return parser


def print_urls(url: str, monitoring: bool) -> None:
    """The addresses a user of the coordinator needs."""
    print(f"mlx-relay coordinator ready on {url}")
    if monitoring:
        print(f"  dashboard   {url}/")
    print(f"  OpenAI API  {url}/v1")
    if monitoring:
        print(f"  metrics     {url}/metrics")
    print(f"  health      {url}/health")
    print("Press Ctrl-C to stop.", flush=True)


def run(args: argparse.Namespace) -> int:
    config = ClusterConfig.from_yaml(args.config)
    config = with_http_overrides(config, args.host, args.port, given_token(args))
    config = with_tracing(config, args)
    return asyncio.run(_serve(config, args))


async def _serve(config: ClusterConfig, args: argparse.Namespace) -> int:
    from mlx_relay.cli.alert_reload import reload_on_hangup
    from mlx_relay.monitoring.alerting import AlertEngine
    from mlx_relay.server.runtime import CoordinatorRuntime

    monitoring = not args.no_monitoring and config.monitoring.enabled
    runtime = CoordinatorRuntime(config, enable_monitoring=monitoring)
    workers = ", ".join(f"{w.id} ({w.address})" for w in config.workers)
    print(f"waiting for workers: {workers}", file=sys.stderr, flush=True)

    def engine() -> AlertEngine | None:
        return runtime.services.alert_engine if runtime.services is not None else None

    with stop_signals() as stop, reload_on_hangup(engine, args.config):
        try:
            start = asyncio.create_task(runtime.start())
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({start, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not start.done():
                start.cancel()
                await asyncio.gather(start, return_exceptions=True)
                return 130
            stopping.cancel()
            start.result()
            print_urls(runtime.url, monitoring)
            await stop.wait()
            print("stopping the coordinator", file=sys.stderr, flush=True)
            return 0
        finally:
            await runtime.stop()
