"""The ``tracing:`` section of the cluster configuration (docs/monitoring-api.md, "Traces")."""

from __future__ import annotations

from pydantic import Field, field_validator

from mlx_relay.core.validation import ConfigSection, FieldProblem


class TracingConfig(ConfigSection):
    """Per-request traces across the pipeline.

    ``enabled`` keeps the last ``max_traces`` requests' traces in the coordinator's memory
    (``GET /api/requests/{id}/trace``, ``GET /api/profile``), fewer when they hold more than
    ``max_steps`` steps in all (about 1 KB each: long requests take more room).
    ``otlp_endpoint`` (an OTLP/HTTP traces URL, e.g. ``http://127.0.0.1:4318/v1/traces``)
    also exports every process's spans there, in batches off the request path; empty:
    nothing leaves the process.
    """

    enabled: bool = True
    max_traces: int = Field(default=200, ge=1, le=100_000)
    max_steps: int = Field(default=50_000, ge=1, le=10_000_000)
    otlp_endpoint: str | None = None
    otlp_timeout: float = Field(default=10.0, gt=0, le=300)

    @field_validator("otlp_endpoint")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not value.startswith(("http://", "https://")):
            raise FieldProblem(
                "tracing.otlp_endpoint",
                f"expected an http:// or https:// URL (OTLP/HTTP), got {value!r}",
            )
        return value
