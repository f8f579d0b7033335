"""Stage-to-stage relay: a stage sends its hidden states straight to the next stage.

A ``Forward`` that carries a route (the stages still to run, in order) is relayed: the stage
computes its layers, releases the MLX thread, calls the route's first hop with its hidden
states and the route's rest, and answers with that hop's results (the last stage's sampled
tokens). Each hop is a :class:`~mlx_relay.worker_client.WorkerClient` call with the same
limits as the coordinator's: the caller's remaining deadline less a margin (so the failing
stage is named before the caller's own deadline passes), the bearer token, TLS (the next
stage verified against the cluster's CA, this worker's certificate presented), the message
size limit, no retry, and per-call metrics in this worker's collector (its outgoing link).

A downstream failure goes back up the chain with its status code and the failing stage's
device id in the trailing metadata (or the stream's answer);
:func:`~mlx_relay.worker_client.translate_rpc_error`
turns it back into the same typed error, naming that stage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import grpc

from mlx_relay.core.config import NetworkConfig
from mlx_relay.core.errors import InvalidRequest, QueueFull, RelayError, WorkerUnavailable
from mlx_relay.core.tls_config import TLSMaterial
from mlx_relay.proto import relay_pb2 as pb
from mlx_relay.worker.forward_call import CallFailed
from mlx_relay.worker_client import StageError, WorkerClient, WorkerTimedOut

logger = logging.getLogger(__name__)

# Share of the remaining deadline a hop keeps for answering its caller, and its floor (s).
DEADLINE_MARGIN_SHARE = 0.1
DEADLINE_MARGIN_MIN = 0.05
# Longest wait for the channel to the next stage to reconnect before a hop (s): the
# client's longest reconnect backoff.
RECONNECT_WAIT = 1.0


def hop_timeout(remaining: float | None, default: float) -> float:
    """The deadline of the next hop's call: what the caller left, less a margin."""
    if remaining is None:
        return default
    margin = max(DEADLINE_MARGIN_MIN, remaining * DEADLINE_MARGIN_SHARE)
    return max(0.001, min(default, remaining - margin))


class PeerClients:
    """One client per next-stage peer of this worker, created on first use.

    Args:
        device_id: this worker.
        next_stage: the device ids of the next stage's workers in the config (its
            replicas; none on the last stage): the only hops a route may name.
        network: deadlines, size limit and token of every hop.
        recorder: this worker's collector (the outgoing link's metrics), or None.
        tls: this worker's CA, certificate and key: a hop verifies the next stage against
            the CA and presents this worker's certificate; None for plaintext.
    """

    def __init__(
        self,
        device_id: str,
        next_stage: Sequence[str],
        network: NetworkConfig,
        recorder: Any | None = None,
        tls: TLSMaterial | None = None,
    ) -> None:
        self.device_id = device_id
        self.next_stage = tuple(next_stage)
        self.network = network
        self._recorder = recorder
        self._tls = tls
        self._clients: dict[tuple[str, str], WorkerClient] = {}

    def client(self, hop: pb.Hop) -> WorkerClient:
        """The client of ``hop``.

        Raises:
            InvalidRequest: the hop is not this worker's next stage.
        """
        if hop.device_id not in self.next_stage or not hop.address:
            allowed = " or ".join(repr(d) for d in self.next_stage) or "(none: the last)"
            raise InvalidRequest(
                f"route: worker {self.device_id} relays only to its next stage "
                f"{allowed}, got {hop.device_id!r} at {hop.address!r}"
            )
        key = (hop.device_id, hop.address)
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = WorkerClient(
                hop.device_id, hop.address, self.network, recorder=self._recorder, tls=self._tls
            )
        return client

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.close()


def next_entries(
    entries: Sequence[pb.ForwardEntry],
    results: Sequence[pb.ForwardResult],
    parents: Sequence[str] | None = None,
) -> list[pb.ForwardEntry]:
    """The next stage's entries: each entry with this stage's output as its tensor, and
    its trace context (``parents``, this stage's call spans, else the one it came with)."""
    contexts = parents if parents is not None else [e.traceparent for e in entries]
    return [
        pb.ForwardEntry(
            request_id=entry.request_id,
            position=entry.position,
            tensor=result.tensor,
            sampling=entry.sampling,
            step=entry.step,
            traceparent=parent,
        )
        for entry, result, parent in zip(entries, results, contexts, strict=True)
    ]


async def relay(
    peers: PeerClients,
    request: pb.ForwardRequest,
    own: pb.ForwardResponse,
    remaining: float | None,
    collector: Any | None = None,
    received: float | None = None,
    parents: Sequence[str] | None = None,
) -> pb.ForwardResponse:
    """Send this stage's output down the route; the last stage's answer, with every
    stage's timing in pipeline order. ``remaining``: seconds left of the caller's deadline
    (None: none). ``received`` is when this stage got its call
    (``time.perf_counter()``): the next stage's timing says how long after it the hop began.
    ``parents``: each entry's trace context for the next stage (see :func:`next_entries`);
    the call's metadata carries the first one's.

    Raises:
        RelayError: the hop failed (see :func:`failure_for`).
    """
    hop, rest = request.route[0], request.route[1:]
    client = peers.client(hop)
    timeout = hop_timeout(remaining, peers.network.request_timeout)
    started = time.perf_counter()
    # A next stage that was restarted is reached once the channel's backoff is over: wait
    # for it (a dead one still fails at once after that) rather than fail the step. Also
    # with recovery off (network.recovery_timeout: 0): a request sent once the stage is
    # back must not fail on this worker's channel still waiting out its backoff.
    await client.connected(min(RECONNECT_WAIT, timeout / 2))
    timeout = max(0.001, timeout - (time.perf_counter() - started))
    entries = next_entries(request.entries, own.results, parents)
    reply = await client.forward(
        pb.ForwardRequest(
            entries=entries,
            route=rest,
            layer_start=hop.layer_start,
            layer_end=hop.layer_end,
            microbatches_in_flight=request.microbatches_in_flight,
        ),
        timeout=timeout,
        traceparent=entries[0].traceparent if entries else "",
    )
    rpc_seconds = time.perf_counter() - started
    stages = list(reply.stages) or [
        pb.StageTiming(device_id=reply.device_id, compute_seconds=reply.compute_seconds)
    ]
    stages[0].rpc_seconds = rpc_seconds
    if received is not None:
        stages[0].called_offset_seconds = max(0.0, started - received)
    if collector is not None:
        collector.record_transfer(hop.device_id, max(0.0, rpc_seconds - _inner(stages)))
    return pb.ForwardResponse(
        results=reply.results,
        device_id=reply.device_id,
        compute_seconds=reply.compute_seconds,
        stages=[*own.stages, *stages],
    )


def _inner(stages: Sequence[pb.StageTiming]) -> float:
    """Time the first of ``stages`` spent answering: its compute plus its own hop's call."""
    first = stages[0].compute_seconds
    return first + (stages[1].rpc_seconds if len(stages) > 1 else 0.0)


def failure_for(exc: RelayError, device_id: str) -> CallFailed:
    """The status a call ends with when its hop failed: the same code, the failing stage
    named (the trailing metadata of a unary call, the answer on the stream)."""
    failed = getattr(exc, "device_id", None) or device_id
    if isinstance(exc, WorkerTimedOut):
        code = grpc.StatusCode.DEADLINE_EXCEEDED
    elif isinstance(exc, WorkerUnavailable):
        code = grpc.StatusCode.UNAVAILABLE
    elif isinstance(exc, QueueFull):
        code = grpc.StatusCode.RESOURCE_EXHAUSTED
    elif isinstance(exc, StageError):
        code = getattr(grpc.StatusCode, exc.code, grpc.StatusCode.UNKNOWN)
    else:
        code = grpc.StatusCode.INTERNAL
    logger.info("relay to %s failed with %s: %s", failed, code.name, exc)
    detail = exc.detail if isinstance(exc, StageError) else _reason(str(exc), failed)
    return CallFailed(code, detail, failed)


def _reason(message: str, device_id: str) -> str:
    prefix = f"worker {device_id!r}: "
    return message[len(prefix) :] if message.startswith(prefix) else message
