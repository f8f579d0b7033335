"""A PromQL subset evaluated over our own samples, parsed by the ``promql-parser`` package.

The subset is what the stock rules need: instant selectors with label matchers, number
literals, arithmetic, comparisons (with ``bool``), ``and``/``or``/``unless`` with
``on``/``ignoring``, ``sum``/``avg``/``max``/``min``/``count`` with ``by``/``without``, and the
functions in :data:`FUNCTIONS`. :func:`compile_expression` refuses anything else up front,
naming the construct, so an unsupported rule never reaches evaluation.

Semantics follow Prometheus: comparisons without ``bool`` filter and keep ``__name__``,
arithmetic drops it, one-to-one matching keeps the left side's labels (only the ``on``
labels with ``on``), and a range selector covers ``(now - range, now]``.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import promql_parser

from mlx_relay.monitoring.alerting.promql_math import bucket_quantile, extrapolated_rate
from mlx_relay.monitoring.alerting.promql_subset import (
    FUNCTIONS,
    RANGE_FUNCTIONS,
    SET_OPERATORS,
    Expression,
    InvalidExpression,
    UnsupportedExpression,
    compile_expression,
)
from mlx_relay.monitoring.alerting.samples import NAME, LabelSet, Sample, SampleStore

Vector = list[Sample]
Value = Vector | float

ARITHMETIC: dict[str, Callable[[float, float], float]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": lambda a, b: _divide(a, b),
}
COMPARISONS: dict[str, Callable[[float, float], bool]] = {
    "==": operator.eq,
    "!=": operator.ne,
    ">": operator.gt,
    "<": operator.lt,
    ">=": operator.ge,
    "<=": operator.le,
}


def _divide(a: float, b: float) -> float:
    """IEEE division, as Prometheus does it: x/0 is +-Inf, 0/0 is NaN."""
    if b != 0:
        return a / b
    if a == 0 or math.isnan(a):
        return math.nan
    return math.copysign(math.inf, a) * math.copysign(1.0, b)


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)


REDUCERS: dict[str, Callable[[list[float]], float]] = {
    "sum": math.fsum,
    "avg": _mean,
    "max": max,
    "min": min,
    "count": lambda values: float(len(values)),
}

__all__ = [
    "FUNCTIONS",
    "EvalContext",
    "Expression",
    "InvalidExpression",
    "UnsupportedExpression",
    "compile_expression",
    "evaluate",
]


@dataclass(frozen=True)
class EvalContext:
    """What one evaluation reads: the time and the samples."""

    now: float
    store: SampleStore


def evaluate(expression: Expression, context: EvalContext) -> Vector:
    """The expression's instant vector at ``context.now`` (a number becomes one sample)."""
    value = _eval(expression.node, context)
    if isinstance(value, float):
        return [Sample((), value)]
    return value


def _eval(node: Any, ctx: EvalContext) -> Value:
    if isinstance(node, promql_parser.NumberLiteral):
        return float(node.val)
    if isinstance(node, promql_parser.ParenExpr):
        return _eval(node.expr, ctx)
    if isinstance(node, promql_parser.UnaryExpr):
        inner = _eval(node.expr, ctx)
        if isinstance(inner, float):
            return -inner
        return [Sample(_drop_name(s.labels), -s.value) for s in inner]
    if isinstance(node, promql_parser.VectorSelector):
        return _select(node, ctx)
    if isinstance(node, promql_parser.BinaryExpr):
        return _binary(node, _eval(node.lhs, ctx), _eval(node.rhs, ctx))
    if isinstance(node, promql_parser.AggregateExpr):
        return _aggregate(node, _vector(_eval(node.expr, ctx)))
    if isinstance(node, promql_parser.Call):
        return _call(node, ctx)
    raise UnsupportedExpression(type(node).__name__)


def _vector(value: Value) -> Vector:
    if isinstance(value, float):
        raise InvalidExpression("expected an instant vector, got a number")
    return value


def _matcher_test(matcher: Any) -> Callable[[str], bool]:
    op = matcher.op
    expected = matcher.value
    if op == promql_parser.MatchOp.Equal:
        return lambda v: v == expected
    if op == promql_parser.MatchOp.NotEqual:
        return lambda v: v != expected
    pattern = re.compile(expected)
    if op == promql_parser.MatchOp.Re:
        return lambda v: pattern.fullmatch(v) is not None
    return lambda v: pattern.fullmatch(v) is None


def _matches(labels: LabelSet, tests: list[tuple[str, Callable[[str], bool]]]) -> bool:
    found = dict(labels)
    return all(test(found.get(name, "")) for name, test in tests)


def _selector_tests(node: Any) -> list[tuple[str, Callable[[str], bool]]]:
    return [(m.name, _matcher_test(m)) for m in node.matchers.matchers]


def _select(node: Any, ctx: EvalContext) -> Vector:
    tests = _selector_tests(node)
    names = [node.name] if node.name is not None else list(ctx.store.latest)
    return [
        Sample(labels, value)
        for name in names
        for labels, value in ctx.store.latest.get(name, {}).items()
        if _matches(labels, tests)
    ]


def _drop_name(labels: LabelSet) -> LabelSet:
    return tuple(pair for pair in labels if pair[0] != NAME)


def _signature(labels: LabelSet, modifier: Any) -> LabelSet:
    matching = modifier.matching if modifier is not None else None
    if matching is None:
        return _drop_name(labels)
    chosen = set(matching.labels)
    if matching.type == promql_parser.LabelModifierType.Include:
        return tuple(pair for pair in labels if pair[0] in chosen)
    return tuple(pair for pair in labels if pair[0] not in chosen and pair[0] != NAME)


def _binary(node: Any, lhs: Value, rhs: Value) -> Value:
    op = str(node.op)
    modifier = node.modifier
    return_bool = bool(modifier is not None and modifier.return_bool)
    if op in SET_OPERATORS:
        return _set_operation(op, _vector(lhs), _vector(rhs), modifier)
    if isinstance(lhs, float) and isinstance(rhs, float):
        if op in COMPARISONS:
            return float(COMPARISONS[op](lhs, rhs))
        return ARITHMETIC[op](lhs, rhs)
    if isinstance(lhs, float) or isinstance(rhs, float):
        return list(_vector_scalar(op, lhs, rhs, return_bool))
    return list(_vector_vector(op, lhs, rhs, modifier, return_bool))


def _apply(op: str, a: float, b: float, return_bool: bool) -> float | None:
    """The result of one pair; None when a comparison filters it out."""
    if op in COMPARISONS:
        holds = COMPARISONS[op](a, b)
        if return_bool:
            return float(holds)
        return a if holds else None
    return ARITHMETIC[op](a, b)


def _vector_scalar(op: str, lhs: Value, rhs: Value, return_bool: bool) -> Iterator[Sample]:
    vector_on_left = not isinstance(lhs, float)
    samples = lhs if vector_on_left else rhs
    scalar = rhs if vector_on_left else lhs
    assert isinstance(samples, list) and isinstance(scalar, float)
    keep_name = op in COMPARISONS and not return_bool
    for sample in samples:
        a, b = (sample.value, scalar) if vector_on_left else (scalar, sample.value)
        result = _apply(op, a, b, return_bool)
        if result is None:
            continue
        if op in COMPARISONS and not return_bool:
            result = sample.value  # a filter keeps the vector's own value
        labels = sample.labels if keep_name else _drop_name(sample.labels)
        yield Sample(labels, result)


def _vector_vector(
    op: str, lhs: Vector, rhs: Vector, modifier: Any, return_bool: bool
) -> Iterator[Sample]:
    by_signature: dict[LabelSet, Sample] = {}
    for sample in rhs:
        signature = _signature(sample.labels, modifier)
        if signature in by_signature:
            raise InvalidExpression(
                "many-to-many matching not allowed: the right side has more than one series "
                f"for {dict(signature)}"
            )
        by_signature[signature] = sample
    matching = modifier.matching if modifier is not None else None
    keep_name = op in COMPARISONS and not return_bool
    for sample in lhs:
        signature = _signature(sample.labels, modifier)
        other = by_signature.get(signature)
        if other is None:
            continue
        result = _apply(op, sample.value, other.value, return_bool)
        if result is None:
            continue
        labels = sample.labels if keep_name else _drop_name(sample.labels)
        if matching is not None and matching.type == promql_parser.LabelModifierType.Include:
            labels = signature
        elif matching is not None:
            dropped = set(matching.labels)
            labels = tuple(pair for pair in labels if pair[0] not in dropped)
        yield Sample(labels, result)


def _set_operation(op: str, lhs: Vector, rhs: Vector, modifier: Any) -> Vector:
    right = {_signature(s.labels, modifier) for s in rhs}
    if op == "and":
        return [s for s in lhs if _signature(s.labels, modifier) in right]
    if op == "unless":
        return [s for s in lhs if _signature(s.labels, modifier) not in right]
    left = {_signature(s.labels, modifier) for s in lhs}
    return lhs + [s for s in rhs if _signature(s.labels, modifier) not in left]


def _group_labels(labels: LabelSet, modifier: Any) -> LabelSet:
    if modifier is None:
        return ()
    chosen = set(modifier.labels)
    if modifier.type == promql_parser.AggModifierType.By:
        return tuple(pair for pair in labels if pair[0] in chosen)
    return tuple(pair for pair in labels if pair[0] not in chosen and pair[0] != NAME)


def _aggregate(node: Any, samples: Vector) -> Vector:
    groups: dict[LabelSet, list[float]] = {}
    for sample in samples:
        groups.setdefault(_group_labels(sample.labels, node.modifier), []).append(sample.value)
    reduce = REDUCERS[str(node.op)]
    return [Sample(labels, float(reduce(values))) for labels, values in groups.items()]


def _call(node: Any, ctx: EvalContext) -> Value:
    name = node.func.name
    if name in RANGE_FUNCTIONS:
        return _range_function(name, node.args[0], ctx)
    if name == "time":
        return ctx.now
    if name == "histogram_quantile":
        q = _eval(node.args[0], ctx)
        if not isinstance(q, float):
            raise InvalidExpression("histogram_quantile() takes a number first")
        return _histogram_quantile(q, _vector(_eval(node.args[1], ctx)))
    argument = node.args[0]
    inner = _vector(_eval(argument, ctx))
    if name == "scalar":
        return inner[0].value if len(inner) == 1 else math.nan
    # absent(): one sample, labelled from the selector's equality matchers, when empty.
    if inner:
        return []
    labels: dict[str, str] = {}
    if isinstance(argument, promql_parser.VectorSelector):
        for matcher in argument.matchers.matchers:
            if matcher.op == promql_parser.MatchOp.Equal and matcher.name != NAME:
                labels[matcher.name] = matcher.value
    return [Sample(tuple(sorted(labels.items())), 1.0)]


def _range_function(name: str, matrix: Any, ctx: EvalContext) -> Vector:
    selector = matrix.vector_selector
    seconds = matrix.range.total_seconds()
    start = ctx.now - seconds
    tests = _selector_tests(selector)
    result: Vector = []
    for labels, points in ctx.store.window(selector.name, start, ctx.now).items():
        if not _matches(labels, tests):
            continue
        value: float | None
        if name in ("rate", "increase"):
            value = extrapolated_rate(points, start, ctx.now, per_second=name == "rate")
        else:
            value = REDUCERS[name.removesuffix("_over_time")]([v for _, v in points])
        if value is not None:
            result.append(Sample(_drop_name(labels), float(value)))
    return result


def _histogram_quantile(q: float, samples: Vector) -> Vector:
    groups: dict[LabelSet, list[tuple[float, float]]] = {}
    for sample in samples:
        bound = sample.label("le")
        if not bound:
            continue
        key = tuple(pair for pair in _drop_name(sample.labels) if pair[0] != "le")
        groups.setdefault(key, []).append((float(bound), sample.value))
    return [Sample(labels, bucket_quantile(q, buckets)) for labels, buckets in groups.items()]
