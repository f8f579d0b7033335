"""Annotation templates: the part of Prometheus's Go templates that alert annotations use.

Supported actions (each also valid for Prometheus, so one rules file serves both):
``{{ $labels.NAME }}``, ``{{ $value }}``, ``{{ $value | humanize }}``,
``{{ $value | humanizePercentage }}``, ``{{ $value | humanizeDuration }}`` and
``{{ printf "%.2f" $value }}``. :func:`check_template` refuses anything else up front.
"""

from __future__ import annotations

import math
import re

ACTION = re.compile(r"\{\{-?\s*(.*?)\s*-?\}\}")
LABEL = re.compile(r"^\$labels\.([A-Za-z_][A-Za-z0-9_]*)$")
VALUE_PIPE = re.compile(r"^\$value(?:\s*\|\s*(humanize|humanizePercentage|humanizeDuration))?$")
PRINTF = re.compile(r'^printf\s+"(%[-+ 0#]?\d*(?:\.\d+)?[dfeEgGs])"\s+\$value$')


class TemplateError(ValueError):
    """A template action outside the supported subset."""


def check_template(text: str) -> None:
    """Raise :class:`TemplateError` naming the first unsupported action in ``text``."""
    for match in ACTION.finditer(text):
        action = match.group(1)
        if not (LABEL.match(action) or VALUE_PIPE.match(action) or PRINTF.match(action)):
            raise TemplateError(f"unsupported template action {{{{ {action} }}}}")


def expand(text: str, labels: dict[str, str], value: float) -> str:
    """``text`` with every action replaced; a missing label expands to an empty string."""

    def replace(match: re.Match[str]) -> str:
        action = match.group(1)
        label = LABEL.match(action)
        if label:
            return labels.get(label.group(1), "")
        pipe = VALUE_PIPE.match(action)
        if pipe:
            return _format_value(value, pipe.group(1))
        printf = PRINTF.match(action)
        if printf:
            spec = printf.group(1)
            if spec.endswith("d"):
                return spec % int(value) if math.isfinite(value) else str(value)
            return spec % value
        return match.group(0)

    return ACTION.sub(replace, text)


def _format_value(value: float, function: str | None) -> str:
    if function is None:
        return _go_float(value)
    if function == "humanizePercentage":
        return f"{_significant(value * 100)}%"
    if function == "humanizeDuration":
        return humanize_duration(value)
    return humanize(value)


def _go_float(value: float) -> str:
    """Like Go's strconv.FormatFloat(v, 'g', -1, 64) for the common cases."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e21:
        return str(int(value))
    return repr(value)


def _significant(value: float) -> str:
    return f"{value:.4g}"


def humanize(value: float) -> str:
    """SI prefixes with four significant digits, as Prometheus's ``humanize``."""
    if value == 0 or not math.isfinite(value):
        return _go_float(value)
    prefixes = ["", "k", "M", "G", "T", "P", "E", "Z", "Y"]
    small = ["", "m", "u", "n", "p", "f", "a", "z", "y"]
    magnitude = abs(value)
    index = 0
    if magnitude >= 1:
        while magnitude >= 1000 and index < len(prefixes) - 1:
            magnitude /= 1000
            value /= 1000
            index += 1
        return f"{_significant(value)}{prefixes[index]}"
    while magnitude < 1 and index < len(small) - 1:
        magnitude *= 1000
        value *= 1000
        index += 1
    return f"{_significant(value)}{small[index]}"


def humanize_duration(seconds: float) -> str:
    """``1d 2h 3m 4s`` above a second, ``250ms`` below, as Prometheus's ``humanizeDuration``."""
    if not math.isfinite(seconds):
        return _go_float(seconds)
    if abs(seconds) < 1:
        return f"{humanize(seconds)}s"
    sign = "-" if seconds < 0 else ""
    remaining = abs(seconds)
    days, remaining = divmod(remaining, 86400)
    hours, remaining = divmod(remaining, 3600)
    minutes, remaining = divmod(remaining, 60)
    parts = []
    if days:
        parts.append(f"{int(days)}d")
    if hours:
        parts.append(f"{int(hours)}h")
    if minutes:
        parts.append(f"{int(minutes)}m")
    parts.append(f"{remaining:.4g}s")
    return sign + " ".join(parts)
