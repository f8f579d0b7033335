"""Input limits on a real server: body size (413), message count and stop length (400 naming
the parameter), prompt bytes checked before tokenizing, and tokenizing off the event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from mlx_relay.coordinator.orchestrator import TOKENIZER_THREAD
from tests.integration.test_openai_api import Served, serve_cluster
from tests.integration.test_openai_errors import assert_error

pytestmark = pytest.mark.asyncio(loop_scope="module")

MAX_BODY = 64 * 1024
MAX_PROMPT_BYTES = 16 * 1024
MAX_MESSAGES = 8
MAX_STOP = 32


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def served(tiny_model_dir: Path) -> AsyncIterator[Served]:
    async with serve_cluster(
        tiny_model_dir,
        http={"max_body_bytes": MAX_BODY},
        inference={
            "max_prompt_bytes": MAX_PROMPT_BYTES,
            "max_messages": MAX_MESSAGES,
            "max_stop_length": MAX_STOP,
        },
    ) as served:
        yield served


@pytest_asyncio.fixture(loop_scope="module")
async def raw(served: Served) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=served.url, timeout=60) as c:
        yield c


def chat(served: Served, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": served.model, "max_tokens": 2}
    body.setdefault("messages", [{"role": "user", "content": "Hello"}])
    body.update(fields)
    return body


async def test_a_body_over_the_cap_is_413_in_openai_shape(
    served: Served, raw: httpx.AsyncClient
) -> None:
    huge = chat(served, messages=[{"role": "user", "content": "x" * MAX_BODY}])
    announced = await raw.post("/v1/chat/completions", json=huge)
    error = assert_error(announced, 413, None)
    assert error["code"] == "request_too_large" and str(MAX_BODY) in error["message"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: read up to the cap
        for _ in range(MAX_BODY // 1024 + 2):
            yield b" " * 1024

    chunked = await raw.post(
        "/v1/completions", content=chunks(), headers={"content-type": "application/json"}
    )
    assert assert_error(chunked, 413, None)["code"] == "request_too_large"
    # Under the cap, the same server answers as usual.
    assert (await raw.post("/v1/chat/completions", json=chat(served))).status_code == 200


async def test_too_many_messages_or_a_long_stop_is_400_naming_it(
    served: Served, raw: httpx.AsyncClient
) -> None:
    many = [{"role": "user", "content": "hi"}] * (MAX_MESSAGES + 1)
    response = await raw.post("/v1/chat/completions", json=chat(served, messages=many))
    assert f"at most {MAX_MESSAGES}" in assert_error(response, 400, "messages")["message"]
    long_stop = chat(served, stop=["ok", "s" * (MAX_STOP + 1)])
    response = await raw.post("/v1/chat/completions", json=long_stop)
    assert (
        f"has {MAX_STOP + 1} characters; at most {MAX_STOP}"
        in assert_error(response, 400, "stop")["message"]
    )
    fits = [{"role": "user", "content": "hi"}] * MAX_MESSAGES
    ok = await raw.post(
        "/v1/chat/completions", json=chat(served, messages=fits, stop="s" * MAX_STOP)
    )
    assert ok.status_code == 200, ok.text


async def test_a_prompt_over_the_byte_cap_is_refused_before_tokenizing(
    served: Served, raw: httpx.AsyncClient
) -> None:
    orchestrator = served.cluster.orchestrator
    tokenizer = orchestrator.tokenizer
    calls: list[str] = []
    orchestrator.tokenizer = Recording(tokenizer, calls)
    try:
        text = "é" * (MAX_PROMPT_BYTES // 2 + 1)  # 2 bytes each: just over the cap
        completion = {"model": served.model, "prompt": text, "max_tokens": 2}
        response = await raw.post("/v1/completions", json=completion)
        assert f"at most {MAX_PROMPT_BYTES} are" in assert_error(response, 400, "prompt")["message"]
        messages = [{"role": "user", "content": text}]
        response = await raw.post("/v1/chat/completions", json=chat(served, messages=messages))
        assert "bytes" in assert_error(response, 400, "messages")["message"]
        assert calls == []  # the tokenizer never saw either prompt
    finally:
        orchestrator.tokenizer = tokenizer


class Recording:
    """A tokenizer that records the thread of each encode and chat template, and may hold
    one call until released."""

    def __init__(self, tokenizer: Any, calls: list[str], hold: threading.Event | None = None):
        self._tokenizer = tokenizer
        self._calls = calls
        self._hold = hold
        self.entered = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def _enter(self) -> None:
        self._calls.append(threading.current_thread().name)
        self.entered.set()
        if self._hold is not None:
            self._hold.wait(timeout=10)

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        self._enter()
        return self._tokenizer.encode(*args, **kwargs)

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        self._enter()
        return self._tokenizer.apply_chat_template(*args, **kwargs)


@pytest.mark.parametrize("stream", [False, True])
async def test_tokenizing_runs_off_the_event_loop(
    served: Served, raw: httpx.AsyncClient, stream: bool
) -> None:
    """While one request's chat template is held mid-render, the same event loop answers
    /health and lists the models; then the held request completes."""
    orchestrator = served.cluster.orchestrator
    tokenizer = orchestrator.tokenizer
    calls: list[str] = []
    hold = threading.Event()
    recording = Recording(tokenizer, calls, hold)
    orchestrator.tokenizer = recording
    try:
        held = asyncio.create_task(
            raw.post("/v1/chat/completions", json=chat(served, stream=stream))
        )
        assert await asyncio.to_thread(recording.entered.wait, 30)
        # The tokenizer is busy with the held request: the loop still serves others.
        assert (await raw.get("/health")).status_code == 200
        assert (await raw.get("/v1/models")).json()["data"][0]["id"] == served.model
        assert not held.done()
        hold.set()
        response = await held
        assert response.status_code == 200, response.text
    finally:
        hold.set()
        orchestrator.tokenizer = tokenizer
    assert calls and all(name.startswith(TOKENIZER_THREAD) for name in calls), calls
    assert threading.main_thread().name not in calls
