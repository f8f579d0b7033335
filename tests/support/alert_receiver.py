"""A real webhook receiver for alert notifications: a FastAPI app on uvicorn, port 0.

async with alert_receiver() as receiver:
    config = {"receivers": [{"name": "test", "url": receiver.url, ...}]}
    ...
    payload = await receiver.wait_for(lambda p: p["status"] == "resolved")
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request

from mlx_relay.core.http_server import HTTPServer

Payload = dict[str, Any]


@dataclass
class AlertReceiver:
    http: HTTPServer
    payloads: list[Payload] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"{self.http.url}/hook"

    async def wait_for(self, match: Callable[[Payload], bool], timeout: float = 60.0) -> Payload:
        """The first payload (already received or still to come) for which ``match`` holds."""

        async def first() -> Payload:
            while True:
                for payload in self.payloads:
                    if match(payload):
                        return payload
                self.arrived.clear()
                await self.arrived.wait()

        try:
            return await asyncio.wait_for(first(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"no matching notification within {timeout}s; received: {self.payloads!r}"
            ) from None


def alerts_named(payload: Payload, alertname: str, **labels: str) -> list[dict[str, Any]]:
    """The entries of ``payload['alerts']`` of one alert name with the given labels."""
    return [
        entry
        for entry in payload.get("alerts", [])
        if entry["labels"].get("alertname") == alertname
        and all(entry["labels"].get(k) == v for k, v in labels.items())
    ]


@contextlib.asynccontextmanager
async def alert_receiver() -> AsyncIterator[AlertReceiver]:
    app = FastAPI()
    receiver = AlertReceiver(HTTPServer(app, "127.0.0.1", 0, name="alert-receiver"))

    @app.post("/hook")
    async def hook(request: Request) -> dict[str, str]:
        body = await request.json()
        receiver.payloads.append(body)
        receiver.arrived.set()
        return {"status": "ok"}

    await receiver.http.start()
    try:
        yield receiver
    finally:
        await receiver.http.stop()
