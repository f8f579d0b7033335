"""Alerting rules as data: a Prometheus rule file, loaded and checked for the built-in evaluator.

The file format is Prometheus's (``groups[].rules[]`` with ``alert``, ``expr``, ``for``,
``keep_firing_for``, ``labels``, ``annotations``), so the same file serves a user's Prometheus.
``${name}`` placeholders (in ``expr``, ``for``, ``keep_firing_for`` and annotations) are filled
from the alerting thresholds before anything else, which is how the stock rules take their
thresholds from the configuration; :func:`prometheus_rule_file` writes the filled-in rules.
Hysteresis is written in PromQL itself, with the rule's own ``ALERTS`` series: fire above the
high mark, or stay above the low mark while already active (see the stock rules).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import promql_parser
import yaml

from mlx_relay.core.config import AlertingConfig, InferenceConfig
from mlx_relay.core.errors import ConfigError
from mlx_relay.monitoring.alerting.promql import (
    Expression,
    InvalidExpression,
    UnsupportedExpression,
    compile_expression,
)
from mlx_relay.monitoring.alerting.templates import TemplateError, check_template

STOCK_RULES = "stock_rules.yaml"
PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
RULE_KEYS = {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
ZERO_DURATION = re.compile(r"^0+(?:ms|s|m|h|d|w|y)?$")
LABEL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class AlertRule:
    """One alerting rule with its placeholders filled in and its expression checked."""

    name: str
    expr: str
    expression: Expression
    for_seconds: float = 0.0
    keep_firing_for_seconds: float = 0.0
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    group: str = "mlx-relay"

    @property
    def key(self) -> tuple[str, tuple[tuple[str, str], ...]]:
        """What identifies the rule across reloads: its name and its own labels."""
        return self.name, tuple(sorted(self.labels.items()))


def stock_rules_text() -> str:
    """The stock rule file shipped with mlx-relay, placeholders unfilled."""
    return resources.files(__package__).joinpath(STOCK_RULES).read_text(encoding="utf-8")


def load_rules_file(path: str | Path, variables: Mapping[str, str]) -> list[AlertRule]:
    """Load a rule file; raises :class:`ConfigError` naming the file, rule and problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the rules file: {exc.strerror}") from None
    return parse_rules(text, variables, source=str(path))


def parse_rules(text: str, variables: Mapping[str, str], source: str) -> list[AlertRule]:
    """The alerting rules of a Prometheus rule file's text (recording rules are refused)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("groups"), list):
        raise ConfigError(f"{source}: expected a mapping with a 'groups' list")
    rules: list[AlertRule] = []
    for g, group in enumerate(data["groups"]):
        if not isinstance(group, dict) or not isinstance(group.get("rules"), list):
            raise ConfigError(f"{source}: groups[{g}]: expected a mapping with a 'rules' list")
        name = str(group.get("name", f"group-{g}"))
        for r, raw in enumerate(group["rules"]):
            where = f"{source}: groups[{g}].rules[{r}]"
            rules.append(_parse_rule(raw, variables, where, name))
    return rules


def _parse_rule(raw: Any, variables: Mapping[str, str], where: str, group: str) -> AlertRule:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping")
    if "record" in raw:
        raise ConfigError(f"{where}: recording rules are not supported, only 'alert' rules")
    unknown = sorted(set(raw) - RULE_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (check the spelling)")
    name = raw.get("alert")
    if not isinstance(name, str) or not LABEL_NAME.match(name):
        raise ConfigError(f"{where}.alert: expected an alert name, got {name!r}")
    where = f"{where} ({name})"
    expr = _fill(str(raw.get("expr", "")), variables, f"{where}.expr")
    try:
        expression = compile_expression(expr)
    except (UnsupportedExpression, InvalidExpression) as exc:
        raise ConfigError(f"{where}.expr: {exc}") from None
    labels = _string_map(raw.get("labels"), f"{where}.labels", variables)
    annotations = _string_map(raw.get("annotations"), f"{where}.annotations", variables)
    for key, text in annotations.items():
        try:
            check_template(text)
        except TemplateError as exc:
            raise ConfigError(f"{where}.annotations.{key}: {exc}") from None
    return AlertRule(
        name=name,
        expr=expr,
        expression=expression,
        for_seconds=_duration(raw.get("for"), variables, f"{where}.for"),
        keep_firing_for_seconds=_duration(
            raw.get("keep_firing_for"), variables, f"{where}.keep_firing_for"
        ),
        labels=labels,
        annotations=annotations,
        group=group,
    )


def _fill(text: str, variables: Mapping[str, str], where: str) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in variables:
            known = ", ".join(sorted(variables))
            raise ConfigError(f"{where}: unknown placeholder ${{{name}}} (known: {known})")
        return variables[name]

    return PLACEHOLDER.sub(replace, text)


def _string_map(value: Any, where: str, variables: Mapping[str, str]) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping of names to strings")
    out: dict[str, str] = {}
    for key, text in value.items():
        if not isinstance(key, str) or not LABEL_NAME.match(key):
            raise ConfigError(f"{where}: invalid name {key!r}")
        if not isinstance(text, str | int | float) or isinstance(text, bool):
            raise ConfigError(f"{where}.{key}: expected a string")
        out[key] = _fill(str(text), variables, f"{where}.{key}")
    return out


def _duration(value: Any, variables: Mapping[str, str], where: str) -> float:
    if value is None:
        return 0.0
    text = _fill(str(value), variables, where)
    if ZERO_DURATION.match(text):
        return 0.0  # Prometheus accepts "0s"; the parser package refuses zero
    try:
        return float(promql_parser.parse_duration(text).total_seconds())
    except (ValueError, TypeError):
        raise ConfigError(f"{where}: expected a duration like 30s or 5m, got {text!r}") from None


def prometheus_duration(seconds: float) -> str:
    """``seconds`` as a Prometheus duration string (``90s``, ``250ms``)."""
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"


def prometheus_rule_file(rules: list[AlertRule]) -> dict[str, Any]:
    """The rules as a Prometheus rule file (placeholders filled), grouped as loaded."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for rule in rules:
        entry: dict[str, Any] = {"alert": rule.name, "expr": rule.expr}
        if rule.for_seconds:
            entry["for"] = prometheus_duration(rule.for_seconds)
        if rule.keep_firing_for_seconds:
            entry["keep_firing_for"] = prometheus_duration(rule.keep_firing_for_seconds)
        if rule.labels:
            entry["labels"] = dict(rule.labels)
        if rule.annotations:
            entry["annotations"] = dict(rule.annotations)
        groups.setdefault(rule.group, []).append(entry)
    return {"groups": [{"name": name, "rules": entries} for name, entries in groups.items()]}


def threshold_variables(alerting: AlertingConfig, inference: InferenceConfig) -> dict[str, str]:
    """The ``${name}`` placeholders: every threshold (a ``*_seconds`` one also as
    ``*_duration``, e.g. ``30s``) and ``max_sessions``."""
    variables = {"max_sessions": str(inference.max_sessions)}
    for name, value in alerting.thresholds.model_dump().items():
        variables[name] = f"{value:g}"
        if name.endswith("_seconds"):
            variables[name.removesuffix("_seconds") + "_duration"] = prometheus_duration(value)
    return variables


def configured_rules(alerting: AlertingConfig, inference: InferenceConfig) -> list[AlertRule]:
    """The rules the configuration asks for: ``rules_file``, or the stock rules.

    Raises:
        ConfigError: The file cannot be read, or a rule is invalid or outside the subset.
    """
    variables = threshold_variables(alerting, inference)
    if alerting.rules_file is not None:
        return load_rules_file(alerting.rules_file, variables)
    return parse_rules(stock_rules_text(), variables, source=f"mlx_relay:{STOCK_RULES}")
