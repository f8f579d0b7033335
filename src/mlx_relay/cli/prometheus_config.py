"""``mlx-relay prometheus-config``: print a Prometheus configuration that scrapes the cluster.

The target is the ``/metrics`` of the config's ``http`` address: the coordinator's app (one
per cluster), or the standalone dashboard's. When ``/metrics`` needs a
token, the job reads it from a file so that the token never sits in prometheus.yml.
"""

from __future__ import annotations

import argparse
from typing import Any

import yaml

from mlx_relay.cli.options import TOKEN_ENV, token_from
from mlx_relay.core.addresses import host_port
from mlx_relay.core.config import ClusterConfig, HTTPConfig, MonitoringConfig
from mlx_relay.core.errors import ConfigError

DEFAULT_TOKEN_FILE = "/etc/prometheus/mlx-relay.token"
JOB_NAME = "mlx-relay"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "prometheus-config",
        help="print a Prometheus scrape configuration for the cluster",
        description=(
            "Print a prometheus.yml that scrapes the coordinator's /metrics. When the "
            f"config (or ${TOKEN_ENV}) sets a token for /metrics, the job reads it from "
            "--token-file."
        ),
    )
    parser.add_argument("--config", "-c", default=None, help="cluster configuration (YAML)")
    parser.add_argument(
        "--target", default=None, help="HOST:PORT to scrape (default: from the config)"
    )
    parser.add_argument(
        "--scrape-interval",
        default=None,
        help="e.g. 5s (default: the collection interval, at least 1s)",
    )
    parser.add_argument(
        "--token-file",
        default=DEFAULT_TOKEN_FILE,
        help=f"file holding the bearer token (default: {DEFAULT_TOKEN_FILE})",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    cluster = ClusterConfig.from_yaml(args.config) if args.config else None
    env_token = token_from(None)
    print(render(cluster, args.target, args.scrape_interval, args.token_file, env_token), end="")
    return 0


def metrics_need_token(settings: HTTPConfig, env_token: str | None) -> bool:
    """Whether ``/metrics`` will ask for a bearer token."""
    if settings.metrics_open:
        return False
    return bool(settings.metrics_token or settings.auth_token or env_token)


def default_target(cluster: ClusterConfig | None) -> str:
    """The HTTP app's address (``http.host``/``http.port``), as a scrape target."""
    settings = cluster.http if cluster is not None else HTTPConfig()
    host, port = settings.host, settings.port
    if port == 0:
        raise ConfigError("the coordinator's port is 0 (chosen at start-up): give --target")
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"  # a wildcard bind is reachable on loopback from the same machine
    return host_port(host, port)


def scrape_interval(monitoring: MonitoringConfig) -> str:
    seconds = max(1.0, monitoring.collection_interval)
    return f"{seconds:g}s"


def render(
    cluster: ClusterConfig | None,
    target: str | None,
    interval: str | None,
    token_file: str,
    env_token: str | None,
) -> str:
    """The configuration as YAML text, with a comment on how to provide the token."""
    monitoring = cluster.monitoring if cluster is not None else MonitoringConfig()
    http = cluster.http if cluster is not None else HTTPConfig()
    job: dict[str, Any] = {
        "job_name": JOB_NAME,
        "metrics_path": "/metrics",
        "scrape_interval": interval or scrape_interval(monitoring),
        "static_configs": [{"targets": [target or default_target(cluster)]}],
    }
    header = [
        "# Prometheus configuration for mlx-relay, printed by `mlx-relay prometheus-config`.",
        "# Metrics and units: docs/monitoring-api.md. Check it with `promtool check config FILE`.",
    ]
    if metrics_need_token(http, env_token):
        job["authorization"] = {"type": "Bearer", "credentials_file": token_file}
        header.append(
            f"# /metrics requires a bearer token: write it (alone) into {token_file}, "
            "readable only by the user Prometheus runs as (chmod 600)."
        )
    data = {"global": {"scrape_interval": job["scrape_interval"]}, "scrape_configs": [job]}
    return "\n".join(header) + "\n" + yaml.safe_dump(data, sort_keys=False)
