"""From the ``history`` configuration section to a store and a recorder."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

from mlx_relay.core.history_config import HistoryConfig
from mlx_relay.monitoring.history.recorder import HistoryRecorder
from mlx_relay.monitoring.history.store import HistoryStore
from mlx_relay.monitoring.history.tiers import Tier, build_tiers
from mlx_relay.monitoring.metrics import MetricsCollector
from mlx_relay.monitoring.snapshot import HealthSummary

FILE_NAME = "history.sqlite"


def default_path(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_STATE_HOME/mlx-relay/history.sqlite``, else ``~/.local/state/mlx-relay/...``."""
    env = os.environ if environ is None else environ
    state = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "mlx-relay" / FILE_NAME


def tiers_from_config(config: HistoryConfig, collection_interval: float) -> list[Tier]:
    first, *rest = config.tiers
    return build_tiers(
        collection_interval, [(t.interval or 0.0, t.retention) for t in rest], first.retention
    )


def open_history(
    config: HistoryConfig,
    collector: MetricsCollector,
    health_source: Callable[[], HealthSummary | None] | None = None,
) -> HistoryRecorder:
    """Open the store at the configured path and a recorder for ``collector`` (not started).

    Raises:
        StoreError: the file cannot be created or opened.
    """
    path = Path(config.path).expanduser() if config.path else default_path()
    store = HistoryStore(
        path,
        tiers_from_config(config, collector.collection_interval),
        max_bytes=config.max_bytes,
        flush_interval=config.flush_interval,
        requests_retention=config.requests_retention,
    )
    store.start()
    return HistoryRecorder(store, collector, health_source)
