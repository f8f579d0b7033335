"""The live WebSocket with real clients: snapshot on connect, updates, and isolation of a
stalled client."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import websockets

from mlx_relay.monitoring.api.views import LiveUpdate
from mlx_relay.monitoring.dashboard import MonitoringDashboard
from mlx_relay.monitoring.device import DeviceSampler
from mlx_relay.monitoring.metrics import MetricsCollector
from tests.support.dashboard_cluster import (
    PROMPT_MARKER,
    dashboard_cluster,
    run_requests,
    wait_for,
)


async def _receive(connection: Any, timeout: float = 10.0) -> LiveUpdate:
    text = await asyncio.wait_for(connection.recv(), timeout)
    assert PROMPT_MARKER not in text
    return LiveUpdate.model_validate(json.loads(text))


async def test_snapshot_on_connect_then_updates_with_the_new_request_count(
    tiny_model_dir: Path,
) -> None:
    async with (
        dashboard_cluster(tiny_model_dir, update_interval=0.1) as env,
        websockets.connect(env.ws_url) as connection,
    ):
        first = await _receive(connection)
        assert first.type == "snapshot"
        assert first.snapshot.device_id == "coordinator"
        assert first.snapshot.inference.requests_total == 0
        assert {d.device_id for d in first.health.devices} == {
            "coordinator",
            "worker-0",
            "worker-1",
        }

        generated = await run_requests(env, 2, max_tokens=3)
        update = await _receive(connection)
        # Updates already queued may predate the last tokens' counting: read on until the
        # counts catch up with what the clients got (each _receive is bounded in time).
        while (
            update.snapshot.inference.requests_total < 2
            or update.snapshot.inference.generation_tokens_total < generated
        ):
            previous = update.sequence
            update = await _receive(connection)
            assert update.sequence > previous
        assert update.type == "update"
        assert update.snapshot.inference.requests_total == 2
        assert update.snapshot.inference.generation_tokens_total == generated
        assert update.sequence > first.sequence


def _stalled_websocket(url: str) -> socket.socket:
    """A WebSocket handshake over a raw socket with a tiny receive buffer, then no reading:
    the server's sends to it block once the kernel buffers are full."""
    parts = urlsplit(url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((parts.hostname, parts.port))
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    sock.sendall(request.encode())
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


async def test_a_stalled_client_does_not_delay_another_client() -> None:
    collector = MetricsCollector("coordinator", 0.05, role="coordinator")
    # Chart history makes each update a few tens of KB, so the stall comes quickly.
    sample = DeviceSampler().sample()
    for _ in range(300):
        collector.record_device_sample(sample)
    dashboard = MonitoringDashboard(collector, None, port=0, update_interval=0.02)
    await dashboard.start()
    ws_url = f"ws://127.0.0.1:{dashboard.port}/ws"
    stalled = await asyncio.to_thread(_stalled_websocket, ws_url)
    try:
        async with websockets.connect(ws_url, max_size=None) as reader:
            await _receive(reader)
            broadcaster = dashboard.context.broadcaster

            def stalled_client_dropping() -> bool:
                return any(c.dropped > 0 for c in broadcaster.clients())

            await wait_for(stalled_client_dropping, timeout=30, what="the stalled client to lag")
            # The stalled client's sender is blocked; the reader must still get every tick.
            with collector.track_request(prompt_tokens=3) as trace:
                trace.token(5)
            update = await _receive(reader)
            while update.snapshot.inference.requests_total < 1:
                update = await _receive(reader, timeout=5)
            assert update.snapshot.inference.generation_tokens_total == 5
            sequences = [update.sequence]
            for _ in range(5):
                sequences.append((await _receive(reader, timeout=5)).sequence)
            assert sequences == sorted(sequences)
            reader_stats, stalled_stats = sorted(broadcaster.clients(), key=lambda c: c.dropped)
            assert stalled_stats.dropped > 0
            assert reader_stats.sent > stalled_stats.sent
    finally:
        stalled.close()
        await dashboard.stop()


async def test_disconnected_clients_are_removed() -> None:
    collector = MetricsCollector("coordinator", 0.05, role="coordinator")
    dashboard = MonitoringDashboard(collector, None, port=0, update_interval=0.05)
    await dashboard.start()
    try:
        url = f"ws://127.0.0.1:{dashboard.port}/ws"
        async with websockets.connect(url) as one, websockets.connect(url) as two:
            await _receive(one)
            await _receive(two)
            assert len(dashboard.context.broadcaster.clients()) == 2
        await wait_for(
            lambda: not dashboard.context.broadcaster.clients(), what="clients to be removed"
        )
    finally:
        await dashboard.stop()


async def test_stopping_the_server_closes_live_clients() -> None:
    collector = MetricsCollector("coordinator", 0.05, role="coordinator")
    dashboard = MonitoringDashboard(collector, None, port=0, update_interval=0.05)
    await dashboard.start()
    url = f"ws://127.0.0.1:{dashboard.port}/ws"
    try:
        async with websockets.connect(url) as connection:
            await _receive(connection)
            await asyncio.wait_for(dashboard.stop(), timeout=10)
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    await asyncio.wait_for(connection.recv(), 5)
    finally:
        await dashboard.stop()
