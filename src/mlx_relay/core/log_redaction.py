"""No bearer token in any log line: a filter that masks ``?token=...`` and ``Bearer ...``.

uvicorn logs each request's path with its query string (the access log, and the
``"WebSocket /ws?token=..." [accepted]`` line of its error logger), so a token a browser
sends in the URL would reach the log. :func:`install_token_redaction` puts
:class:`TokenRedaction` on those loggers; the HTTP server does it when it is built.
"""

from __future__ import annotations

import logging
import re
from typing import Any

REDACTED = "[redacted]"
# Loggers that write request lines (path and query string) or headers.
REQUEST_LOGGERS = ("uvicorn.access", "uvicorn.error", "uvicorn")

_QUERY_TOKEN = re.compile(r"(?<=[?&;])(token|access_token)=[^&\s\"';]*", re.IGNORECASE)
_BEARER = re.compile(r"(Bearer\s+)[^\s\"',;]+", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with query-string tokens and bearer credentials masked."""
    text = _QUERY_TOKEN.sub(lambda m: f"{m.group(1)}={REDACTED}", text)
    return _BEARER.sub(lambda m: f"{m.group(1)}{REDACTED}", text)


def _redacted(value: Any) -> Any:
    return redact(value) if isinstance(value, str) else value


class TokenRedaction(logging.Filter):
    """Masks tokens in a record's message and in its string arguments (keeps the record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_redacted(arg) for arg in record.args)
        elif isinstance(record.args, dict):
            record.args = {key: _redacted(arg) for key, arg in record.args.items()}
        return True


_FILTER = TokenRedaction()


def install_token_redaction() -> None:
    """Put :class:`TokenRedaction` on every request logger (once)."""
    for name in REQUEST_LOGGERS:
        logging.getLogger(name).addFilter(_FILTER)
