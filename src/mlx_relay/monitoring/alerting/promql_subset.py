"""The PromQL subset the built-in evaluator runs, checked when a rule is loaded.

:func:`compile_expression` parses with the ``promql-parser`` package and refuses, naming it,
any construct outside the subset (see :mod:`mlx_relay.monitoring.alerting.promql`), so an
unsupported rule never reaches evaluation. It also records what the expression reads: the
metric names, and how far back each range selector looks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import promql_parser

ARITHMETIC_OPERATORS = ("+", "-", "*", "/")
COMPARISON_OPERATORS = ("==", "!=", ">", "<", ">=", "<=")
SET_OPERATORS = ("and", "or", "unless")
AGGREGATIONS = ("sum", "avg", "max", "min", "count")
RANGE_FUNCTIONS = ("rate", "increase", "avg_over_time", "max_over_time", "min_over_time")
FUNCTIONS = (*RANGE_FUNCTIONS, "histogram_quantile", "absent", "scalar", "time")


class UnsupportedExpression(ValueError):
    """The expression uses a construct outside the subset; ``construct`` names it."""

    def __init__(self, construct: str) -> None:
        super().__init__(f"unsupported PromQL construct {construct!r}")
        self.construct = construct


class InvalidExpression(ValueError):
    """The expression does not parse, or is not an instant vector."""


@dataclass(frozen=True)
class Expression:
    """A parsed, checked expression; evaluate it with :func:`evaluate`."""

    text: str
    node: Any
    range_names: frozenset[str]
    max_range_seconds: float
    names: frozenset[str] | None = None
    """Every metric name it reads; None when a selector has no name (it reads them all)."""


def compile_expression(text: str) -> Expression:
    """Parse ``text`` and check every construct against the subset.

    Raises:
        InvalidExpression: It does not parse.
        UnsupportedExpression: It parses, but uses something the evaluator does not do.
    """
    try:
        node = promql_parser.parse(text)
    except ValueError as exc:
        raise InvalidExpression(f"invalid PromQL: {exc}") from None
    reads = _Reads()
    _check(node, reads)
    if isinstance(node, promql_parser.StringLiteral):
        raise InvalidExpression("a rule's expression must be a vector or a number")
    return Expression(
        text,
        node,
        frozenset(reads.ranges),
        max(reads.ranges.values(), default=0.0),
        None if reads.every_name else frozenset(reads.names),
    )


@dataclass
class _Reads:
    """What an expression reads: metric names, and the longest range of each."""

    ranges: dict[str, float] = field(default_factory=dict)
    names: set[str] = field(default_factory=set)
    every_name: bool = False


def _check(node: Any, reads: _Reads) -> None:
    if isinstance(node, promql_parser.VectorSelector):
        _check_selector(node, reads)
    elif isinstance(node, promql_parser.MatrixSelector):
        raise UnsupportedExpression("range selector outside a range function")
    elif isinstance(node, promql_parser.NumberLiteral | promql_parser.StringLiteral):
        return
    elif isinstance(node, promql_parser.ParenExpr | promql_parser.UnaryExpr):
        _check(node.expr, reads)
    elif isinstance(node, promql_parser.BinaryExpr):
        op = str(node.op)
        if op not in (*ARITHMETIC_OPERATORS, *COMPARISON_OPERATORS, *SET_OPERATORS):
            raise UnsupportedExpression(op)
        card = node.modifier.card if node.modifier is not None else None
        if card in (
            promql_parser.VectorMatchCardinality.ManyToOne,
            promql_parser.VectorMatchCardinality.OneToMany,
        ):
            raise UnsupportedExpression("group_left/group_right")
        _check(node.lhs, reads)
        _check(node.rhs, reads)
    elif isinstance(node, promql_parser.AggregateExpr):
        if str(node.op) not in AGGREGATIONS:
            raise UnsupportedExpression(str(node.op))
        _check(node.expr, reads)
    elif isinstance(node, promql_parser.Call):
        _check_call(node, reads)
    elif isinstance(node, promql_parser.SubqueryExpr):
        raise UnsupportedExpression("subquery")
    else:
        raise UnsupportedExpression(type(node).__name__)


def _check_selector(node: Any, reads: _Reads) -> None:
    if node.name is None:
        reads.every_name = True
    else:
        reads.names.add(node.name)
    if node.offset is not None:
        raise UnsupportedExpression("offset")
    if node.at is not None:
        raise UnsupportedExpression("@")
    if node.matchers.or_matchers:
        raise UnsupportedExpression("or in label matchers")


def _check_call(node: Any, reads: _Reads) -> None:
    name = node.func.name
    if name not in FUNCTIONS:
        raise UnsupportedExpression(f"{name}()")
    if name in RANGE_FUNCTIONS:
        (argument,) = node.args
        if not isinstance(argument, promql_parser.MatrixSelector):
            raise UnsupportedExpression(f"{name}() of a subquery")
        selector = argument.vector_selector
        _check_selector(selector, reads)
        if selector.name is None:
            raise UnsupportedExpression("range selector without a metric name")
        seconds = argument.range.total_seconds()
        reads.ranges[selector.name] = max(reads.ranges.get(selector.name, 0.0), seconds)
        return
    for argument in node.args:
        _check(argument, reads)
