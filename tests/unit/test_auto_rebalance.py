"""The automatic rebalance acts only past its gain threshold and its hold-down (fake clock);
split checks and the CLI's split syntax."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from mlx_relay.cli.rebalance import parse_split
from mlx_relay.coordinator.repartition import RepartitionResult, check_split
from mlx_relay.core.config import ClusterConfig
from mlx_relay.core.errors import ConfigError, PartitionError
from mlx_relay.core.placement_config import AutoRebalanceConfig
from mlx_relay.core.types import LayerRange
from mlx_relay.server.placement import PlacementView, SplitView, StageView
from mlx_relay.server.rebalance import Rebalancer, auto_decision

SETTINGS = AutoRebalanceConfig(enabled=True, min_gain=0.2, hold_down_s=100.0)
CURRENT = [(0, 3), (3, 4)]
PROPOSED = [(0, 2), (2, 4)]


def split(pairs: list[tuple[int, int]], step: float) -> SplitView:
    stages = [
        StageView(
            device_id=f"worker-{i}",
            layer_start=a,
            layer_end=b,
            predicted_seconds=step,
            memory_bytes=1,
        )
        for i, (a, b) in enumerate(pairs)
    ]
    return SplitView(stages=stages, predicted_step_seconds=step, predicted_latency_seconds=step)


def view(gain: float, *, source: str = "measured", proposed: list[tuple[int, int]] = PROPOSED):
    return PlacementView(
        source=source,
        compute="float32",
        head_layers=1.0,
        kv_budget_tokens=1,
        devices=[],
        current=split(CURRENT, 1.0 + gain),
        proposed=split(proposed, 1.0),
        predicted_gain_ratio=gain,
    )


def test_the_rule_waits_for_the_hold_down_then_the_threshold() -> None:
    waiting = auto_decision(view(0.5), SETTINGS, last_change=0.0, now=99.0)
    assert not waiting.act and waiting.reason == "hold-down: 99 of 100 s passed"
    small = auto_decision(view(0.19), SETTINGS, last_change=0.0, now=100.0)
    assert not small.act and small.reason == "predicted gain +19.0% below min_gain 20%"
    unmeasured = auto_decision(view(0.5, source="model"), SETTINGS, 0.0, 100.0)
    assert not unmeasured.act and "measured" in unmeasured.reason
    same = auto_decision(view(0.0, proposed=CURRENT), SETTINGS, 0.0, 1000.0)
    assert not same.act and same.reason == "the current split is the best one"
    go = auto_decision(view(0.2), SETTINGS, last_change=0.0, now=100.0)
    assert go.act and go.reason == "predicted gain +20.0% (min_gain 20%)"


@dataclass
class FakeClock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeSource:
    """The advisor's answer, set by the test."""

    answer: PlacementView = field(default_factory=lambda: view(0.5))
    baseline: dict[str, Any] = field(default_factory=dict)

    def view(self) -> PlacementView:
        return self.answer

    def totals(self) -> dict[str, Any]:
        return {"worker-0": "at the switch"}


@dataclass
class FakeOrchestrator:
    """Records the splits it is asked to apply and applies them at once."""

    stages: list[Any] = field(default_factory=list)
    applied: list[list[LayerRange]] = field(default_factory=list)

    @property
    def model_info(self) -> Any:
        return type("Info", (), {"num_layers": 4})

    async def repartition(self, split: list[LayerRange], on_phase: Any) -> RepartitionResult:
        on_phase("switching", "")
        self.applied.append(list(split))
        return RepartitionResult((LayerRange(0, 3), LayerRange(3, 4)), tuple(split))


async def test_the_automatic_mode_on_a_fake_clock() -> None:
    clock, source, orchestrator = FakeClock(), FakeSource(), FakeOrchestrator()
    orchestrator.stages = [
        type("Stage", (), {"layer_range": LayerRange(*pair)})() for pair in CURRENT
    ]
    rebalancer = Rebalancer(orchestrator, source, clock=clock)  # type: ignore[arg-type]
    clock.now = 50.0
    assert not (await rebalancer.auto_round(SETTINGS)).act  # hold-down since the start
    clock.now = 150.0
    source.answer = view(0.1)
    assert not (await rebalancer.auto_round(SETTINGS)).act  # below the threshold
    source.answer = view(0.5)
    assert (await rebalancer.auto_round(SETTINGS)).act
    status = await rebalancer.wait()
    assert status.state == "done" and status.trigger == "auto"
    assert status.predicted_gain_ratio == 0.5
    assert orchestrator.applied == [[LayerRange(0, 2), LayerRange(2, 4)]]
    assert rebalancer.last_change == 150.0
    assert source.baseline == {"worker-0": "at the switch"}  # measured from the switch on
    clock.now = 249.0
    decision = await rebalancer.auto_round(SETTINGS)
    assert not decision.act and decision.reason.startswith("hold-down: 99 of 100")
    clock.now = 250.0
    assert (await rebalancer.auto_round(SETTINGS)).act
    await rebalancer.wait()
    assert len(orchestrator.applied) == 2


def test_split_checks() -> None:
    assert check_split([LayerRange(0, 1), LayerRange(1, 4)], 4, 2) == [
        LayerRange(0, 1),
        LayerRange(1, 4),
    ]
    with pytest.raises(PartitionError, match="3 layer ranges for 2 stages"):
        check_split([LayerRange(0, 1), LayerRange(1, 2), LayerRange(2, 4)], 4, 2)
    with pytest.raises(PartitionError, match=r"layers \[3, 4\) are assigned to no stage"):
        check_split([LayerRange(0, 1), LayerRange(1, 3)], 4, 2)
    assert parse_split("0:19, 19:30") == [(0, 19), (19, 30)]
    with pytest.raises(PartitionError, match="got '0-19'"):
        parse_split("0-19,19:30")


def test_placement_section_is_validated() -> None:
    base = {"devices": [{"id": "w", "host": "127.0.0.1", "port": 0}]}
    config = ClusterConfig.from_dict({**base, "placement": {"auto_rebalance": {"enabled": True}}})
    assert config.placement.auto_rebalance.enabled
    assert config.placement.auto_rebalance.min_gain == 0.2
    with pytest.raises(ConfigError) as bad:
        ClusterConfig.from_dict({**base, "placement": {"auto_rebalance": {"min_gain": -1}}})
    assert str(bad.value).startswith("<config>: placement.auto_rebalance.min_gain:")
    assert "\n" not in str(bad.value)
