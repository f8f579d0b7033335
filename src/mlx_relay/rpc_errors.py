"""What a failed gRPC call to a worker becomes: the typed errors of
:mod:`mlx_relay.core.errors` (unreachable or too slow -> ``WorkerUnavailable``, full ->
``QueueFull``, anything else -> :class:`StageError`), the failing stage named, whether the
call was unary or on the ``ForwardStream`` (:func:`answered_error`).
"""

from __future__ import annotations

import grpc
import grpc.aio

from mlx_relay.core.errors import QueueFull, RelayError, WorkerUnavailable
from mlx_relay.proto import relay_pb2

# Trailing metadata of a relayed Forward that failed downstream: the failing stage's id.
FAILED_DEVICE_KEY = "mlx-relay-failed-device"


class StageError(RelayError):
    """A worker answered a call with an error other than being unreachable or full
    (INVALID_ARGUMENT, NOT_FOUND, UNAUTHENTICATED, an internal error...)."""

    def __init__(self, device_id: str, method: str, code: str, detail: str) -> None:
        super().__init__(f"worker {device_id!r} answered {method} with {code}: {detail}")
        self.device_id = device_id
        self.method = method
        self.code = code
        self.detail = detail


class WorkerTimedOut(WorkerUnavailable):
    """A worker did not answer before the call's deadline."""


class TLSHandshakeFailed(WorkerUnavailable):
    """The TLS handshake with a worker failed: its certificate is not signed by
    ``network.tls.ca_file``, does not name its host, or the worker does not serve TLS."""


_HANDSHAKE_PREFIX = "TLS handshake failed"
# What gRPC's details say when the client side of a TLS handshake failed.
_HANDSHAKE_MARKERS = (
    "handshake failed",
    "certificate_verify_failed",
    "wrong_version_number",
    "hostname verification",
)
# What grpc answers past a server's maximum_concurrent_rpcs.
_RPC_LIMIT_MARKER = "concurrent rpc limit"


def _handshake_failure(detail: str) -> str | None:
    """The message of a failed TLS handshake, from gRPC's details; None for another error."""
    lowered = detail.lower()
    if lowered.startswith(_HANDSHAKE_PREFIX.lower()):
        return detail  # relayed from a stage further down, already in these words
    if not any(marker in lowered for marker in _HANDSHAKE_MARKERS):
        return None
    if "wrong_version_number" in lowered:
        reason = "the worker does not serve TLS (is network.tls in its configuration?)"
    elif "hostname verification" in lowered:
        reason = (
            "its certificate does not name the host the configuration gives it (make it "
            "again for that host: mlx-relay certs)"
        )
    elif "certificate_verify_failed" in lowered:
        why = detail.split("CERTIFICATE_VERIFY_FAILED", 1)[-1].strip(": ").split(":")[0]
        reason = (
            f"its certificate did not verify ({why or 'untrusted'}): is network.tls.ca_file "
            "the CA that signed it?"
        )
    else:
        reason = f"{detail} (see network.tls)"
    return f"{_HANDSHAKE_PREFIX}: {reason}"


def translate_rpc_error(
    device_id: str, method: str, exc: grpc.aio.AioRpcError, timeout: float | None = None
) -> RelayError:
    """The typed error for a failed call: unreachable or too slow -> WorkerUnavailable,
    RESOURCE_EXHAUSTED -> QueueFull, anything else -> StageError."""
    code = exc.code()
    detail = exc.details() or code.name
    if code == grpc.StatusCode.UNAVAILABLE:
        failure = _handshake_failure(detail)
        if failure is not None:
            return TLSHandshakeFailed(_failed_device(exc) or device_id, failure)
    relayed = _failed_device(exc)
    if relayed is not None and relayed != device_id:
        # A stage further down the route failed: name it, with its own reason.
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return WorkerTimedOut(relayed, detail)
        if code == grpc.StatusCode.UNAVAILABLE:
            return WorkerUnavailable(relayed, detail)
        device_id = relayed
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        within = f" within {timeout:g} s" if timeout else ""
        return WorkerTimedOut(device_id, f"no answer to {method}{within} (deadline exceeded)")
    if code == grpc.StatusCode.UNAVAILABLE:
        return WorkerUnavailable(device_id, f"{method} failed: unreachable ({detail})")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        if "larger than max" in detail:
            # gRPC's own message size limit, not a full worker (a relayed failure already
            # carries the hint from the hop that saw it).
            hint = "" if "network.max_message_mb" in detail else " (see network.max_message_mb)"
            return StageError(device_id, method, code.name, f"{detail}{hint}")
        if _RPC_LIMIT_MARKER in detail.lower() and "maximum_concurrent_rpcs" not in detail:
            detail += " (network.maximum_concurrent_rpcs)"
        return QueueFull(f"worker {device_id!r} is full: {detail}")
    return StageError(device_id, method, code.name, detail)


def answered_error(answer: relay_pb2.ForwardAnswer) -> grpc.aio.AioRpcError:
    """A streamed call's failure as the error its unary call would have raised."""
    code = getattr(grpc.StatusCode, answer.code, grpc.StatusCode.UNKNOWN)
    trailing = grpc.aio.Metadata()
    if answer.failed_device:
        trailing.add(FAILED_DEVICE_KEY, answer.failed_device)
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details=answer.detail)


def _failed_device(exc: grpc.aio.AioRpcError) -> str | None:
    for key, value in exc.trailing_metadata() or ():
        if key == FAILED_DEVICE_KEY:
            return str(value)
    return None
