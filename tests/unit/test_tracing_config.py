"""The ``tracing:`` section and ``--otlp-endpoint``: one-line errors naming the field."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from mlx_relay.cli.options import with_tracing
from mlx_relay.core.config import ClusterConfig
from mlx_relay.core.errors import ConfigError

BASE = {"model": {"path": "m"}, "devices": [{"id": "w0", "port": 1}]}


def test_defaults_keep_traces_and_export_nothing() -> None:
    tracing = ClusterConfig.from_dict(BASE).tracing
    assert tracing.enabled and tracing.max_traces == 200 and tracing.otlp_endpoint is None


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        ({"otlp_endpoint": "localhost:4318"}, "tracing.otlp_endpoint: expected an http://"),
        ({"max_traces": 0}, "tracing.max_traces"),
        ({"sample": 1}, "tracing.sample"),
    ],
)
def test_a_bad_tracing_field_is_named(
    tmp_path: Path, section: dict[str, object], problem: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        ClusterConfig.from_dict({**BASE, "tracing": section}, str(tmp_path / "cluster.yaml"))
    message = str(raised.value)
    assert "\n" not in message and "cluster.yaml" in message and problem in message


def test_otlp_endpoint_option_overrides_the_config() -> None:
    config = ClusterConfig.from_dict({**BASE, "tracing": {"max_traces": 5}})
    url = "http://127.0.0.1:4318/v1/traces"
    tracing = with_tracing(config, argparse.Namespace(otlp_endpoint=url)).tracing
    assert tracing.otlp_endpoint == url and tracing.max_traces == 5
    assert with_tracing(config, argparse.Namespace(otlp_endpoint=None)) is config
    with pytest.raises(ConfigError, match="--otlp-endpoint: expected an http"):
        with_tracing(config, argparse.Namespace(otlp_endpoint="4318"))
