"""The coordinator role in one object: services (orchestrator, monitoring) and the HTTP app
on one port. ``mlx-relay coordinator`` and ``mlx-relay up`` both run it."""

from __future__ import annotations

import logging

from mlx_relay.core.config import ClusterConfig
from mlx_relay.core.http_access import warn_if_exposed
from mlx_relay.core.http_server import HTTPServer
from mlx_relay.server.app import AppServices, create_app, start_services, stop_services

logger = logging.getLogger(__name__)


class CoordinatorRuntime:
    """Connects to the workers, then serves the app.

    Args:
        config: the cluster configuration.
        host: address to bind (default: ``config.http.host``).
        port: port to bind, 0 for any free port (default: ``config.http.port``).
        enable_monitoring: run the coordinator's collectors and the cluster monitor.
    """

    def __init__(
        self,
        config: ClusterConfig,
        host: str | None = None,
        port: int | None = None,
        *,
        enable_monitoring: bool = True,
    ) -> None:
        self.config = config
        self.host = host if host is not None else config.http.host
        self.port = port if port is not None else config.http.port
        self.enable_monitoring = enable_monitoring
        self.services: AppServices | None = None
        self._http: HTTPServer | None = None

    @property
    def url(self) -> str:
        if self._http is None:
            raise RuntimeError("the coordinator is not started")
        return self._http.url

    async def start(self) -> None:
        """Initialise the pipeline (waits for every worker), then start the HTTP server.

        Raises:
            WorkerUnavailable: workers not SERVING within ``network.connect_timeout``.
            ShardMismatch: the stages' layers differ from the assignment.
            BindError: the HTTP address cannot be bound.
        """
        warn_if_exposed(self.host, self.config.http)
        self.services = await start_services(self.config, enable_monitoring=self.enable_monitoring)
        try:
            self._http = HTTPServer(create_app(self.services), self.host, self.port)
            await self._http.start()
        except BaseException:
            await stop_services(self.services)
            self.services = None
            raise
        self.port = self._http.port

    async def stop(self) -> None:
        """Stop the HTTP server first (no new requests), then the pipeline's services."""
        http, self._http = self._http, None
        services, self.services = self.services, None
        try:
            if http is not None:
                await http.stop()
        finally:
            if services is not None:
                await stop_services(services)
        logger.info("coordinator stopped")
