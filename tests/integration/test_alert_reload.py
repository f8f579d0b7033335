"""Reloading the alerting rules from the configuration file, by call and by a real SIGHUP:
a kept rule keeps its firing alert, new thresholds apply, a bad file changes nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest
import yaml

from mlx_relay.cli.alert_reload import reload_alert_rules, reload_on_hangup
from mlx_relay.core.config import AlertingConfig, InferenceConfig
from mlx_relay.monitoring.alerting import AlertEngine, configured_rules
from mlx_relay.monitoring.alerting.samples import Instant, label_set

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGHUP is POSIX")


def memory(used: float) -> Instant:
    device = {"device": "worker-0"}
    return {
        "mlxrelay_device_memory_used_bytes": {
            label_set({"__name__": "mlxrelay_device_memory_used_bytes", **device}): used
        },
        "mlxrelay_device_memory_total_bytes": {
            label_set({"__name__": "mlxrelay_device_memory_total_bytes", **device}): 100.0
        },
    }


def write_config(path: Path, fire: float, clear: float) -> None:
    data = {
        "devices": [{"id": "worker-0", "port": 50151}],
        "alerting": {"thresholds": {"memory_fire_ratio": fire, "memory_clear_ratio": clear}},
    }
    path.write_text(yaml.safe_dump(data))


def firing_memory_engine(used: list[float]) -> AlertEngine:
    engine = AlertEngine(
        configured_rules(AlertingConfig(), InferenceConfig()),
        lambda wanted: memory(used[0]),
        config=AlertingConfig(),
    )
    engine.evaluate(0.0)
    engine.evaluate(60.0)  # the stock rule's for: 1m
    (alert,) = [a for a in engine.alerts() if a.rule == "DeviceMemoryPressure"]
    assert alert.state == "firing"
    return engine


async def test_sighup_reloads_thresholds_and_keeps_the_firing_alert(tmp_path: Path) -> None:
    used = [90.0]
    engine = firing_memory_engine(used)
    config_file = tmp_path / "cluster.yaml"
    write_config(config_file, fire=0.95, clear=0.8)
    with reload_on_hangup(lambda: engine, config_file):
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(100):
            await asyncio.sleep(0.01)
            memory_rule = next(r for r in engine.rules if r.name == "DeviceMemoryPressure")
            if "> 0.95" in memory_rule.expr:
                break
    assert "> 0.95" in memory_rule.expr and "> 0.8" in memory_rule.expr
    # 90 % is below the new fire mark but above the new clear mark: hysteresis keeps it firing,
    # with its original start, since the reload kept its state.
    assert [t for t in engine.evaluate(70.0) if t.alert.rule == "DeviceMemoryPressure"] == []
    (alert,) = [a for a in engine.alerts() if a.rule == "DeviceMemoryPressure"]
    assert alert.state == "firing" and alert.active_at == 0.0
    used[0] = 79.0  # below the new clear mark
    engine.evaluate(80.0)
    assert alert.state == "inactive" and alert.resolved_at == 80.0


def test_an_invalid_file_keeps_the_current_rules(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = firing_memory_engine([90.0])
    before = [r.expr for r in engine.rules]
    config_file = tmp_path / "cluster.yaml"
    write_config(config_file, fire=0.7, clear=0.8)  # clear above fire: invalid
    assert reload_alert_rules(engine, config_file) is False
    assert [r.expr for r in engine.rules] == before
    assert "memory_clear_ratio must not exceed memory_fire_ratio" in caplog.text
