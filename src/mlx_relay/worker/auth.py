"""Who calls a worker: the bearer token every Worker method requires when one is set, and
the caller's identity the session quota counts (its certificate's subject under mTLS, else
its address)."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable
from urllib.parse import unquote

import grpc

SERVICE_NAME = "mlxrelay.v1.Worker"


def peer_of(context: grpc.aio.ServicerContext) -> str:
    """Who is calling, as the session quota counts it: the subject of the client's
    certificate under mTLS, else its address without the port (``ipv4:10.0.0.5``), so that
    one client's many connections count as one peer."""
    auth = context.auth_context()
    subject = auth.get("x509_subject") or auth.get("x509_common_name")
    if subject:
        return "cert " + subject[0].decode("utf-8", "replace")
    address = unquote(context.peer() or "")  # gRPC writes ipv6:%5B::1%5D:port
    if address.count(":") < 2:
        return address
    scheme, _, rest = address.partition(":")
    host = rest.rsplit(":", 1)[0].strip("[]")
    return host_peer(host) if scheme in ("ipv4", "ipv6") else address.rsplit(":", 1)[0]


def host_peer(host: str) -> str:
    """A caller's address as the session quota names it: ``ipv4:10.0.0.5``, ``ipv6:[::1]``;
    an IPv4-mapped IPv6 address as its IPv4 address."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return f"ipv4:{ip}" if ip.version == 4 else f"ipv6:[{ip}]"


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` on the Worker service's methods.

    The health service stays open so that orchestrators and probes can see a worker
    without holding the token.
    """

    def __init__(self, token: str, service: str = SERVICE_NAME) -> None:
        self._expected = f"Bearer {token}".encode()
        self._prefix = f"/{service}/"
        self._deny = grpc.unary_unary_rpc_method_handler(_unauthenticated)
        self._deny_stream = grpc.stream_stream_rpc_method_handler(_unauthenticated)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if handler_call_details.method.startswith(self._prefix):
            metadata = handler_call_details.invocation_metadata or ()
            given = next((str(v) for k, v in metadata if k == "authorization"), "")
            if not hmac.compare_digest(given.encode(), self._expected):
                handler = await continuation(handler_call_details)
                streaming = handler is not None and handler.request_streaming
                return self._deny_stream if streaming else self._deny
        return await continuation(handler_call_details)


async def _unauthenticated(request: object, context: grpc.aio.ServicerContext) -> None:
    await context.abort(
        grpc.StatusCode.UNAUTHENTICATED,
        "this worker requires 'authorization: Bearer <network.auth_token>' metadata",
    )
