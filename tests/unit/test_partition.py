"""Dividing layers among stages: explicit ranges are validated, automatic ones are split in
proportion to budgets, and impossible requests fail with a message saying why."""

from __future__ import annotations

import itertools

import pytest

from mlx_relay.core.config import ClusterConfig
from mlx_relay.core.errors import ConfigError, PartitionError
from mlx_relay.core.types import LayerRange
from mlx_relay.model.partition import assign_layers, partition_layers


def _counts(ranges: list[LayerRange]) -> list[int]:
    return [len(r) for r in ranges]


def _assert_covers(ranges: list[LayerRange], num_layers: int) -> None:
    assert ranges[0].start == 0
    assert ranges[-1].end == num_layers
    for before, after in itertools.pairwise(ranges):
        assert before.end == after.start
    assert all(len(r) >= 1 for r in ranges)


@pytest.mark.parametrize(
    ("num_layers", "stages"),
    [(n, s) for n in (1, 2, 3, 7, 30, 31, 80) for s in (1, 2, 3, 4, 7) if s <= n],
)
def test_auto_split_is_contiguous_complete_and_balanced(num_layers: int, stages: int) -> None:
    ranges = partition_layers(num_layers, [None] * stages)
    assert len(ranges) == stages
    _assert_covers(ranges, num_layers)
    counts = _counts(ranges)
    assert max(counts) - min(counts) <= 1
    # Largest remainder with ties to earlier stages: the bigger stages come first.
    assert counts == sorted(counts, reverse=True)


def test_equal_split_of_the_bundled_model() -> None:
    assert partition_layers(30, [None, None, None]) == [
        LayerRange(0, 10),
        LayerRange(10, 20),
        LayerRange(20, 30),
    ]
    assert _counts(partition_layers(30, [None] * 4)) == [8, 8, 7, 7]


def test_split_follows_budgets() -> None:
    assert _counts(partition_layers(30, [None, None], budgets=[2.0, 1.0])) == [20, 10]
    assert _counts(partition_layers(10, [None, None], budgets=[9, 1])) == [9, 1]
    assert _counts(partition_layers(12, [None] * 3, budgets=[1, 2, 3])) == [2, 4, 6]
    # 30 * (16, 8, 8) / 32 = (15, 7.5, 7.5): the tie for the spare layer goes to stage 1.
    assert _counts(partition_layers(30, [None] * 3, budgets=[16, 8, 8])) == [15, 8, 7]


def test_every_stage_gets_a_layer_even_with_a_tiny_budget() -> None:
    ranges = partition_layers(5, [None] * 3, budgets=[100, 1, 1])
    _assert_covers(ranges, 5)
    assert _counts(ranges) == [3, 1, 1]
    assert _counts(partition_layers(4, [None] * 4, budgets=[1000, 1, 1, 1])) == [1, 1, 1, 1]


def test_split_is_deterministic() -> None:
    first = partition_layers(31, [None] * 4, budgets=[1.5, 2.5, 1.0, 3.0])
    assert all(
        partition_layers(31, [None] * 4, budgets=[1.5, 2.5, 1.0, 3.0]) == first for _ in range(5)
    )
    _assert_covers(first, 31)


def test_explicit_ranges_are_returned_when_valid() -> None:
    requested = [LayerRange(0, 3), LayerRange(3, 4), LayerRange(4, 30)]
    assert partition_layers(30, requested) == requested


@pytest.mark.parametrize(
    ("requested", "message"),
    [
        ([LayerRange(0, 10), LayerRange(12, 30)], r"layers \[10, 12\) are assigned to no stage"),
        ([LayerRange(0, 12), LayerRange(10, 30)], r"overlap the previous stage, which ends at 12"),
        ([LayerRange(1, 30)], r"layers \[0, 1\) are assigned to no stage"),
        ([LayerRange(0, 10), LayerRange(10, 20)], r"layers \[20, 30\) are assigned to no stage"),
        ([LayerRange(0, 20), LayerRange(20, 31)], r"the model has only 30 layers"),
        ([LayerRange(10, 30), LayerRange(0, 10)], r"layers \[0, 10\) are assigned to no stage"),
    ],
)
def test_invalid_explicit_ranges_are_rejected(requested: list[LayerRange], message: str) -> None:
    with pytest.raises(PartitionError, match=message):
        partition_layers(30, requested)


def test_mixed_explicit_and_auto_is_rejected() -> None:
    with pytest.raises(PartitionError, match="1 of 2 stages have explicit layers"):
        partition_layers(30, [LayerRange(0, 10), None])


def test_more_stages_than_layers_is_rejected() -> None:
    with pytest.raises(PartitionError, match="5 stages cannot share 4 layers"):
        partition_layers(4, [None] * 5)


@pytest.mark.parametrize(
    ("budgets", "message"),
    [
        ([1.0], "expected 2 budgets"),
        ([1.0, 0.0], "stage 1 budget must be a positive number"),
        ([1.0, float("nan")], "stage 1 budget must be a positive number"),
        ([-1.0, 1.0], "stage 0 budget must be a positive number"),
    ],
)
def test_bad_budgets_are_rejected(budgets: list[float], message: str) -> None:
    with pytest.raises(PartitionError, match=message):
        partition_layers(10, [None, None], budgets=budgets)


def test_no_stages_or_no_layers_is_rejected() -> None:
    with pytest.raises(PartitionError, match="no stages"):
        partition_layers(10, [])
    with pytest.raises(PartitionError, match="at least one layer"):
        partition_layers(0, [None])


def _cluster(workers: list[dict[str, object]]) -> ClusterConfig:
    devices = [{"id": "coord", "role": "coordinator"}]
    devices += [{"port": 50051 + i, **w} for i, w in enumerate(workers)]
    return ClusterConfig.from_dict({"devices": devices})


def test_assign_layers_uses_explicit_worker_ranges_in_pipeline_order() -> None:
    config = _cluster([{"id": "a", "layers": [0, 4]}, {"id": "b", "layers": [4, 30]}])
    assigned = assign_layers(config, 30)
    assert list(assigned) == ["a", "b"]
    assert assigned == {"a": LayerRange(0, 4), "b": LayerRange(4, 30)}


def test_assign_layers_splits_auto_workers_by_memory_budget() -> None:
    config = _cluster(
        [
            {"id": "big", "layers": "auto", "memory_budget_gb": 16},
            {"id": "small", "layers": "auto", "memory_budget_gb": 8},
            {"id": "unset"},
        ]
    )
    # The worker without a budget counts as an average one (12 GB).
    assert assign_layers(config, 36) == {
        "big": LayerRange(0, 16),
        "small": LayerRange(16, 24),
        "unset": LayerRange(24, 36),
    }


def test_assign_layers_is_equal_without_budgets() -> None:
    config = _cluster([{"id": "a"}, {"id": "b", "layers": "auto"}])
    assert assign_layers(config, 30) == {"a": LayerRange(0, 15), "b": LayerRange(15, 30)}


def test_assign_layers_rejects_explicit_ranges_that_miss_the_model_size() -> None:
    config = _cluster([{"id": "a", "layers": [0, 4]}, {"id": "b", "layers": [4, 8]}])
    with pytest.raises(PartitionError, match=r"layers \[8, 30\) are assigned to no stage"):
        assign_layers(config, 30)


def test_workers_with_the_same_layers_are_replicas_of_one_stage() -> None:
    config = _cluster(
        [
            {"id": "a", "layers": [0, 4]},
            {"id": "a2", "layers": [0, 4]},
            {"id": "b", "layers": [4, 30]},
            {"id": "b2", "layers": [4, 30]},
        ]
    )
    assert [[w.id for w in stage] for stage in config.stages] == [["a", "a2"], ["b", "b2"]]
    assert [config.stage_index(w) for w in ("a", "a2", "b", "b2")] == [0, 0, 1, 1]
    assert assign_layers(config, 30) == {
        "a": LayerRange(0, 4),
        "a2": LayerRange(0, 4),
        "b": LayerRange(4, 30),
        "b2": LayerRange(4, 30),
    }
    # A replica must follow its stage's worker: the same range later overlaps.
    with pytest.raises(ConfigError, match=r"devices\[3\].layers: \[0, 4\) overlaps"):
        _cluster(
            [
                {"id": "a", "layers": [0, 4]},
                {"id": "b", "layers": [4, 30]},
                {"id": "a2", "layers": [0, 4]},
            ]
        )
