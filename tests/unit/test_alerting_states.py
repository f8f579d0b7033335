"""Alert states on a fake clock: for, keep_firing_for, hysteresis, resolution, label sets,
annotation templates, reloads, and the rule file (stock rules, placeholders, errors)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mlx_relay.core.config import AlertingConfig, InferenceConfig
from mlx_relay.core.errors import ConfigError
from mlx_relay.monitoring.alerting.engine import AlertEngine
from mlx_relay.monitoring.alerting.exposition import alert_families
from mlx_relay.monitoring.alerting.rules import (
    configured_rules,
    parse_rules,
    prometheus_rule_file,
    threshold_variables,
)
from mlx_relay.monitoring.alerting.samples import Instant, label_set
from mlx_relay.monitoring.alerting.state import AlertState
from mlx_relay.monitoring.alerting.templates import expand


class Gauges:
    """A settable sample source: ``values[device]`` is the ``usage`` gauge of that device."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def __call__(self, wanted: frozenset[str] | None) -> Instant:
        return {
            "usage": {
                label_set({"__name__": "usage", "device": d}): v for d, v in self.values.items()
            }
        }


def rules_text(body: str) -> str:
    return "groups:\n  - name: test\n    rules:\n" + "\n".join(
        "      " + line for line in body.strip("\n").splitlines()
    )


def engine_for(body: str, source: Gauges, **config: object) -> AlertEngine:
    rules = parse_rules(rules_text(body), {}, source="test.yaml")
    settings = AlertingConfig.model_validate({"evaluation_interval": 10, **config})
    return AlertEngine(rules, source, config=settings, clock=lambda: 0.0)


HIGH = """
- alert: UsageHigh
  expr: usage > 80
  for: 30s
  labels: {severity: warning}
  annotations:
    summary: "usage on {{ $labels.device }} is {{ $value }}"
"""


def states(engine: AlertEngine) -> dict[str, str]:
    return {a.labels.get("device", ""): a.state.value for a in engine.alerts()}


def test_pending_then_firing_after_for_then_resolved() -> None:
    source = Gauges()
    engine = engine_for(HIGH, source)
    source.values = {"w0": 90.0}
    transitions = engine.evaluate(0.0)
    assert [(t.from_state, t.to_state) for t in transitions] == [
        (AlertState.INACTIVE, AlertState.PENDING)
    ]
    engine.evaluate(20.0)
    assert states(engine) == {"w0": "pending"}  # 20 s < for 30 s
    transitions = engine.evaluate(30.0)
    assert [(t.from_state, t.to_state) for t in transitions] == [
        (AlertState.PENDING, AlertState.FIRING)
    ]
    (alert,) = engine.alerts()
    assert alert.fired_at == 30.0 and alert.active_at == 0.0
    assert alert.labels == {"alertname": "UsageHigh", "device": "w0", "severity": "warning"}
    source.values = {"w0": 10.0}
    transitions = engine.evaluate(40.0)
    assert [(t.from_state, t.to_state) for t in transitions] == [
        (AlertState.FIRING, AlertState.INACTIVE)
    ]
    view = engine.view()
    assert view.firing == [] and view.pending == []
    assert [(a.alertname, a.resolved_at) for a in view.resolved] == [("UsageHigh", 40.0)]


def test_a_pending_alert_that_clears_is_dropped_without_firing() -> None:
    source = Gauges()
    engine = engine_for(HIGH, source)
    source.values = {"w0": 90.0}
    engine.evaluate(0.0)
    source.values = {"w0": 50.0}
    engine.evaluate(10.0)
    source.values = {"w0": 90.0}
    engine.evaluate(20.0)
    engine.evaluate(40.0)
    # active_at restarted at 20: 40 - 20 < 30, still pending
    assert states(engine) == {"w0": "pending"}
    assert engine.view().resolved == []


def test_for_zero_fires_at_the_first_evaluation() -> None:
    source = Gauges()
    engine = engine_for("- alert: Now\n  expr: usage > 0", source)
    source.values = {"w0": 1.0}
    transitions = engine.evaluate(5.0)
    assert [t.to_state for t in transitions] == [AlertState.PENDING, AlertState.FIRING]


def test_keep_firing_for_holds_a_firing_alert_after_its_condition_clears() -> None:
    source = Gauges()
    engine = engine_for("- alert: Flappy\n  expr: usage > 80\n  keep_firing_for: 25s", source)
    source.values = {"w0": 90.0}
    engine.evaluate(0.0)
    assert states(engine) == {"w0": "firing"}
    source.values = {"w0": 10.0}
    engine.evaluate(10.0)  # missing since 10
    engine.evaluate(30.0)  # 20 s < 25 s
    assert states(engine) == {"w0": "firing"}
    source.values = {"w0": 95.0}  # back: the keep-firing clock restarts
    engine.evaluate(32.0)
    source.values = {"w0": 10.0}
    engine.evaluate(40.0)
    engine.evaluate(60.0)
    assert states(engine) == {"w0": "firing"}  # missing since 40, 20 s
    engine.evaluate(65.0)
    assert states(engine) == {"w0": "inactive"}
    (alert,) = engine.alerts()
    assert alert.resolved_at == 65.0


def test_one_instance_per_label_set() -> None:
    source = Gauges()
    engine = engine_for(HIGH, source)
    source.values = {"w0": 90.0, "w1": 85.0, "w2": 10.0}
    engine.evaluate(0.0)
    source.values = {"w0": 90.0, "w1": 85.0, "w2": 99.0}
    engine.evaluate(20.0)
    engine.evaluate(30.0)
    assert states(engine) == {"w0": "firing", "w1": "firing", "w2": "pending"}
    summaries = sorted(a.annotations["summary"] for a in engine.alerts())
    assert summaries == ["usage on w0 is 90", "usage on w1 is 85", "usage on w2 is 99"]
    families = {f.name: f for f in alert_families(engine)}
    counts = {
        (s.labels["alertname"], s.labels["state"]): s.value
        for s in families["mlxrelay_alerts"].samples
    }
    assert counts == {("UsageHigh", "firing"): 2, ("UsageHigh", "pending"): 1}


HYSTERESIS = """
- alert: MemoryPressure
  expr: usage > 85 or (usage > 75 and on (device) ALERTS{alertname="MemoryPressure"})
"""


def test_hysteresis_with_the_alerts_series_fires_high_and_clears_low() -> None:
    source = Gauges()
    engine = engine_for(HYSTERESIS, source)
    source.values = {"w0": 80.0, "w1": 80.0}
    engine.evaluate(0.0)
    assert states(engine) == {}  # 80 is below the fire mark
    source.values = {"w0": 86.0, "w1": 80.0}
    engine.evaluate(10.0)
    assert states(engine) == {"w0": "firing"}
    source.values = {"w0": 78.0, "w1": 80.0}  # between the marks: w0 stays, w1 never fired
    engine.evaluate(20.0)
    assert states(engine) == {"w0": "firing"}
    source.values = {"w0": 74.0, "w1": 80.0}  # below the clear mark
    engine.evaluate(30.0)
    assert states(engine) == {"w0": "inactive"}
    source.values = {"w0": 80.0, "w1": 80.0}
    engine.evaluate(40.0)
    assert states(engine) == {"w0": "inactive"}


def test_state_survives_a_reload_of_the_same_rule() -> None:
    source = Gauges()
    engine = engine_for(HIGH, source)
    source.values = {"w0": 90.0}
    engine.evaluate(0.0)
    engine.evaluate(30.0)
    assert states(engine) == {"w0": "firing"}
    reloaded = HIGH.replace("usage > 80", "usage > 70") + "- alert: Other\n  expr: usage > 1000\n"
    engine.reload(parse_rules(rules_text(reloaded), {}, source="test.yaml"))
    (alert,) = engine.alerts()
    assert alert.state == AlertState.FIRING and alert.active_at == 0.0
    assert engine.evaluate(40.0) == []  # no new pending, no new firing
    assert {r.name for r in engine.rules} == {"UsageHigh", "Other"}


def test_annotation_templates() -> None:
    labels = {"device": "w1", "stage": "1"}
    assert expand("{{ $labels.device }}/{{$labels.stage}}", labels, 1) == "w1/1"
    assert expand("{{ $labels.missing }}x", labels, 1) == "x"
    assert expand("{{ $value }}", labels, 0.25) == "0.25"
    assert expand("{{ $value }}", labels, 3.0) == "3"
    assert expand("{{ $value | humanizePercentage }}", labels, 0.873) == "87.3%"
    assert expand("{{ $value | humanize }}", labels, 1234567.0) == "1.235M"
    assert expand("{{ $value | humanizeDuration }}", labels, 0.25) == "250ms"
    assert expand("{{ $value | humanizeDuration }}", labels, 3725.0) == "1h 2m 5s"
    assert expand('{{ printf "%.2f" $value }}', labels, 2.0 / 3) == "0.67"


def test_rule_file_errors_name_the_rule_and_the_construct(tmp_path: Path) -> None:
    bad = rules_text("- alert: Top\n  expr: topk(2, usage)")
    with pytest.raises(ConfigError) as excinfo:
        parse_rules(bad, {}, source="r.yaml")
    assert str(excinfo.value) == (
        "r.yaml: groups[0].rules[0] (Top).expr: unsupported PromQL construct 'topk'"
    )
    with pytest.raises(ConfigError, match=r"\(T\)\.annotations\.summary: unsupported template"):
        parse_rules(
            rules_text("- alert: T\n  expr: usage\n  annotations: {summary: '{{ range . }}'}"),
            {},
            source="r.yaml",
        )
    with pytest.raises(ConfigError, match=r"\(T\)\.expr: unknown placeholder \$\{nope\}"):
        parse_rules(rules_text("- alert: T\n  expr: usage > ${nope}"), {}, source="r.yaml")
    with pytest.raises(ConfigError, match=r"\(T\)\.for: expected a duration"):
        parse_rules(rules_text("- alert: T\n  expr: usage\n  for: soon"), {}, source="r.yaml")
    with pytest.raises(ConfigError, match="recording rules are not supported"):
        parse_rules(rules_text("- record: x\n  expr: usage"), {}, source="r.yaml")
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match=r"missing\.yaml: cannot read the rules file"):
        configured_rules(AlertingConfig(rules_file=str(missing)), InferenceConfig())


def test_stock_rules_take_their_thresholds_from_the_config() -> None:
    alerting = AlertingConfig.model_validate(
        {"thresholds": {"memory_fire_ratio": 0.9, "memory_clear_ratio": 0.8, "stall_seconds": 45}}
    )
    rules = configured_rules(alerting, InferenceConfig(max_sessions=10))
    by_name = {(r.name, r.labels["severity"]): r for r in rules}
    memory = by_name[("DeviceMemoryPressure", "warning")]
    assert "> 0.9" in memory.expr and "> 0.8" in memory.expr
    assert "[45s]" in by_name[("GenerationStalled", "critical")].expr
    assert "0.9 * 10" in by_name[("KVSessionsNearLimit", "warning")].expr
    assert by_name[("StageDown", "critical")].for_seconds == 10.0
    assert {("HighErrorRate", "warning"), ("HighErrorRate", "critical")} <= set(by_name)
    for rule in rules:
        for text in rule.annotations.values():
            assert "${" not in text
    # Every device- or stage-level rule names the device in its summary.
    for name in ("StageDown", "StageBottleneck", "DeviceMemoryPressure", "KVSessionsNearLimit"):
        summary = next(r for r in rules if r.name == name).annotations["summary"]
        assert "{{ $labels.device }}" in summary
    written = prometheus_rule_file(rules)
    assert yaml.safe_load(yaml.safe_dump(written)) == written
    assert written["groups"][0]["rules"][0]["for"] == "10s"


def test_zero_durations_are_accepted() -> None:
    text = rules_text("- alert: T\n  expr: usage\n  for: 0s\n  keep_firing_for: 0")
    (rule,) = parse_rules(text, {}, source="r.yaml")
    assert rule.for_seconds == 0.0 and rule.keep_firing_for_seconds == 0.0
    (stock,) = [
        r
        for r in configured_rules(
            AlertingConfig.model_validate({"thresholds": {"stage_down_seconds": 0}}),
            InferenceConfig(),
        )
        if r.name == "StageDown"
    ]
    assert stock.for_seconds == 0.0
    assert "for" not in prometheus_rule_file([stock])["groups"][0]["rules"][0]


def test_threshold_variables_give_durations() -> None:
    variables = threshold_variables(AlertingConfig(), InferenceConfig())
    assert variables["stall_duration"] == "30s"
    assert variables["max_sessions"] == "64"
    assert variables["error_rate_warning"] == "0.05"
