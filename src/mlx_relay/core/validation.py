"""Pydantic validation errors as one readable line: where (a field path) and what.

Both the configuration file (``devices[1].port``) and the HTTP API's request bodies
(``messages[0].content``) name the offending field with :func:`field_path`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError


class ConfigSection(BaseModel):
    """Base of every section of the cluster configuration: unknown keys are errors (a typo
    is never silently ignored) and a loaded section never changes."""

    model_config = ConfigDict(extra="forbid", frozen=True)


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})


def _is_type_tag(part: str) -> bool:
    # Union members and validators show up in pydantic's location as their type or function
    # ("str", "list[int]", "TextPart", "literal['auto']", "function-after[...]"); field
    # names are lower-case identifiers without brackets.
    return part in _TYPE_TAGS or "[" in part or part.startswith("function-") or part[:1].isupper()


def field_path(loc: Sequence[Any]) -> str:
    """A pydantic error location as a field path: ``("devices", 1, "port")`` ->
    ``devices[1].port``; union-member tags are left out; ``""`` for the top level."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _is_type_tag(str(part)):
            out += f".{part}" if out else str(part)
    return out


def kind_of(value: Any) -> str:
    """How an error message names a value's type: ``"a string"``, ``"a list"``..."""
    return {
        type(None): "nothing",
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        list: "a list",
        dict: "a mapping",
    }.get(type(value), type(value).__name__)


class FieldProblem(ValueError):
    """A cross-field problem that belongs to one field path (e.g. ``devices[2].layers``);
    raised inside a validator, it is reported at ``where`` rather than at the model."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(message)
        self.where = where


_BOUNDS = {
    "greater_than_equal": ">=",
    "less_than_equal": "<=",
    "greater_than": ">",
    "less_than": "<",
}


def describe(exc: ValidationError, source: str) -> str:
    """``"<source>: <field path>: <what was expected>"`` for the first error of ``exc``."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    where = field_path(first["loc"]) or "(top level)"
    kind = first["type"]
    given = first.get("input")
    ctx = first.get("ctx") or {}
    problem = ctx.get("error")
    if kind == "value_error" and isinstance(problem, FieldProblem):
        where = problem.where
    what = _expected(first, kind, given, ctx)
    # A union reports one error per alternative; show only the first.
    more = len({field_path(e["loc"]) or "(top level)" for e in errors[1:]} - {where})
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{source}: {where}: {what}{suffix}"


def _expected(first: Any, kind: str, given: Any, ctx: dict[str, Any]) -> str:
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        return "unknown key (check the spelling)"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"expected an integer, got {given!r}"
    if kind in ("float_type", "float_parsing"):
        return f"expected a number, got {given!r}"
    if kind in ("bool_type", "bool_parsing"):
        return f"expected true or false, got {given!r}"
    if kind == "string_type":
        return f"expected a string, got {kind_of(given)}"
    if kind == "list_type":
        return f"expected a list, got {kind_of(given)}"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"expected a mapping, got {kind_of(given)}"
    if kind in _BOUNDS:
        limit = next(iter(ctx.values()))
        return f"expected a value {_BOUNDS[kind]} {limit}, got {given!r}"
    if kind == "literal_error":
        return f"expected one of {ctx.get('expected')}, got {given!r}"
    if kind == "string_pattern_mismatch":
        return (
            "expected letters, digits, '_', '.' or '-' (at most 64, starting with a letter "
            f"or digit), got {given!r}"
        )
    if kind == "value_error":
        problem = ctx.get("error")
        return str(problem) if problem is not None else str(first["msg"])
    return str(first["msg"])
