"""``mlx-relay placement`` from the config and the model alone (no coordinator listening)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mlx_relay.cli import main
from tests.support.cluster import cluster_dict, free_ports


def write_config(tmp_path: Path, model_dir: Path, layers: list[tuple[int, int]]) -> Path:
    data = cluster_dict(model_dir, 2, layers=layers, http={"port": free_ports(1)[0]})
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_skewed_split_is_rebalanced_in_layer_units(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, tiny_model_dir, [(0, 3), (3, 4)])
    assert main(["placement", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "config and model alone" in out
    assert "worker-0     layers [0, 3)" in out
    proposed = out.split("proposed:")[1]
    assert "worker-0     layers [0, 2)" in proposed
    assert "worker-1     layers [2, 4)" in proposed
    assert "predicted gain: +" in out


def test_what_ifs(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, tiny_model_dir, [(0, 2), (2, 4)])
    assert main(["placement", "--config", str(config), "--without", "worker-1"]) == 0
    out = capsys.readouterr().out
    assert "worker-0     layers [0, 4)" in out.split("proposed:")[1]
    argv = ["placement", "--config", str(config), "--add-device", "1"]
    assert main(argv) == 0
    assert "new-1" in capsys.readouterr().out
    assert main(["placement", "--config", str(config), "--without", "worker-7"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "mlx-relay placement: error: no device worker-7 (devices: worker-0, worker-1)"
    )


def test_metrics_family_is_empty_while_the_model_cannot_be_read(tmp_path: Path) -> None:
    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry

    from mlx_relay.core.config import ClusterConfig
    from mlx_relay.server.placement import PlacementCollector, PlacementSource

    data = cluster_dict(tmp_path / "missing-model", 2)
    registry = CollectorRegistry()
    PlacementCollector(PlacementSource(ClusterConfig.from_dict(data), lambda: None), registry)
    text = generate_latest(registry).decode()
    assert "# TYPE mlxrelay_placement_predicted_step_seconds gauge" in text
    assert 'mlxrelay_placement_predicted_step_seconds{split="current"}' not in text
