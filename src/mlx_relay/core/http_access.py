"""Who may use the HTTP app: bearer tokens, a per-client rate limit, CORS, the exposure warning.

One mechanism for every route family: the server's (``/v1``, ``/health``), the monitoring
routes (``/``, ``/api/*``, ``/ws``, ``/metrics``) and the API's description (``/docs``,
``/redoc``, ``/openapi.json``, guarded by :class:`SchemaGuard`). :func:`install_access` puts
one :class:`AccessControl` on the app; the routes depend on :func:`require_token`,
:func:`require_page_token`, :func:`require_metrics_token` and :func:`rate_limit`, which read
it from there. Only the dashboard page and ``/ws`` accept the token as ``?token=``. Settings come
from :class:`~mlx_relay.core.config.HTTPConfig`, built at the entry point; nothing here reads
the environment. Tokens are compared in constant time.
"""

from __future__ import annotations

import hmac
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from fastapi import FastAPI, HTTPException, Request, WebSocket, status
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from mlx_relay.core.addresses import exposure_warning as _exposure_warning
from mlx_relay.core.config import HTTPConfig

logger = logging.getLogger(__name__)

TOKEN_QUERY_PARAM = "token"


def tokens_match(given: str | None, expected: str) -> bool:
    """Constant-time comparison of a presented token with the configured one."""
    if given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def presented_token(
    headers: Mapping[str, str], query: Mapping[str, str] | None = None
) -> str | None:
    """The token a client presented: ``Authorization: Bearer <t>`` first, else ``?token=<t>``
    when ``query`` is given.

    The query form exists for browsers: a page link and a WebSocket cannot set headers. Only
    the dashboard page (``/``) and ``/ws`` pass the query: a token in a URL ends up in proxy
    logs and browser history, so every other route takes the header alone.
    """
    header = headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    if query is None:
        return None
    return query.get(TOKEN_QUERY_PARAM) or None


class BearerAuth:
    """A FastAPI dependency that requires ``token`` (no-op when ``token`` is None).

    Args:
        token: The expected token; None leaves the route open.
        realm: Named in the ``WWW-Authenticate`` challenge.
    """

    def __init__(self, token: str | None, realm: str = "mlx-relay") -> None:
        self.token = token
        self.realm = realm

    @property
    def enabled(self) -> bool:
        return self.token is not None

    def allows(self, headers: Mapping[str, str], query: Mapping[str, str] | None = None) -> bool:
        """Whether the header (or, when ``query`` is given, ``?token=``) holds the token."""
        if self.token is None:
            return True
        return tokens_match(presented_token(headers, query), self.token)

    def challenge(self) -> HTTPException:
        """The 401 answered to a request without the token."""
        return HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail="missing or invalid bearer token",
            headers={"WWW-Authenticate": f'Bearer realm="{self.realm}"'},
        )

    async def __call__(self, request: Request) -> None:
        """Header only: see :func:`presented_token`."""
        if not self.allows(request.headers):
            raise self.challenge()

    def allows_page(self, connection: HTTPConnection) -> bool:
        """The dashboard page and ``/ws``: the header, or ``?token=``."""
        return self.allows(connection.headers, connection.query_params)


def metrics_auth(settings: HTTPConfig) -> BearerAuth:
    """The guard of ``/metrics``: open when ``metrics_open``, else its own token or the app's."""
    if settings.metrics_open:
        return BearerAuth(None)
    return BearerAuth(settings.metrics_token or settings.auth_token, realm="mlx-relay-metrics")


@dataclass
class _Bucket:
    tokens: float
    updated: float


class TokenBucketLimiter:
    """Per-client token buckets: ``per_minute`` requests a minute, bursts up to ``burst``.

    Memory is bounded: at most ``max_clients`` buckets, least recently used dropped first (a
    dropped client simply starts again with a full bucket).

    Args:
        per_minute: Sustained rate per client.
        burst: Bucket size; defaults to ``per_minute``.
        clock: Monotonic clock, injectable for tests.
        max_clients: Buckets kept at most.
    """

    def __init__(
        self,
        per_minute: int,
        *,
        burst: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = 10_000,
    ) -> None:
        if per_minute < 1:
            raise ValueError("per_minute must be at least 1")
        self.rate = per_minute / 60.0
        self.capacity = float(burst if burst is not None else per_minute)
        self._clock = clock
        self._max_clients = max_clients
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def acquire(self, client: str) -> float:
        """Take one token for ``client``; returns 0 when allowed, else seconds until allowed."""
        now = self._clock()
        bucket = self._buckets.pop(client, None)
        if bucket is None:
            bucket = _Bucket(self.capacity, now)
        bucket.tokens = min(self.capacity, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        self._buckets[client] = bucket
        while len(self._buckets) > self._max_clients:
            self._buckets.popitem(last=False)
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate


def install_cors(app: FastAPI, settings: HTTPConfig) -> bool:
    """Add CORS only when origins are configured; by default browsers get no CORS headers."""
    if not settings.cors_origins:
        return False
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(settings.cors_origins),
        allow_methods=["GET", "POST", "OPTIONS"],
        allow_headers=["Authorization", "Content-Type"],
    )
    return True


def exposure_warning(host: str, settings: HTTPConfig) -> str | None:
    """A warning when the app would be reachable from the network without a token."""
    return _exposure_warning(
        host,
        bool(settings.auth_token),
        "read the monitoring data and use the API",
        "Set http.auth_token (or MLX_RELAY_AUTH_TOKEN / --token)",
    )


def warn_if_exposed(host: str, settings: HTTPConfig) -> str | None:
    """Log :func:`exposure_warning` loudly; returns it so a CLI can also print it."""
    message = exposure_warning(host, settings)
    if message:
        logger.warning("%s", message)
    return message


STATE_ATTRIBUTE = "access"


class AccessControl:
    """The access rules of one app, built once from its settings.

    Attributes:
        settings: the app's :class:`~mlx_relay.core.config.HTTPConfig`.
        auth: guards every route but ``/metrics`` and ``/static``.
        metrics: guards ``/metrics``.
        limiter: the per-client budget of ``/api/*``.
    """

    def __init__(self, settings: HTTPConfig) -> None:
        self.settings = settings
        self.auth = BearerAuth(settings.auth_token)
        self.metrics = metrics_auth(settings)
        self.limiter = TokenBucketLimiter(settings.rate_limit_per_minute)


def install_access(app: FastAPI, settings: HTTPConfig) -> AccessControl:
    """Put the access rules of ``settings`` on ``app`` (once: a second call with the same
    settings returns the first one's) and add CORS when origins are configured.

    Raises:
        ValueError: ``app`` already has rules built from different settings.
    """
    existing: AccessControl | None = getattr(app.state, STATE_ATTRIBUTE, None)
    if existing is not None:
        if existing.settings != settings:
            raise ValueError("the app already has access rules from other HTTP settings")
        return existing
    access = AccessControl(settings)
    setattr(app.state, STATE_ATTRIBUTE, access)
    if access.auth.enabled:
        app.add_middleware(SchemaGuard, paths=schema_paths(app), auth=access.auth)
    install_cors(app, settings)
    return access


def schema_paths(app: FastAPI) -> frozenset[str]:
    """The paths FastAPI serves the API's description on: ``/openapi.json``, ``/docs``
    (and its OAuth2 redirect) and ``/redoc``, as configured on ``app``."""
    urls = (app.openapi_url, app.docs_url, app.swagger_ui_oauth2_redirect_url, app.redoc_url)
    return frozenset(url for url in urls if url)


class SchemaGuard:
    """ASGI middleware: the routes FastAPI adds for the schema and its pages ask for the
    bearer token (header only) like every other route.

    Args:
        app: the wrapped ASGI app.
        paths: the guarded paths (:func:`schema_paths`).
        auth: the app's token check.
    """

    def __init__(self, app: ASGIApp, paths: frozenset[str], auth: BearerAuth) -> None:
        self.app = app
        self.paths = paths
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        guarded = scope["type"] == "http" and scope["path"] in self.paths
        if guarded and not self.auth.allows(Headers(scope=scope)):
            refused = self.auth.challenge()
            response = JSONResponse(
                {"detail": refused.detail},
                status_code=refused.status_code,
                headers=refused.headers,
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def access_of(connection: HTTPConnection) -> AccessControl:
    """The :class:`AccessControl` that :func:`install_access` put on the app."""
    access: AccessControl | None = getattr(connection.app.state, STATE_ATTRIBUTE, None)
    if access is None:
        raise RuntimeError("install_access() was not called for this app")
    return access


async def require_token(request: Request) -> None:
    """The dependency of every guarded route: the app's bearer token in the
    ``Authorization`` header, when one is set."""
    await access_of(request).auth(request)


async def require_page_token(request: Request) -> None:
    """The dependency of the dashboard page: the token in the header or in ``?token=``
    (a browser following a link cannot set a header)."""
    auth = access_of(request).auth
    if not auth.allows_page(request):
        raise auth.challenge()


async def require_metrics_token(request: Request) -> None:
    """The dependency of ``/metrics``: see :func:`metrics_auth`."""
    await access_of(request).metrics(request)


async def rate_limit(request: Request) -> None:
    """The dependency of ``/api/*``: 429 with ``Retry-After`` past the per-client budget."""
    client = request.client.host if request.client else "unknown"
    wait = access_of(request).limiter.acquire(client)
    if wait > 0:
        raise HTTPException(
            status_code=status.HTTP_429_TOO_MANY_REQUESTS,
            detail="rate limit exceeded",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )


def websocket_allowed(websocket: WebSocket) -> bool:
    """Whether a WebSocket handshake presents the app's token (a WebSocket route cannot
    answer 401, so it closes the handshake itself when this is false)."""
    return access_of(websocket).auth.allows_page(websocket)
