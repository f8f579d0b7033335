"""The worker's gRPC server: ``mlxrelay.v1.Worker`` plus ``grpc.health.v1`` on one port.

Binding comes first and alone, so the port is known (port 0 picks one) and the health
service can answer NOT_SERVING before any layer is loaded. With ``network.tls`` the port
serves TLS only, and with ``require_client_cert`` it accepts only clients whose certificate
the cluster's CA signed. At most ``maximum_concurrent_rpcs`` calls run at once; gRPC answers
more with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from mlx_relay.core.config import ClusterConfig, NetworkConfig
from mlx_relay.core.errors import ConfigError, WorkerUnavailable
from mlx_relay.core.tls_config import TLSMaterial
from mlx_relay.proto import relay_pb2_grpc as pb_grpc
from mlx_relay.worker.direct_link import DirectLinkServer
from mlx_relay.worker.service import SERVICE_NAME, BearerTokenInterceptor, WorkerServicer

logger = logging.getLogger(__name__)

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# maximum_concurrent_rpcs when the config leaves it empty: this floor, or this many calls
# per running request (its Forward, EndSession and the monitoring's calls) when more.
DEFAULT_CONCURRENT_RPCS = 256
RPCS_PER_RUNNING_REQUEST = 4


def concurrent_rpc_limit(config: ClusterConfig) -> int:
    """The most calls a worker serves at once (``network.maximum_concurrent_rpcs``)."""
    configured = config.network.maximum_concurrent_rpcs
    if configured is not None:
        return configured
    running = config.inference.max_running_requests
    return max(DEFAULT_CONCURRENT_RPCS, RPCS_PER_RUNNING_REQUEST * running)


def server_credentials(tls: TLSMaterial, device_id: str) -> grpc.ServerCredentials:
    """The TLS credentials a worker serves with: its certificate and key, and the CA that
    must have signed client certificates under ``require_client_cert``.

    Raises:
        ConfigError: the worker has no certificate of its own.
    """
    if tls.cert is None or tls.key is None:
        raise ConfigError(f"worker {device_id}: network.tls is set but the device has no tls")
    return grpc.ssl_server_credentials(
        [(tls.key, tls.cert)],
        root_certificates=tls.ca if tls.require_client_cert else None,
        require_client_auth=tls.require_client_cert,
    )


class WorkerGrpcServer:
    """One ``grpc.aio`` server with the worker service, the health service, the bearer-token
    check (when ``network.auth_token`` is set) and the message size limits.

    Args:
        device_id: the worker's id (in error messages).
        network: limits and the token.
        servicer: the worker service to serve.
        tls: the worker's certificate, key and CA; None serves plaintext.
        maximum_concurrent_rpcs: the most calls served at once (None: no limit).
    """

    def __init__(
        self,
        device_id: str,
        network: NetworkConfig,
        servicer: WorkerServicer,
        *,
        tls: TLSMaterial | None = None,
        maximum_concurrent_rpcs: int | None = None,
    ) -> None:
        self.device_id = device_id
        self.health = health_aio.HealthServicer()
        self._network = network
        self._servicer = servicer
        self._tls = tls
        self._max_rpcs = maximum_concurrent_rpcs
        self._server: grpc.aio.Server | None = None
        self.direct: DirectLinkServer | None = None

    def bind(self, address: str) -> int:
        """Create the server (inside the running event loop) and listen on ``address``
        (``host:port``); returns the bound port.

        Raises:
            WorkerUnavailable: the address cannot be bound.
        """
        limit = self._network.max_message_mb * 1024 * 1024
        token = self._network.auth_token
        server = grpc.aio.server(
            interceptors=[BearerTokenInterceptor(token)] if token else [],
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=self._max_rpcs,
        )
        pb_grpc.add_WorkerServicer_to_server(self._servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        try:
            if self._tls is None:
                port = int(server.add_insecure_port(address))
            else:
                credentials = server_credentials(self._tls, self.device_id)
                port = int(server.add_secure_port(address, credentials))
        except RuntimeError as exc:
            raise WorkerUnavailable(self.device_id, f"cannot bind {address}: {exc}") from None
        self._server = server
        if self._network.direct_link and self._network.forward_stream and self._tls is None:
            self._bind_direct(address.rsplit(":", 1)[0].strip("[]"))
        return port

    def _bind_direct(self, host: str) -> None:
        """The direct link's port on ``host`` (mlx_relay/worker/direct_link.py); where it
        cannot be bound, the calls stay on gRPC."""
        direct = DirectLinkServer(
            self._servicer,
            self._network.auth_token,
            self._network.max_message_mb * 1024 * 1024,
            self._max_rpcs,
        )
        try:
            self._servicer.direct_port = direct.bind(host)
        except OSError as exc:
            logger.warning(
                "worker %s: no direct link (cannot bind %s: %s); Forward calls stay on gRPC",
                self.device_id,
                host,
                exc,
            )
            return
        self.direct = direct

    async def start(self) -> None:
        """Serve on the bound port.

        Raises:
            RuntimeError: :meth:`bind` was not called.
        """
        if self._server is None:
            raise RuntimeError(f"worker {self.device_id}: bind() before start()")
        await self._server.start()
        if self.direct is not None:
            await self.direct.start()

    async def set_serving(self, serving: bool) -> None:
        """What ``grpc.health.v1`` answers, for the whole server and the worker service."""
        status = _SERVING if serving else _NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def stop(self, grace: float | None) -> None:
        """Answer NOT_SERVING from now on, then stop (in-flight calls get ``grace`` s)."""
        await self.health.enter_graceful_shutdown()
        stopping = [self.direct.stop(grace)] if self.direct is not None else []
        if self._server is not None:
            stopping.append(self._server.stop(grace))
        await asyncio.gather(*stopping)
