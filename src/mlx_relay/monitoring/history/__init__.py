"""History that survives restarts: an embedded, tiered time-series store on SQLite.

:class:`HistoryStore` keeps packed blocks of samples in tiers (raw, then count/sum/min/max
rollups) and a request log; :class:`HistoryRecorder` feeds it from a collector;
:func:`open_history` builds both from the ``history`` configuration section. See
docs/monitoring-api.md, "History".
"""

from mlx_relay.monitoring.history.config import default_path, open_history, tiers_from_config
from mlx_relay.monitoring.history.exposition import HistoryCollector
from mlx_relay.monitoring.history.query import MAX_POINTS, Plan, QueryError, plan_query
from mlx_relay.monitoring.history.recorder import HistoryRecorder
from mlx_relay.monitoring.history.schema import StoreError
from mlx_relay.monitoring.history.series import SeriesSpec
from mlx_relay.monitoring.history.store import HistoryStore, StoreStats
from mlx_relay.monitoring.history.tiers import Tier, build_tiers

__all__ = [
    "MAX_POINTS",
    "HistoryCollector",
    "HistoryRecorder",
    "HistoryStore",
    "Plan",
    "QueryError",
    "SeriesSpec",
    "StoreError",
    "StoreStats",
    "Tier",
    "build_tiers",
    "default_path",
    "open_history",
    "plan_query",
    "tiers_from_config",
]
