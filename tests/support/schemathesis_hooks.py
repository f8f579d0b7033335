"""schemathesis hooks of the API fuzz test (``SCHEMATHESIS_HOOKS``,
tests/integration/test_api_fuzz.py).

One limit no schema can state: a prompt's size in tokens (and its UTF-8 bytes), known only
once it is tokenized. A schema-valid prompt over it is refused with 400
``context_length_exceeded``. :func:`schema_valid_data_is_accepted` is schemathesis's
``positive_data_acceptance`` check with that one answer excused; the test runs it in place of
the built-in one, next to every other check.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance

CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"


def refused_as_too_long(response: Any) -> bool:
    if response.status_code != 400:
        return False
    try:
        return bool(response.json()["error"]["code"] == CONTEXT_LENGTH_EXCEEDED)
    except (ValueError, KeyError, TypeError):
        return False


@schemathesis.check
def schema_valid_data_is_accepted(ctx: Any, response: Any, case: Any) -> bool | None:
    """Schema-valid data is accepted, unless its prompt is too long for the server."""
    if refused_as_too_long(response):
        return None
    result: bool | None = positive_data_acceptance(ctx, response, case)
    return result
