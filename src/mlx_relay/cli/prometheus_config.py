"""``mlx-relay prometheus-config``: print a Prometheus configuration that scrapes the cluster.

The target is the ``/metrics`` of the config's ``http`` address: the coordinator's app (one
per cluster), or the standalone dashboard's. When ``/metrics`` needs a
token, the job reads it from a file so that the token never sits in prometheus.yml. With
``--rules FILE`` it also writes the alerting rules the coordinator evaluates (thresholds from
the config) as a Prometheus rule file, and the configuration loads it (``rule_files``);
``--alertmanager HOST:PORT`` sends the resulting alerts to an Alertmanager.
"""

from __future__ import annotations

import argparse
from typing import Any

import yaml

from mlx_relay.cli.options import TOKEN_ENV, token_from
from mlx_relay.core.addresses import host_port
from mlx_relay.core.config import (
    AlertingConfig,
    ClusterConfig,
    HTTPConfig,
    InferenceConfig,
    MonitoringConfig,
)
from mlx_relay.core.errors import ConfigError
from mlx_relay.monitoring.alerting.rules import (
    configured_rules,
    prometheus_duration,
    prometheus_rule_file,
)

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
    parser.add_argument(
        "--rules",
        default=None,
        metavar="FILE",
        help="also write the alerting rules to FILE and load them in the configuration",
    )
    parser.add_argument(
        "--alertmanager",
        default=None,
        metavar="HOST:PORT",
        help="send the rules' alerts to this Alertmanager",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    cluster = ClusterConfig.from_yaml(args.config) if args.config else None
    env_token = token_from(None)
    if args.rules is not None:
        write_rules(cluster, args.rules)
    text = render(
        cluster,
        args.target,
        args.scrape_interval,
        args.token_file,
        env_token,
        rules_file=args.rules,
        alertmanager=args.alertmanager,
    )
    print(text, end="")
    return 0


def rules_text(cluster: ClusterConfig | None) -> str:
    """The configured alerting rules as a Prometheus rule file (YAML text)."""
    alerting = cluster.alerting if cluster is not None else AlertingConfig()
    inference = cluster.inference if cluster is not None else InferenceConfig()
    rules = configured_rules(alerting, inference)
    header = (
        "# Alerting rules of mlx-relay, written by `mlx-relay prometheus-config --rules`.\n"
        "# The coordinator evaluates the same rules itself. Check: `promtool check rules FILE`.\n"
    )
    return header + yaml.safe_dump(prometheus_rule_file(rules), sort_keys=False, width=100)


def write_rules(cluster: ClusterConfig | None, path: str) -> None:
    text = rules_text(cluster)
    try:
        with open(path, "w", encoding="utf-8") as out:
            out.write(text)
    except OSError as exc:
        raise ConfigError(f"--rules {path}: cannot write the rules file: {exc.strerror}") from None


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
    *,
    rules_file: str | None = None,
    alertmanager: str | None = None,
) -> str:
    """The configuration as YAML text, with a comment on how to provide the token; it loads
    ``rules_file`` and sends alerts to ``alertmanager`` (``HOST:PORT``) when given."""
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
    data: dict[str, Any] = {"global": {"scrape_interval": job["scrape_interval"]}}
    if rules_file is not None:
        alerting = cluster.alerting if cluster is not None else AlertingConfig()
        data["global"]["evaluation_interval"] = prometheus_duration(
            max(1.0, round(alerting.evaluation_interval))
        )
        data["rule_files"] = [rules_file]
    if alertmanager is not None:
        data["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]}
    data["scrape_configs"] = [job]
    return "\n".join(header) + "\n" + yaml.safe_dump(data, sort_keys=False)
