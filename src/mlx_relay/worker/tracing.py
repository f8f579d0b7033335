"""A worker's own spans of one ``Forward``: per traced entry (each request is its own
trace), a server span under the caller's span (the entry's ``traceparent``, else the call's
metadata), its check, queue wait, compute (with encode or sample) and the call to the next
stage. An entry without trace context gets no spans.

Only a worker with a tracer provider (``tracing.otlp_endpoint``, or one handed in) makes
spans; every worker reports the same times in its answer's
:class:`~mlx_relay.proto.relay_pb2.StageTiming`, which is what the coordinator's trace store
reads.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from mlx_relay.core.tracing import TRACEPARENT, epoch_ns, in_context, parent_context, traceparent
from mlx_relay.proto import relay_pb2 as pb


def metadata_traceparent(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    """The ``traceparent`` of a call's invocation metadata, or ``""``."""
    for key, value in metadata or ():
        if key == TRACEPARENT:
            return value.decode() if isinstance(value, bytes) else str(value)
    return ""


class ForwardSpans:
    """The spans of one Forward's entries on this stage (see the module docstring)."""

    def __init__(
        self,
        tracer: Tracer,
        device_id: str,
        stage: int,
        request: pb.ForwardRequest,
        call_parent: str,
        received: float,
    ) -> None:
        self._tracer = tracer
        self._device_id = device_id
        self._stage = stage
        self._received = received
        self._servers: list[Span | None] = []  # one per entry, None when untraced
        self._hops: list[Span] = []
        size = len(request.entries)
        for entry in request.entries:
            parent = parent_context(entry.traceparent or call_parent)
            if parent is None:  # an untraced request (its coordinator keeps no traces)
                self._servers.append(None)
                continue
            self._servers.append(
                tracer.start_span(
                    f"stage {stage} forward",
                    context=parent,
                    kind=SpanKind.SERVER,
                    start_time=epoch_ns(received),
                    attributes={
                        "rpc.system": "grpc",
                        "rpc.method": "Forward",
                        "mlx_relay.stage.index": stage,
                        "mlx_relay.stage.device": device_id,
                        "mlx_relay.request.id": entry.request_id,
                        "mlx_relay.batch.size": size,
                    },
                )
            )

    @property
    def traced(self) -> bool:
        """Whether any entry carries trace context."""
        return any(server is not None for server in self._servers)

    def hop_parents(self, next_device: str) -> list[str]:
        """Start each traced entry's call to the next stage; the ``traceparent`` of each,
        for the next stage's entries (``""`` for an untraced one)."""
        now = epoch_ns(time.perf_counter())
        parents = []
        for server in self._servers:
            if server is None:
                parents.append("")
                continue
            hop = self._tracer.start_span(
                f"Forward {next_device}",
                context=in_context(server),
                kind=SpanKind.CLIENT,
                start_time=now,
                attributes={
                    "rpc.system": "grpc",
                    "rpc.method": "Forward",
                    "server.address": next_device,
                },
            )
            self._hops.append(hop)
            parents.append(traceparent(hop.get_span_context()))
        return parents

    def close(self, timing: pb.StageTiming | None, error: str | None = None) -> None:
        """The call is answered: its spans end now, and are made right after the answer
        has left (:meth:`finish`, scheduled on the running loop), not before it."""
        ended = time.perf_counter()
        asyncio.get_running_loop().call_soon(self.finish, timing, error, ended)

    def finish(
        self, timing: pb.StageTiming | None, error: str | None = None, ended: float | None = None
    ) -> None:
        """End every span at ``ended`` (default now): the parts of the stage's time (from
        ``timing``) as children of each server span, then the calls to the next stage and
        the server spans."""
        end = epoch_ns(ended if ended is not None else time.perf_counter())
        for hop in self._hops:
            if error is not None:
                hop.set_status(Status(StatusCode.ERROR, error))
            hop.end(end_time=end)
        for server in self._servers:
            if server is None:
                continue
            if timing is not None:
                self._parts(server, timing)
            if error is not None:
                server.set_status(Status(StatusCode.ERROR, error))
                server.set_attribute("error.type", error)
            server.end(end_time=end)

    def _parts(self, server: Span, timing: pb.StageTiming) -> None:
        context = in_context(server)
        cursor = self._received
        parts = (("check", timing.check_seconds), ("queue wait", timing.queue_seconds))
        for name, seconds in parts:
            if seconds > 0:
                self._retro(name, context, cursor, cursor + seconds)
                cursor += seconds
        compute_end = cursor + timing.compute_seconds
        compute = self._retro("compute", context, cursor, compute_end, end=False)
        inner = in_context(compute)
        if timing.encode_seconds > 0:
            self._retro("encode", inner, compute_end - timing.encode_seconds, compute_end)
        if timing.sample_seconds > 0:
            self._retro("sample", inner, compute_end - timing.sample_seconds, compute_end)
        compute.end(end_time=epoch_ns(compute_end))

    def _retro(
        self, name: str, context: object, start: float, stop: float, end: bool = True
    ) -> Span:
        span = self._tracer.start_span(
            name,
            context=context,  # type: ignore[arg-type]
            start_time=epoch_ns(start),
            attributes={"mlx_relay.stage.device": self._device_id},
        )
        if end:
            span.end(end_time=epoch_ns(stop))
        return span
