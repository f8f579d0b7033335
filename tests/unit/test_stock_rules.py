"""The stock rules against the real metric families: every name they read is exported, and
rules fire from what a real collector records (on a fake clock)."""

from __future__ import annotations

from mlx_relay.core.config import AlertingConfig, InferenceConfig
from mlx_relay.monitoring.alerting.engine import ALERTS_SERIES, AlertEngine
from mlx_relay.monitoring.alerting.rules import configured_rules
from mlx_relay.monitoring.alerting.samples import Instant, instant_from_families
from mlx_relay.monitoring.metrics import MetricsCollector
from mlx_relay.monitoring.prometheus_families import snapshot_families
from tests.support.alerting import exported_series_names


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def coordinator(clock: Clock) -> tuple[MetricsCollector, AlertEngine]:
    collector = MetricsCollector("coordinator", role="coordinator", clock=clock, wall_clock=clock)

    def source(wanted: frozenset[str] | None) -> Instant:
        return instant_from_families(snapshot_families(collector.snapshot(), None, "0"), wanted)

    rules = configured_rules(
        AlertingConfig.model_validate({"thresholds": {"stall_seconds": 20}}), InferenceConfig()
    )
    return collector, AlertEngine(rules, source, config=AlertingConfig(), clock=clock)


def firing(engine: AlertEngine) -> set[tuple[str, str]]:
    return {(a.rule, a.severity) for a in engine.alerts() if a.state == "firing"}


def test_every_name_a_stock_rule_reads_is_exported() -> None:
    exported = exported_series_names() | {ALERTS_SERIES}
    for rule in configured_rules(AlertingConfig(), InferenceConfig()):
        names = rule.expression.names
        assert names is not None and names <= exported, (rule.name, names - exported)


def test_generation_stalled_fires_when_running_requests_get_no_token() -> None:
    clock = Clock()
    collector, engine = coordinator(clock)
    trace = collector.track_request(prompt_tokens=4)
    trace.started()
    for _ in range(3):
        trace.token()
        engine.evaluate(clock.now)
        clock.now += 10
    assert ("GenerationStalled", "critical") not in firing(engine)
    for _ in range(3):  # 30 s without a token, one request running
        engine.evaluate(clock.now)
        clock.now += 10
    assert ("GenerationStalled", "critical") in firing(engine)
    (alert,) = [a for a in engine.alerts() if a.rule == "GenerationStalled"]
    assert alert.annotations["summary"].startswith("Generation stalled on the coordinator: 1 ")
    trace.finish("length")
    engine.evaluate(clock.now)
    assert ("GenerationStalled", "critical") not in firing(engine)


def test_error_rate_warns_above_5_percent_and_is_critical_above_20() -> None:
    clock = Clock()
    collector, engine = coordinator(clock)

    def finish(ok: int, failed: int) -> None:
        for _ in range(ok):
            collector.track_request(prompt_tokens=1).finish("stop")
        for _ in range(failed):
            collector.track_request(prompt_tokens=1).fail("StageError", "boom")

    # 10 % failing for 3 minutes: warning only (the rules' for is 2 minutes)
    for _ in range(19):
        finish(9, 1)
        engine.evaluate(clock.now)
        clock.now += 10
    assert {r for r in firing(engine) if r[0] == "HighErrorRate"} == {("HighErrorRate", "warning")}
    # then half of the requests fail: critical as well, after its own 2 minutes
    for _ in range(31):
        finish(5, 5)
        engine.evaluate(clock.now)
        clock.now += 10
    assert {r for r in firing(engine) if r[0] == "HighErrorRate"} == {
        ("HighErrorRate", "warning"),
        ("HighErrorRate", "critical"),
    }
    (critical,) = [
        a for a in engine.alerts() if a.severity == "critical" and a.rule == "HighErrorRate"
    ]
    assert 0.2 < critical.value <= 0.5
    assert critical.annotations["summary"].endswith("% of requests fail on the coordinator")
