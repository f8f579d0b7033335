"""What a stage is configured with and what one ``Forward`` on it takes and produces."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlx_relay.proto import relay_pb2 as pb


@dataclass(frozen=True)
class StageLimits:
    """What one stage accepts (from ``inference`` in the cluster config)."""

    max_prompt_tokens: int
    max_sessions: int
    session_ttl_seconds: float
    max_context: int | None = None
    max_sessions_per_peer: int | None = None


@dataclass(frozen=True)
class EngineInfo:
    """How a stage computes: MLX backend, the weights' form, the BLAS and its threads."""

    backend: str = "unknown"
    compute: str = "unknown"
    blas: str = "unknown"
    blas_threads: int = 0


@dataclass(frozen=True)
class CheckedEntry:
    """A Forward entry that passed the static checks; ``length`` is its number of positions."""

    entry: pb.ForwardEntry
    length: int
    sampling: Any = None


@dataclass(frozen=True)
class StageCall:
    """One MLX call of a Forward: a prefill entry alone, or a batch of decode entries."""

    phase: str
    seconds: float
    tokens: int
    batch_size: int


@dataclass
class ForwardOutcome:
    """What one Forward call produced on the MLX thread: ``started`` is when it began
    (``time.perf_counter()``), ``encode_seconds`` and ``sample_seconds`` the parts of
    ``compute_seconds`` spent encoding hidden states and sampling tokens."""

    results: list[pb.ForwardResult]
    compute_seconds: float
    calls: list[StageCall]
    started: float = 0.0
    encode_seconds: float = 0.0
    sample_seconds: float = 0.0
