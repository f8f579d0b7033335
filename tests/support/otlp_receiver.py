"""A real OTLP/HTTP traces receiver: a FastAPI app on uvicorn, port 0, decoding each
``ExportTraceServiceRequest`` with ``opentelemetry-proto``.

async with otlp_receiver() as receiver:
    config = {"tracing": {"otlp_endpoint": receiver.url}}
    ...
    spans = await receiver.wait_for(lambda spans: len(spans) >= 10)
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import FastAPI, Request, Response
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from mlx_relay.core.http_server import HTTPServer

PATH = "/v1/traces"


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as it arrived: its service (the resource's ``service.instance.id``)."""

    service: str
    instance: str
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    attributes: dict[str, object]


@dataclass
class OTLPReceiver:
    http: HTTPServer
    spans: list[ReceivedSpan] = field(default_factory=list)
    requests: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"{self.http.url}{PATH}"

    async def wait_for(
        self, done: Callable[[list[ReceivedSpan]], bool], timeout: float = 60.0
    ) -> list[ReceivedSpan]:
        async def until() -> list[ReceivedSpan]:
            while not done(self.spans):
                self.arrived.clear()
                await self.arrived.wait()
            return self.spans

        try:
            return await asyncio.wait_for(until(), timeout)
        except TimeoutError:
            names = sorted({(s.instance, s.name) for s in self.spans})
            raise AssertionError(f"not received within {timeout}s; got {names}") from None


def _value(any_value: object) -> object:
    kind = any_value.WhichOneof("value")  # type: ignore[attr-defined]
    if kind is None:
        return None
    value = getattr(any_value, kind)
    if kind == "array_value":
        return [_value(v) for v in value.values]
    return value


def decode(body: bytes) -> list[ReceivedSpan]:
    """The spans of one ``ExportTraceServiceRequest``."""
    request = ExportTraceServiceRequest.FromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        service=str(resource.get("service.name", "")),
                        instance=str(resource.get("service.instance.id", "")),
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_id=span.parent_span_id.hex(),
                        name=span.name,
                        attributes={a.key: _value(a.value) for a in span.attributes},
                    )
                )
    return spans


@contextlib.asynccontextmanager
async def otlp_receiver() -> AsyncIterator[OTLPReceiver]:
    app = FastAPI()
    holder: list[OTLPReceiver] = []

    @app.post(PATH)
    async def export(request: Request) -> Response:
        body = await request.body()
        if request.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        receiver = holder[0]
        receiver.spans.extend(decode(body))
        receiver.requests += 1
        receiver.arrived.set()
        return Response(
            ExportTraceServiceResponse().SerializeToString(),
            media_type="application/x-protobuf",
        )

    async with HTTPServer(app, host="127.0.0.1", port=0) as server:
        receiver = OTLPReceiver(server)
        holder.append(receiver)
        yield receiver
