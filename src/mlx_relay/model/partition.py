"""Dividing a model's layers among pipeline stages (pure functions)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from mlx_relay.core.config import ClusterConfig
from mlx_relay.core.errors import PartitionError
from mlx_relay.core.types import LayerRange


def partition_layers(
    num_layers: int,
    requested: Sequence[LayerRange | None],
    budgets: Sequence[float] | None = None,
) -> list[LayerRange]:
    """The layer range of each stage, in pipeline order.

    Args:
        num_layers: The model's transformer layer count.
        requested: One entry per stage: an explicit range, or ``None`` to choose
            automatically. Either every entry is explicit or none is.
        budgets: With automatic ranges, each stage's relative capacity (e.g. memory);
            layers are split in proportion, every stage getting at least one. Equal when
            omitted.

    Returns:
        Contiguous ranges covering ``[0, num_layers)`` exactly once.

    Raises:
        PartitionError: The request cannot be satisfied; the message says why.
    """
    stages = len(requested)
    if num_layers < 1:
        raise PartitionError(f"a model needs at least one layer, got {num_layers}")
    if stages == 0:
        raise PartitionError("no stages to assign layers to")
    explicit = [r for r in requested if r is not None]
    if explicit and len(explicit) != stages:
        raise PartitionError(
            "give every stage explicit layers, or none (automatic): "
            f"{len(explicit)} of {stages} stages have explicit layers"
        )
    if explicit:
        return _validate(num_layers, explicit)
    if stages > num_layers:
        raise PartitionError(
            f"{stages} stages cannot share {num_layers} layers: every stage needs at least one"
        )
    weights = _weights(stages, budgets)
    return _split(num_layers, weights)


def assign_layers(config: ClusterConfig, num_layers: int) -> dict[str, LayerRange]:
    """Each worker's layer range, keyed by worker id in pipeline order (the replicas of a
    stage, workers with the same explicit layers, share its range).

    Workers with ``layers: auto`` (or none) share the layers in proportion to their
    ``memory_budget_gb`` (equally when no worker gives one).

    Raises:
        PartitionError: The configured layers do not fit ``num_layers``.
    """
    stages = config.stages
    workers = [replicas[0] for replicas in stages]
    requested = [w.layers if isinstance(w.layers, LayerRange) else None for w in workers]
    given = [w.memory_budget_gb for w in workers]
    budgets: list[float] | None = None
    if any(g is not None for g in given):
        known = [g for g in given if g is not None]
        # A worker without a budget counts as an average one.
        fill = sum(known) / len(known)
        budgets = [g if g is not None else fill for g in given]
    ranges = partition_layers(num_layers, requested, budgets)
    # Replicas of a stage get its range.
    return {w.id: r for replicas, r in zip(stages, ranges, strict=True) for w in replicas}


def _validate(num_layers: int, ranges: list[LayerRange]) -> list[LayerRange]:
    expected = 0
    for i, r in enumerate(ranges):
        if r.start < expected:
            raise PartitionError(
                f"stage {i} layers {r} overlap the previous stage, which ends at {expected}"
            )
        if r.start > expected:
            raise PartitionError(
                f"layers [{expected}, {r.start}) are assigned to no stage "
                f"(stage {i} starts at {r.start})"
            )
        expected = r.end
    if expected > num_layers:
        raise PartitionError(
            f"stages cover layers [0, {expected}) but the model has only {num_layers} layers"
        )
    if expected < num_layers:
        raise PartitionError(
            f"layers [{expected}, {num_layers}) are assigned to no stage "
            f"(the model has {num_layers} layers)"
        )
    return list(ranges)


def _weights(stages: int, budgets: Sequence[float] | None) -> list[float]:
    if budgets is None:
        return [1.0] * stages
    if len(budgets) != stages:
        raise PartitionError(f"expected {stages} budgets (one per stage), got {len(budgets)}")
    for i, b in enumerate(budgets):
        if not (math.isfinite(b) and b > 0):
            raise PartitionError(f"stage {i} budget must be a positive number, got {b!r}")
    return [float(b) for b in budgets]


def _split(num_layers: int, weights: list[float]) -> list[LayerRange]:
    stages = len(weights)
    total = sum(weights)
    quotas = [num_layers * w / total for w in weights]
    counts = [max(1, math.floor(q)) for q in quotas]
    # Largest remainder: hand out what flooring left over to the stages furthest below their
    # quota; take back what the one-layer minimum added from those furthest above it.
    # Ties go to the earlier stage, so the result is deterministic.
    while sum(counts) < num_layers:
        i = max(range(stages), key=lambda j: (quotas[j] - counts[j], -j))
        counts[i] += 1
    while sum(counts) > num_layers:
        i = max(
            (j for j in range(stages) if counts[j] > 1), key=lambda j: (counts[j] - quotas[j], -j)
        )
        counts[i] -= 1
    ranges = []
    start = 0
    for count in counts:
        ranges.append(LayerRange(start, start + count))
        start += count
    return ranges
