"""ClusterConfig: the example file loads, and each kind of mistake gets one exact message."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from mlx_relay.core.config import ClusterConfig
from mlx_relay.core.errors import ConfigError
from mlx_relay.core.types import LayerRange

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "cluster_config.yaml"


def example() -> dict[str, Any]:
    return yaml.safe_load(EXAMPLE.read_text())


def error_for(tmp_path: Path, data: Any) -> str:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        ClusterConfig.from_yaml(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert "\n" not in message
    return message[len(f"{path}: ") :]


def test_example_config_loads() -> None:
    config = ClusterConfig.from_yaml(EXAMPLE)
    assert [w.id for w in config.workers] == ["worker-0", "worker-1"]
    assert config.workers[0].layers == LayerRange(0, 15)
    assert config.workers[1].layers == LayerRange(15, 30)
    assert config.coordinator is not None and config.coordinator.id == "coordinator"
    assert (config.http.host, config.http.port) == ("127.0.0.1", 8080)
    assert config.monitoring.collection_interval == 2.0
    assert config.monitoring.thresholds.memory_critical == 95
    assert config.model.path is None


def test_defaults_fill_optional_sections() -> None:
    config = ClusterConfig.from_dict({"devices": [{"id": "w", "port": 0}]})
    assert config.workers[0].layers is None
    assert config.network.request_timeout == 30.0
    assert config.http.auth_token is None and config.http.rate_limit_per_minute == 600


def test_missing_field(tmp_path: Path) -> None:
    data = example()
    del data["devices"][1]["port"]
    assert error_for(tmp_path, data) == "devices[1].port: required field is missing"


def test_missing_devices(tmp_path: Path) -> None:
    data = example()
    del data["devices"]
    assert error_for(tmp_path, data) == "devices: required field is missing"


def test_wrong_type(tmp_path: Path) -> None:
    data = example()
    data["monitoring"]["collection_interval"] = "fast"
    assert (
        error_for(tmp_path, data) == "monitoring.collection_interval: expected a number, got 'fast'"
    )


def test_wrong_type_for_section(tmp_path: Path) -> None:
    data = example()
    data["network"] = [1, 2]
    assert error_for(tmp_path, data) == "network: expected a mapping, got a list"


def test_unknown_key(tmp_path: Path) -> None:
    data = example()
    data["monitoring"]["colection_interval"] = 1.0
    assert (
        error_for(tmp_path, data)
        == "monitoring.colection_interval: unknown key (check the spelling)"
    )


def test_unknown_top_level_key(tmp_path: Path) -> None:
    data = example()
    data["workers"] = []
    assert error_for(tmp_path, data) == "workers: unknown key (check the spelling)"


def test_overlapping_layers(tmp_path: Path) -> None:
    data = example()
    data["devices"][2]["layers"] = [14, 30]
    assert error_for(tmp_path, data) == (
        "devices[2].layers: [14, 30) overlaps the previous worker's layers, which end at 15"
    )


def test_missing_layers(tmp_path: Path) -> None:
    data = example()
    data["devices"][2]["layers"] = [16, 30]
    assert error_for(tmp_path, data) == (
        "devices[2].layers: layers [15, 16) are assigned to no worker "
        "(workers must cover the model's layers in order)"
    )


def test_first_worker_must_start_at_zero(tmp_path: Path) -> None:
    data = example()
    data["devices"][1]["layers"] = [1, 15]
    assert error_for(tmp_path, data).startswith("devices[1].layers: layers [0, 1) are assigned")


def test_empty_layer_range(tmp_path: Path) -> None:
    data = example()
    data["devices"][1]["layers"] = [5, 5]
    assert error_for(tmp_path, data) == (
        "devices[1].layers: expected [start, end) with 0 <= start < end, got [5, 5]"
    )


def test_bad_layers_value(tmp_path: Path) -> None:
    data = example()
    data["devices"][1]["layers"] = "all"
    assert error_for(tmp_path, data) == (
        "devices[1].layers: expected a [start, end) pair of integers or 'auto', got 'all'"
    )


def test_mixed_explicit_and_auto_layers(tmp_path: Path) -> None:
    data = example()
    data["devices"][2]["layers"] = "auto"
    assert error_for(tmp_path, data) == (
        "devices[2].layers: give every worker explicit layers, or none (use 'auto')"
    )


def test_port_out_of_range(tmp_path: Path) -> None:
    data = example()
    data["devices"][1]["port"] = 70000
    assert error_for(tmp_path, data) == "devices[1].port: expected a value <= 65535, got 70000"


def test_port_not_an_integer(tmp_path: Path) -> None:
    data = example()
    data["devices"][1]["port"] = "http"
    assert error_for(tmp_path, data) == "devices[1].port: expected an integer, got 'http'"


def test_duplicate_address(tmp_path: Path) -> None:
    data = example()
    data["devices"][2]["port"] = data["devices"][1]["port"]
    assert error_for(tmp_path, data) == (
        "devices[2].port: 127.0.0.1:50151 is used by another device"
    )


def test_duplicate_id(tmp_path: Path) -> None:
    data = example()
    data["devices"][2]["id"] = "worker-0"
    assert error_for(tmp_path, data) == "devices[2].id: duplicate device id 'worker-0'"


def test_bad_role(tmp_path: Path) -> None:
    data = example()
    data["devices"][1]["role"] = "leader"
    assert error_for(tmp_path, data) == (
        "devices[1].role: expected one of 'coordinator' or 'worker', got 'leader'"
    )


def test_no_workers(tmp_path: Path) -> None:
    data = example()
    data["devices"] = data["devices"][:1]
    assert error_for(tmp_path, data) == "devices: expected at least one device with role 'worker'"


def test_thresholds_ordered(tmp_path: Path) -> None:
    data = example()
    data["monitoring"]["thresholds"]["cpu_warning"] = 99
    assert error_for(tmp_path, data) == (
        "monitoring.thresholds: cpu_warning must not exceed cpu_critical"
    )


def test_file_not_found(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        ClusterConfig.from_yaml(path)
    assert str(info.value) == f"{path}: configuration file not found"


def test_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("devices:\n  - id: w\n    port: [1, 2\n")
    with pytest.raises(ConfigError) as info:
        ClusterConfig.from_yaml(path)
    assert str(info.value).startswith(f"{path}: invalid YAML at line ")


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    assert error_for(tmp_path, ["a", "b"]) == "expected a mapping at the top level, got a list"


def test_with_worker_ports_replaces_only_named_workers() -> None:
    config = ClusterConfig.from_yaml(EXAMPLE).with_worker_ports({"worker-1": 6000})
    assert [w.port for w in config.workers] == [50151, 6000]


@pytest.mark.parametrize(
    ("key", "value", "moved_to"),
    [
        ("auth_token", "s3cret", "http.auth_token"),
        ("port", 9000, "http.port"),
        ("cors_origins", ["http://a.test"], "http.cors_origins"),
    ],
)
def test_an_old_dashboard_key_says_where_it_moved(
    tmp_path: Path, key: str, value: Any, moved_to: str
) -> None:
    data = example()
    data["monitoring"]["dashboard"] = {key: value}
    assert error_for(tmp_path, data) == f"monitoring.dashboard.{key}: moved to {moved_to}"


def test_an_empty_old_dashboard_section_says_where_it_moved(tmp_path: Path) -> None:
    data = example()
    data["monitoring"]["dashboard"] = None
    assert error_for(tmp_path, data) == "monitoring.dashboard: moved to http"


@pytest.mark.parametrize("key", ["host", "port"])
def test_a_coordinator_address_says_it_moved_to_http(tmp_path: Path, key: str) -> None:
    data = example()
    data["devices"][0][key] = "0.0.0.0" if key == "host" else 8080
    assert error_for(tmp_path, data) == (
        f"devices[0].{key}: the coordinator's HTTP address moved to http.{key}"
    )


def test_http_section_is_validated_like_every_other(tmp_path: Path) -> None:
    data = example()
    data["http"]["rate_limit_per_minute"] = 0
    assert error_for(tmp_path, data) == ("http.rate_limit_per_minute: expected a value >= 1, got 0")
    data = example()
    data["http"]["token"] = "x"
    assert error_for(tmp_path, data) == "http.token: unknown key (check the spelling)"


def test_batching_settings_are_checked(tmp_path: Path) -> None:
    data = example()
    data["inference"]["max_batch_size"] = 0
    assert error_for(tmp_path, data) == "inference.max_batch_size: expected a value >= 1, got 0"
    data = example()
    data["inference"]["prefill_chunk_tokens"] = -1
    assert error_for(tmp_path, data) == (
        "inference.prefill_chunk_tokens: expected a value >= 1, got -1"
    )
    data = example()
    data["inference"]["micro_batches"] = 0
    assert error_for(tmp_path, data) == "inference.micro_batches: expected a value >= 1, got 0"
    assert ClusterConfig.model_validate(example()).inference.max_batch_size == 16


def test_to_dict_reads_back_as_the_same_configuration() -> None:
    config = ClusterConfig.from_yaml(EXAMPLE).with_worker_ports({"worker-0": 6000})
    again = ClusterConfig.from_dict(yaml.safe_load(yaml.safe_dump(config.to_dict())))
    assert again == config


def test_compute_setting_defaults_to_auto_and_is_checked(tmp_path: Path) -> None:
    config = ClusterConfig.from_yaml(EXAMPLE)
    assert config.model.compute == "auto"
    assert config.model.dense_memory_share == 0.5
    assert config.model.blas_threads is None
    data = example()
    data["model"]["compute"] = "fast"
    assert error_for(tmp_path, data) == (
        "model.compute: expected one of 'auto', 'quantized' or 'float32', got 'fast'"
    )
    data["model"]["compute"] = "float32"
    data["model"]["dense_memory_share"] = 1.5
    assert error_for(tmp_path, data) == (
        "model.dense_memory_share: expected a value <= 1.0, got 1.5"
    )
    data["model"]["dense_memory_share"] = 0.25
    data["model"]["blas_threads"] = 0
    assert error_for(tmp_path, data) == "model.blas_threads: expected a value >= 1, got 0"
    data["model"]["blas_threads"] = 2
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(data))
    model = ClusterConfig.from_yaml(path).model
    assert (model.compute, model.dense_memory_share, model.blas_threads) == ("float32", 0.25, 2)


def test_history_defaults() -> None:
    history = ClusterConfig.from_yaml(EXAMPLE).history
    assert history.enabled and history.path is None
    assert [(t.interval, t.retention) for t in history.tiers] == [
        (None, 86400.0),
        (60.0, 30 * 86400.0),
        (3600.0, 365 * 86400.0),
    ]


@pytest.mark.parametrize(
    ("history", "expected"),
    [
        ({"max_bytes": 5}, "history.max_bytes: expected a value >= 1048576, got 5"),
        ({"enabled": "maybe"}, "history.enabled: expected true or false, got 'maybe'"),
        ({"flush_interval": 0}, "history.flush_interval: expected a value > 0.0, got 0"),
        ({"tier": []}, "history.tier: unknown key (check the spelling)"),
        (
            {"tiers": [{"retention": 10}, {"retention": 20}]},
            "history.tiers[1].interval: required field is missing",
        ),
        (
            {
                "tiers": [
                    {"retention": 1},
                    {"interval": 60, "retention": 2},
                    {"interval": 90, "retention": 3},
                ]
            },
            "history.tiers[2].interval: expected a whole multiple (>= 2) of 60, got 90",
        ),
        (
            {"tiers": [{"retention": -1}]},
            "history.tiers[0].retention: expected a value > 0.0, got -1",
        ),
    ],
)
def test_bad_history_values(tmp_path: Path, history: dict[str, Any], expected: str) -> None:
    data = example()
    data["history"] = history
    assert error_for(tmp_path, data) == expected
