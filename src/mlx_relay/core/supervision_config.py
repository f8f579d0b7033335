"""The ``supervision:`` section of the cluster configuration: how ``mlx-relay up`` restarts
worker processes that exit (README, "mlx-relay up")."""

from __future__ import annotations

from pydantic import Field, model_validator

from mlx_relay.core.validation import ConfigSection, FieldProblem


class SupervisionConfig(ConfigSection):
    """Restart a worker that exits after ``backoff_initial`` seconds, doubling up to
    ``backoff_max``; give up when it exits more than ``max_restarts`` times within
    ``window`` seconds. ``max_restarts: 0`` never restarts."""

    max_restarts: int = Field(default=5, ge=0, le=1000)
    window: float = Field(default=60.0, gt=0)
    backoff_initial: float = Field(default=1.0, gt=0)
    backoff_max: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _check_backoff(self) -> SupervisionConfig:
        if self.backoff_max < self.backoff_initial:
            raise FieldProblem(
                "supervision.backoff_max",
                f"expected at least backoff_initial ({self.backoff_initial:g})",
            )
        return self
