"""What several subcommands read the same way: ``--host``/``--port``/``--token`` over the
config's ``http`` section, and the stop signals."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Iterator
from typing import Any

from mlx_relay.core.config import ClusterConfig, HTTPConfig
from mlx_relay.core.errors import ConfigError

TOKEN_ENV = "MLX_RELAY_AUTH_TOKEN"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def token_from(given: str | None) -> str | None:
    """The bearer token: ``given`` (``--token``), else ``$MLX_RELAY_AUTH_TOKEN``; None if
    neither is set or both are empty."""
    return given or os.environ.get(TOKEN_ENV) or None


def check_port(port: int | None) -> None:
    """Refuse a ``--port`` outside 0..65535 (None: not given)."""
    if port is not None and not 0 <= port <= 65535:
        raise ConfigError(f"--port: expected 0..65535, got {port}")


def http_settings(
    base: HTTPConfig, host: str | None, port: int | None, token: str | None
) -> HTTPConfig:
    """The config's ``http`` section with ``--host``, ``--port`` and the bearer token
    (``--token``, else ``$MLX_RELAY_AUTH_TOKEN``) applied over it."""
    update: dict[str, Any] = {}
    if host is not None:
        update["host"] = host
    if port is not None:
        check_port(port)
        update["port"] = port
    token = token_from(token)
    if token:
        update["auth_token"] = token
    return base.model_copy(update=update)


def with_http_overrides(
    config: ClusterConfig, host: str | None, port: int | None, token: str | None
) -> ClusterConfig:
    """The cluster configuration with :func:`http_settings` applied to its ``http`` section."""
    return config.model_copy(update={"http": http_settings(config.http, host, port, token)})


@contextlib.contextmanager
def stop_signals() -> Iterator[asyncio.Event]:
    """An event set by SIGINT or SIGTERM while the block runs (handled in the running loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    try:
        yield stop
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
