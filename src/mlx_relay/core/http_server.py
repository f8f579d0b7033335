"""Serving an ASGI app with uvicorn inside the caller's event loop.

The socket is bound here, so port 0 works (the real port is read back) and a busy port is a
typed :class:`~mlx_relay.core.errors.BindError` instead of uvicorn's ``SystemExit``. Signals
stay with the caller: the CLI decides what Ctrl-C stops, and in which order. The coordinator's
app and the standalone monitoring dashboard both run on this.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn

from mlx_relay.core.addresses import http_url
from mlx_relay.core.errors import BindError
from mlx_relay.core.log_redaction import install_token_redaction

logger = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The embedding program owns SIGINT/SIGTERM; uvicorn must neither take nor re-raise them.
        yield


class HTTPServer:
    """An ASGI app served by uvicorn on ``host:port`` (0 picks a free port).

    Args:
        app: the ASGI app.
        host: address to bind; loopback by default.
        port: port to bind; 0 for any free port (read :attr:`port` after :meth:`start`).
        log_level: uvicorn's own log level.
        access_log: log every HTTP request.
        graceful_shutdown: seconds running requests may take to finish on :meth:`stop`.
        name: the serving task's name.
    """

    def __init__(
        self,
        app: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        log_level: str = "warning",
        access_log: bool = False,
        graceful_shutdown: int = 5,
        name: str = "http",
    ) -> None:
        self.host = host
        self.port = port
        self.graceful_shutdown = graceful_shutdown
        self._name = name
        install_token_redaction()  # uvicorn logs paths with their query strings
        self._config = uvicorn.Config(
            app,
            log_level=log_level,
            access_log=access_log,
            log_config=None,
            lifespan="off",
            timeout_graceful_shutdown=graceful_shutdown,
        )
        self._server = _Server(self._config)
        self._socket: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return http_url(self.host, self.port)

    async def start(self) -> None:
        """Bind and serve in the background; returns once requests are accepted.

        Raises:
            BindError: the address cannot be bound (e.g. the port is in use).
        """
        if self._task is not None:
            raise RuntimeError("the HTTP server was already started")
        self._socket = bind_socket(self.host, self.port)
        self.port = self._socket.getsockname()[1]
        self._task = asyncio.create_task(
            self._server.serve(sockets=[self._socket]), name=self._name
        )
        try:
            while not self._server.started:
                if self._task.done():
                    self._task.result()
                    raise BindError(f"the HTTP server on {self.url} stopped during start-up")
                await asyncio.sleep(0.01)
        except BaseException:
            # Also when cancelled here: requests may already be served, so the server must end.
            task, self._task = self._task, None
            self._server.should_exit = True
            await asyncio.gather(task, return_exceptions=True)
            self._close_socket()
            raise
        logger.info("HTTP server listening on %s", self.url)

    async def wait(self) -> None:
        """Wait until the server stops."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def stop(self) -> None:
        """Stop accepting requests, let running ones finish (up to ``graceful_shutdown``
        seconds), free the port."""
        task, self._task = self._task, None
        if task is None:
            return
        self._server.should_exit = True
        try:
            await task
        finally:
            self._close_socket()

    def _close_socket(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    async def __aenter__(self) -> HTTPServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening, non-blocking TCP socket on ``host:port`` (port 0 picks a free port).

    Raises:
        BindError: the address cannot be resolved or bound.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise BindError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise BindError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock
