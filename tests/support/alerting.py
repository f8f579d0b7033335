"""Helpers of the alerting tests: a worker-process cluster with monitoring, its configuration
with an ``alerting:`` section, an engine over it, and real servers started as subprocesses."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx

from mlx_relay.core.config import AlertingConfig, ClusterConfig
from mlx_relay.monitoring.alerting import AlertEngine, build_alert_engine
from tests.support.cluster import LocalCluster, process_cluster
from tests.support.dashboard_cluster import FAST_MONITORING, wait_for

# Fast failure detection: a killed worker is seen down within a poll or two.
NETWORK = {"request_timeout": 3.0, "connect_timeout": 30.0, "ping_timeout": 1.0}


@contextlib.asynccontextmanager
async def monitored_process_cluster(model_dir: Path, work_dir: Path) -> AsyncIterator[LocalCluster]:
    """Two ``mlx-relay worker`` processes (so one can be killed) and a monitoring coordinator."""
    async with process_cluster(
        model_dir,
        work_dir,
        2,
        enable_monitoring=True,
        network=NETWORK,
        monitoring=FAST_MONITORING,
    ) as cluster:
        yield cluster


def with_alerting(cluster: LocalCluster, **alerting: Any) -> ClusterConfig:
    """The cluster's configuration with these ``alerting:`` settings."""
    settings = AlertingConfig.model_validate(alerting)
    return cluster.config.model_copy(update={"alerting": settings})


def engine_for(cluster: LocalCluster, config: ClusterConfig) -> AlertEngine:
    """An unstarted engine over the coordinator's collector, as the coordinator builds it."""
    collector = cluster.orchestrator.metrics_collector
    assert collector is not None
    return build_alert_engine(config, collector, cluster.orchestrator.health_monitor)


@contextlib.contextmanager
def background_process(command: list[str], log_file: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``command`` (output to ``log_file``) for the block; terminated, then killed, after."""
    with open(log_file, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def exported_series_names() -> set[str]:
    """Every series name ``/metrics`` can have: the families of a fresh coordinator, plus the
    alert families, with the suffixes of their types."""
    from mlx_relay.core.config import InferenceConfig
    from mlx_relay.monitoring.alerting.exposition import alert_families
    from mlx_relay.monitoring.alerting.rules import configured_rules
    from mlx_relay.monitoring.metrics import MetricsCollector
    from mlx_relay.monitoring.prometheus_families import snapshot_families

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    collector = MetricsCollector("coordinator", role="coordinator")
    rules = configured_rules(AlertingConfig(), InferenceConfig())
    engine = AlertEngine(rules, lambda wanted: {}, config=AlertingConfig())
    families = [*snapshot_families(collector.snapshot(), None, "0"), *alert_families(engine)]
    return {f.name + suffix for f in families for suffix in suffixes[f.type]}


async def wait_ready(base: str, what: str) -> None:
    """Wait until ``base/-/ready`` answers 200 (Prometheus and Alertmanager have it)."""
    async with httpx.AsyncClient(base_url=base, timeout=5) as http:

        async def ready() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return (await http.get("/-/ready")).status_code == 200
            return False

        await wait_for(ready, timeout=60, interval=0.2, what=f"{what} to be ready")
