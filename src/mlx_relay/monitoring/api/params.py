"""Query parameters of the monitoring API, parsed so that a bad one answers 400 with
``{"detail": {"param": ..., "message": ...}}`` naming it."""

from __future__ import annotations

import math

from fastapi import HTTPException, status


def bad(param: str, message: str) -> HTTPException:
    return HTTPException(status.HTTP_400_BAD_REQUEST, {"param": param, "message": message})


def number_param(param: str, value: str | None) -> float | None:
    """A finite number of seconds, or None when absent or empty."""
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except ValueError:
        raise bad(param, f"expected a number of seconds, got {value!r}") from None
    if not math.isfinite(number):
        raise bad(param, f"expected a finite number, got {value!r}")
    return number


def integer_param(param: str, value: str | None, low: int, high: int) -> int | None:
    """An integer in ``[low, high]``, or None when absent or empty."""
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except ValueError:
        raise bad(param, f"expected an integer, got {value!r}") from None
    if not low <= number <= high:
        raise bad(param, f"expected {low}..{high}, got {number}")
    return number
