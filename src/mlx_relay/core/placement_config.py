"""The ``placement:`` section of the cluster configuration: live repartition of the layers
(``mlx-relay rebalance``, ``POST /api/placement/apply``) and its opt-in automatic mode
(docs/monitoring-api.md, "Live repartition")."""

from __future__ import annotations

from pydantic import Field

from mlx_relay.core.validation import ConfigSection


class AutoRebalanceConfig(ConfigSection):
    """Apply the advisor's proposal by itself, checked every ``interval_s`` seconds: only
    when the predicted gain is at least ``min_gain`` (0.2 = 20 % more decode steps per
    second), every stage has been measured on the current split, and ``hold_down_s``
    seconds have passed since the coordinator started or last changed the split."""

    enabled: bool = False
    min_gain: float = Field(default=0.2, gt=0)
    hold_down_s: float = Field(default=600.0, ge=0)
    interval_s: float = Field(default=30.0, gt=0)


class PlacementConfig(ConfigSection):
    """How a new split is applied: the running requests drain for up to ``drain_timeout_s``
    seconds (past that, the split stays as it is), then each worker has ``load_timeout_s``
    seconds to load its new range."""

    drain_timeout_s: float = Field(default=120.0, gt=0)
    load_timeout_s: float = Field(default=300.0, gt=0)
    auto_rebalance: AutoRebalanceConfig = Field(default_factory=AutoRebalanceConfig)
