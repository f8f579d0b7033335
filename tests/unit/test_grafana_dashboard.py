"""The Grafana dashboard in grafana/: valid JSON, every query parses as PromQL and reads only
metric families /metrics exports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import promql_parser

from tests.support.alerting import exported_series_names

DASHBOARD = Path(__file__).resolve().parents[2] / "grafana" / "mlx-relay.json"


def selector_names(node: Any) -> set[str]:
    names: set[str] = set()
    if isinstance(node, promql_parser.VectorSelector):
        names.add(node.name)
    elif isinstance(node, promql_parser.MatrixSelector):
        names.add(node.vector_selector.name)
    elif isinstance(node, promql_parser.BinaryExpr):
        names |= selector_names(node.lhs) | selector_names(node.rhs)
    elif isinstance(
        node, promql_parser.ParenExpr | promql_parser.UnaryExpr | promql_parser.AggregateExpr
    ):
        names |= selector_names(node.expr)
    elif isinstance(node, promql_parser.Call):
        for argument in node.args:
            names |= selector_names(argument)
    return names


def test_every_panel_query_parses_and_reads_exported_families() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "mlx-relay" and dashboard["panels"]
    exported = exported_series_names()
    assert "mlxrelay_time_to_first_token_seconds_bucket" in exported
    assert "mlxrelay_alerts" in exported
    seen: set[str] = set()
    for panel in dashboard["panels"]:
        assert panel["title"] and panel["targets"], panel
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            names = selector_names(promql_parser.parse(target["expr"]))
            assert names, target["expr"]
            unknown = names - exported
            assert not unknown, f"{panel['title']}: {sorted(unknown)} are not exported"
            seen |= names
    # The dashboard covers inference, stages, devices, links and alerts.
    for family in (
        "mlxrelay_generation_tokens_total",
        "mlxrelay_stage_busy_seconds_total",
        "mlxrelay_device_memory_used_bytes",
        "mlxrelay_network_rtt_seconds_bucket",
        "mlxrelay_alerts",
    ):
        assert family in seen
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
