"""What several subcommands read the same way: ``--host``/``--port``/``--token`` over the
config's ``http`` section, the compute options and the stop signals."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
from collections.abc import Iterator
from typing import Any, get_args

from mlx_relay.core.config import ClusterConfig, Compute, HTTPConfig
from mlx_relay.core.errors import ConfigError

TOKEN_ENV = "MLX_RELAY_AUTH_TOKEN"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def token_from(given: str | None) -> str | None:
    """The bearer token: ``given`` (``--token``), else ``$MLX_RELAY_AUTH_TOKEN``; None if
    neither is set or both are empty."""
    return given or os.environ.get(TOKEN_ENV) or None


def add_token_arguments(parser: argparse.ArgumentParser, help_text: str) -> None:
    """``--token`` and ``--token-file`` (one of them): a token on the command line shows in
    the process list and the shell history, a file does not."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--token", default=None, help=f"{help_text} (or ${TOKEN_ENV})")
    group.add_argument(
        "--token-file",
        default=None,
        metavar="FILE",
        help="read the bearer token from FILE (its first line) instead of --token",
    )


def read_token_file(path: str) -> str:
    """The token held in ``path``: its first line, without surrounding whitespace.

    Raises:
        ConfigError: the file cannot be read or holds no token.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            token = handle.readline().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--token-file {path}: cannot read it ({exc})") from exc
    if not token:
        raise ConfigError(f"--token-file {path}: expected a token on its first line, found none")
    return token


def given_token(args: argparse.Namespace) -> str | None:
    """The token the command line gives: ``--token``, or the content of ``--token-file``
    (the environment and the config are the callers' fallbacks)."""
    path = getattr(args, "token_file", None)
    if path is not None:
        return read_token_file(path)
    token: str | None = getattr(args, "token", None)
    return token


def check_port(port: int | None) -> None:
    """Refuse a ``--port`` outside 0..65535 (None: not given)."""
    if port is not None and not 0 <= port <= 65535:
        raise ConfigError(f"--port: expected 0..65535, got {port}")


def add_http_arguments(parser: argparse.ArgumentParser) -> None:
    """``--host``, ``--port`` and ``--token``/``--token-file``: the command line's say over
    ``http:``."""
    parser.add_argument(
        "--host", default=None, help="address to bind (default: http.host, else 127.0.0.1)"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help="HTTP port, 0 = any free port (default: http.port, else 8080)",
    )
    add_token_arguments(parser, "bearer token of the app (default: http.auth_token)")


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


def add_compute_arguments(parser: argparse.ArgumentParser) -> None:
    """``--compute`` and ``--blas-threads`` (``model.compute`` / ``model.blas_threads``)."""
    parser.add_argument(
        "--compute",
        choices=get_args(Compute),
        default=None,
        help="weights to compute with: quantized (as stored), float32 (dense, fast on CPU "
        "with a BLAS) or auto (default: model.compute of the config, else auto)",
    )
    parser.add_argument(
        "--blas-threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU BLAS threads per computing process (default: the cores divided among the "
        "workers on this host)",
    )


def with_compute(config: ClusterConfig, args: argparse.Namespace) -> ClusterConfig:
    """The configuration with ``--compute`` and ``--blas-threads`` applied where given."""
    update: dict[str, object] = {}
    if getattr(args, "compute", None) is not None:
        update["compute"] = args.compute
    if getattr(args, "blas_threads", None) is not None:
        if args.blas_threads < 1:
            raise ConfigError(f"--blas-threads: expected at least 1, got {args.blas_threads}")
        update["blas_threads"] = args.blas_threads
    if not update:
        return config
    return config.model_copy(update={"model": config.model.model_copy(update=update)})


def add_tracing_arguments(parser: argparse.ArgumentParser) -> None:
    """``--otlp-endpoint`` (``tracing.otlp_endpoint``)."""
    parser.add_argument(
        "--otlp-endpoint",
        default=None,
        metavar="URL",
        help="export spans over OTLP/HTTP to this traces URL, e.g. "
        "http://127.0.0.1:4318/v1/traces (default: tracing.otlp_endpoint of the config)",
    )


def with_tracing(config: ClusterConfig, args: argparse.Namespace) -> ClusterConfig:
    """The configuration with ``--otlp-endpoint`` applied where given.

    Raises:
        ConfigError: the URL is not http:// or https://.
    """
    endpoint = getattr(args, "otlp_endpoint", None)
    if endpoint is None:
        return config
    from mlx_relay.core.tracing_config import TracingConfig

    data = {**config.tracing.model_dump(), "otlp_endpoint": endpoint}
    try:
        tracing = TracingConfig.model_validate(data)
    except ValueError as exc:
        raise ConfigError(
            f"--otlp-endpoint: expected an http:// or https:// URL, got {endpoint!r}"
        ) from exc
    return config.model_copy(update={"tracing": tracing})
