"""The placement cost model and advisor: the dynamic programme against brute force on random
cost tables, memory caps, what-ifs, and the footprint read from real safetensors headers."""

from __future__ import annotations

import itertools
import random
from dataclasses import replace
from pathlib import Path

import pytest

from mlx_relay.core.errors import PartitionError
from mlx_relay.core.types import LayerRange
from mlx_relay.model.footprint import read_footprint
from mlx_relay.model.placement import (
    DeviceCost,
    ModelCosts,
    StageSample,
    advise,
    best_split,
    device_costs,
    predict,
    what_if,
)


def splits(num_layers: int, stages: int) -> list[list[LayerRange]]:
    """Every contiguous split of ``num_layers`` into ``stages`` non-empty ranges."""
    result = []
    for cuts in itertools.combinations(range(1, num_layers), stages - 1):
        bounds = [0, *cuts, num_layers]
        result.append([LayerRange(a, b) for a, b in itertools.pairwise(bounds)])
    return result


def random_case(rng: random.Random) -> tuple[list[DeviceCost], ModelCosts]:
    layers = rng.randint(1, 9)
    stages = rng.randint(1, min(4, layers))
    costs = ModelCosts(
        layer_bytes=tuple(rng.randint(1, 100) for _ in range(layers)),
        embed_bytes=rng.randint(0, 200),
        head_bytes=rng.randint(0, 200),
        kv_bytes_per_layer=rng.randint(0, 30),
        head_layers=rng.uniform(0, 8),
    )
    devices = [
        DeviceCost(
            device_id=f"d{i}",
            decode_layer_seconds=rng.uniform(0.001, 0.05),
            prefill_layer_seconds_per_token=None,
            memory_cap_bytes=rng.choice([None, rng.randint(50, 900)]),
            link_seconds=rng.choice([0.0, rng.uniform(0, 0.05)]),
            measured=True,
        )
        for i in range(stages)
    ]
    return devices, costs


def feasible(devices: list[DeviceCost], split: list[LayerRange], costs: ModelCosts) -> bool:
    return all(
        d.memory_cap_bytes is None or costs.stage_bytes(r) <= d.memory_cap_bytes
        for d, r in zip(devices, split, strict=True)
    )


@pytest.mark.parametrize("seed", range(300))
def test_dp_matches_brute_force_and_respects_memory_caps(seed: int) -> None:
    devices, costs = random_case(random.Random(seed))
    options = [s for s in splits(costs.num_layers, len(devices)) if feasible(devices, s, costs)]
    if not options:
        with pytest.raises(PartitionError, match="fits every device's memory cap"):
            best_split(devices, costs)
        return
    brute = min(predict(devices, s, costs).step_seconds for s in options)
    found = best_split(devices, costs)
    assert found.step_seconds == pytest.approx(brute, rel=1e-12)
    assert feasible(devices, list(found.split), costs)
    assert found.split[0].start == 0 and found.split[-1].end == costs.num_layers
    assert all(a.end == b.start for a, b in itertools.pairwise(found.split))


def uniform_costs(layers: int, head_layers: float = 0.0) -> ModelCosts:
    return ModelCosts(
        layer_bytes=(100,) * layers,
        embed_bytes=0,
        head_bytes=0,
        kv_bytes_per_layer=0,
        head_layers=head_layers,
    )


def test_measured_head_cost_moves_layers_off_the_last_stage() -> None:
    # 15/15 on equal devices, the head worth 6 layers: the last stage runs 21 units, so the
    # balanced split gives it 12 layers (18 units) and the first 18.
    costs = uniform_costs(30, head_layers=6.0)
    samples = [
        StageSample("a", LayerRange(0, 15), decode_seconds=0.015),
        StageSample("b", LayerRange(15, 30), decode_seconds=0.021),
    ]
    advice = advise(samples, costs)
    assert [d.decode_layer_seconds for d in advice.devices] == pytest.approx([0.001, 0.001])
    assert advice.current is not None
    assert advice.current.step_seconds == pytest.approx(0.021)
    assert advice.proposed.split == (LayerRange(0, 18), LayerRange(18, 30))
    assert advice.proposed.step_seconds == pytest.approx(0.018)
    assert advice.gain_ratio == pytest.approx(0.021 / 0.018 - 1)
    # One request's latency is the sum over stages and links.
    assert advice.proposed.latency_seconds == pytest.approx(0.036)


def test_memory_cap_limits_the_fast_device() -> None:
    costs = uniform_costs(10)
    fast = DeviceCost("fast", 0.001, None, memory_cap_bytes=300, link_seconds=0, measured=True)
    slow = DeviceCost("slow", 0.01, None, memory_cap_bytes=None, link_seconds=0, measured=True)
    proposed = best_split([fast, slow], costs)
    assert proposed.split == (LayerRange(0, 3), LayerRange(3, 10))
    assert proposed.stage_bytes == (300, 700)


def test_unmeasured_device_takes_the_mean_speed() -> None:
    costs = uniform_costs(4)
    samples = [
        StageSample("a", LayerRange(0, 2), decode_seconds=0.004),
        StageSample("b", LayerRange(2, 4), decode_seconds=None),
    ]
    devices = device_costs(samples, costs)
    assert devices[1].decode_layer_seconds == pytest.approx(0.002)
    assert not devices[1].measured


def test_what_if_adds_and_removes_devices() -> None:
    costs = uniform_costs(12)
    devices = device_costs(
        [
            StageSample("w0", LayerRange(0, 6), decode_seconds=0.006),
            StageSample("w1", LayerRange(6, 12), decode_seconds=0.006),
        ],
        costs,
    )
    added = what_if(devices, costs, add_device_bytes=[400])
    assert [d.device_id for d in added.devices] == ["w0", "w1", "new-1"]
    assert added.proposed.step_seconds == pytest.approx(0.004)
    assert added.proposed.stage_bytes[2] <= 400
    alone = what_if(devices, costs, without=["w1"])
    assert alone.proposed.split == (LayerRange(0, 12),)
    assert alone.proposed.step_seconds == pytest.approx(0.012)
    with pytest.raises(PartitionError, match="no device worker-9"):
        what_if(devices, costs, without=["worker-9"])


def test_footprint_from_safetensors_headers(tmp_path: Path) -> None:
    from tests.support.tiny_model import make_tiny_model_dir

    plain = read_footprint(make_tiny_model_dir(tmp_path / "plain", num_layers=3))
    quant = read_footprint(make_tiny_model_dir(tmp_path / "q", num_layers=3, quantize=True))
    assert len(plain.layer_bytes) == 3
    # float32 weights: stored == dense; 4-bit: stored is well under dense, dense the same.
    assert plain.layer_bytes == plain.layer_dense_bytes
    assert quant.layer_dense_bytes == plain.layer_dense_bytes
    assert all(q < p / 3 for q, p in zip(quant.layer_bytes, plain.layer_bytes, strict=True))
    assert plain.head_dense_bytes >= plain.embed_dense_bytes > 0
    costs = plain.costs(dense=True, kv_tokens=10)
    assert costs.kv_bytes_per_layer == plain.kv_values_per_token_per_layer * 4 * 10
    whole = costs.stage_bytes(LayerRange(0, 3))
    assert whole == sum(plain.layer_dense_bytes) + plain.embed_dense_bytes + (
        plain.head_dense_bytes + 3 * costs.kv_bytes_per_layer
    )


def test_stages_on_one_host_share_a_fitted_overhead_and_speed() -> None:
    # One host: 3 layers took 3.5 ms, 1 layer 1.5 ms -> 0.5 ms per call + 1 ms per layer.
    costs = uniform_costs(4)
    samples = [
        StageSample("a", LayerRange(0, 3), decode_seconds=0.0035, host="h"),
        StageSample("b", LayerRange(3, 4), decode_seconds=0.0015, host="h"),
    ]
    advice = advise(samples, costs)
    for device in advice.devices:
        assert device.overhead_seconds == pytest.approx(0.0005)
        assert device.decode_layer_seconds == pytest.approx(0.001)
    assert advice.proposed.split == (LayerRange(0, 2), LayerRange(2, 4))
    assert advice.proposed.step_seconds == pytest.approx(0.0025)
    assert advice.gain_ratio == pytest.approx(0.0035 / 0.0025 - 1)
    # Two hosts are fitted apart: each its own pooled speed, no overhead.
    apart = device_costs([replace(s, host=s.device_id) for s in samples], costs)
    assert [d.overhead_seconds for d in apart] == [0.0, 0.0]
    assert [d.decode_layer_seconds for d in apart] == pytest.approx([0.0035 / 3, 0.0015])


def test_links_add_to_latency_not_to_the_step() -> None:
    costs = uniform_costs(2)
    slow_link = DeviceCost("a", 0.001, None, None, link_seconds=0.5, measured=True)
    other = DeviceCost("b", 0.001, None, None, link_seconds=0.0, measured=True)
    prediction = predict([slow_link, other], [LayerRange(0, 1), LayerRange(1, 2)], costs)
    assert prediction.step_seconds == pytest.approx(0.001)
    assert prediction.latency_seconds == pytest.approx(0.502)
