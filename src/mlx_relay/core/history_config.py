"""The ``history:`` section of the cluster configuration (docs/monitoring-api.md, "History")."""

from __future__ import annotations

from pydantic import Field, model_validator

from mlx_relay.core.validation import ConfigSection, FieldProblem


class HistoryTier(ConfigSection):
    """One tier of the history store: points every ``interval`` seconds, kept ``retention``
    seconds.

    The first tier keeps every sample (leave its interval empty: it is the collection
    interval); the others keep count/sum/min/max per point.
    """

    interval: float | None = Field(default=None, gt=0)
    retention: float = Field(gt=0)


def _default_tiers() -> list[HistoryTier]:
    return [
        HistoryTier(retention=86400.0),
        HistoryTier(interval=60.0, retention=30 * 86400.0),
        HistoryTier(interval=3600.0, retention=365 * 86400.0),
    ]


class HistoryConfig(ConfigSection):
    """The coordinator's embedded history store.

    ``path`` empty means ``$XDG_STATE_HOME/mlx-relay/history.sqlite`` (else
    ``~/.local/state/mlx-relay/history.sqlite``). ``tiers[0]`` is the raw tier; every
    further tier's interval must be a whole multiple of the one before it.
    """

    enabled: bool = True
    path: str | None = None
    max_bytes: int = Field(default=1 << 30, ge=1 << 20)
    flush_interval: float = Field(default=10.0, gt=0, le=3600)
    requests_retention: float = Field(default=30 * 86400.0, gt=0)
    tiers: list[HistoryTier] = Field(default_factory=_default_tiers, min_length=1, max_length=6)

    @model_validator(mode="after")
    def _tiers_nest(self) -> HistoryConfig:
        for i, tier in enumerate(self.tiers[1:], start=1):
            if tier.interval is None:
                raise FieldProblem(f"history.tiers[{i}].interval", "required field is missing")
        for i in range(2, len(self.tiers)):
            before = self.tiers[i - 1].interval or 0.0
            interval = self.tiers[i].interval or 0.0
            ratio = interval / before
            if ratio < 2 or abs(ratio - round(ratio)) > 1e-9:
                raise FieldProblem(
                    f"history.tiers[{i}].interval",
                    f"expected a whole multiple (>= 2) of {before:g}, got {interval:g}",
                )
        return self
