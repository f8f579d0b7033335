"""A streaming client that stops reading: its request pauses on the coordinator (no decode
step, so the tokens generated stay bounded), and after ``http.stream_stall_timeout`` it is
dropped, freeing its batch slot and its KV cache on every stage. Other requests keep being
served meanwhile, with the same tokens as before.

The stalled client is a real TCP socket with a small receive buffer (and the server's
accepted sockets get a small send buffer, so that the kernel does not hold megabytes of
chunks on loopback)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx

from mlx_relay.coordinator.pipeline import RequestRun
from mlx_relay.core.http_server import HTTPServer
from mlx_relay.server.app import AppServices, create_app
from tests.support.cluster import LocalCluster, kv_sessions, local_cluster

BUFFER_TOKENS = 8
STALL_TIMEOUT = 4.0
MAX_TOKENS = 400
SMALL_BUFFER = 4096


@contextlib.asynccontextmanager
async def served(model_dir: Path) -> AsyncIterator[tuple[LocalCluster, HTTPServer]]:
    async with local_cluster(
        model_dir,
        2,
        inference={"stream_buffer_tokens": BUFFER_TOKENS},
        http={"stream_stall_timeout": STALL_TIMEOUT},
    ) as cluster:
        app = create_app(AppServices(config=cluster.config, orchestrator=cluster.orchestrator))
        async with HTTPServer(app) as server:
            # Accepted connections inherit the listening socket's send buffer size.
            listener = server._socket
            assert listener is not None
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
            yield cluster, server


def chat_body(model: str, content: str, *, stream: bool, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }


async def open_stalled_stream(port: int, body: dict[str, Any]) -> tuple[socket.socket, bytes]:
    """POST a streamed request on a raw socket with a small receive buffer, read the start
    of the answer, then read nothing more."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    payload = json.dumps(body).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    await loop.sock_sendall(sock, head.encode() + payload)
    first = await asyncio.wait_for(loop.sock_recv(sock, 256), 30)
    assert first.startswith(b"HTTP/1.1 200"), first
    return sock, first


async def read_to_end(sock: socket.socket, timeout: float, end: bytes | None = None) -> bytes:
    """What the socket receives until the server closes it (or until ``end`` arrives)."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    async with asyncio.timeout(timeout):
        while chunk := await loop.sock_recv(sock, 65536):
            data += chunk
            if end is not None and data.endswith(end):
                break
    return bytes(data)


async def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def others(client: httpx.AsyncClient, model: str) -> list[str]:
    """Two greedy requests, one streamed, one not: their texts."""
    body = chat_body(model, "What is the capital of France?", stream=False, max_tokens=24)
    plain = (await client.post("/v1/chat/completions", json=body)).json()
    texts = [plain["choices"][0]["message"]["content"]]
    parts = []
    async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                delta = json.loads(line.removeprefix("data: "))["choices"][0]["delta"]
                parts.append(delta.get("content", ""))
    texts.append("".join(parts))
    return texts


async def test_a_client_that_stops_reading_pauses_then_is_dropped(tiny_model_dir: Path) -> None:
    async with served(tiny_model_dir) as (cluster, server):
        orchestrator = cluster.orchestrator
        model = orchestrator.model_info.name if orchestrator.model_info else ""
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            before = await others(client, model)
            body = chat_body(model, "Tell me a long story.", stream=True, max_tokens=MAX_TOKENS)
            # Large chunks (each token with its 20 likeliest alternatives), so that the
            # server's own write buffer holds few of them.
            body.update(logprobs=True, top_logprobs=20)
            sock, _ = await open_stalled_stream(server.port, body)
            try:
                runs: list[RequestRun] = []

                def paused() -> bool:
                    runs[:] = [r for r in orchestrator._tracker.runs if r.paused]
                    return bool(runs)

                await wait_until(paused, 30, "the stalled request to pause")
                stalled_at = time.monotonic()
                run = runs[0]
                generated = len(run.outcome.token_ids)
                # Paused: other requests are served, with the tokens they had before.
                during = await others(client, model)
                assert during == before
                assert await kv_sessions(cluster.config) == [1, 1]
                # Bounded: the paused request took no step meanwhile.
                assert len(run.outcome.token_ids) == generated
                assert generated < MAX_TOKENS - 100, generated
                # Dropped after the stall timeout: slot and KV caches freed on every stage.
                await wait_until(
                    lambda: orchestrator.running_requests == 0, 3 * STALL_TIMEOUT, "the drop"
                )
                assert time.monotonic() - stalled_at < 3 * STALL_TIMEOUT
                assert run.outcome.finish_reason == "abort"
                deadline = time.monotonic() + 10
                while (counts := await kv_sessions(cluster.config)) != [0, 0]:
                    assert time.monotonic() < deadline, counts
                    await asyncio.sleep(0.05)
                # The client that reads again gets what was sent, then the connection's end:
                # the stream was cut, never completed.
                rest = await read_to_end(sock, 10)
                assert b"data: {" in rest and b"[DONE]" not in rest
            finally:
                sock.close()
            assert await others(client, model) == before


async def test_a_slow_reader_pauses_and_resumes_and_gets_every_token(
    tiny_model_dir: Path,
) -> None:
    """A client that reads in bursts, with pauses shorter than the stall timeout, is never
    dropped: it gets the same tokens as a client that reads at once."""
    async with served(tiny_model_dir) as (cluster, server):
        orchestrator = cluster.orchestrator
        model = orchestrator.model_info.name if orchestrator.model_info else ""
        body = chat_body(model, "Tell me a long story.", stream=True, max_tokens=MAX_TOKENS)
        body.update(logprobs=True, top_logprobs=20)
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            reply = await client.post(
                "/v1/chat/completions", json={**body, "stream": False, "max_tokens": MAX_TOKENS}
            )
            expected = reply.json()["choices"][0]["message"]["content"]
        sock, data = await open_stalled_stream(server.port, body)
        loop = asyncio.get_running_loop()
        try:
            for _ in range(2):
                await wait_until(
                    lambda: any(r.paused for r in orchestrator._tracker.runs), 30, "a pause"
                )
                await asyncio.sleep(STALL_TIMEOUT / 4)
                # Read a burst: the request resumes.
                for _ in range(16):
                    data += await asyncio.wait_for(loop.sock_recv(sock, SMALL_BUFFER), 10)
            # The end of a chunked body: the last event, then the empty chunk.
            data += await read_to_end(sock, 60, end=b"0\r\n\r\n")
        finally:
            sock.close()
    events = [
        json.loads(line.removeprefix(b"data: "))
        for line in data.split(b"\n")
        if line.startswith(b"data: {")
    ]
    assert b"data: [DONE]" in data
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert text == expected
