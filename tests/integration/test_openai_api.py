"""The OpenAI-compatible API driven by the official ``openai`` client, over a real uvicorn and
a real two-worker gRPC pipeline (one per module; the tiny random model, greedy unless said)."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from openai import AsyncOpenAI

from mlx_relay.cli.chat import ChatSession, repl
from mlx_relay.core.http_server import HTTPServer
from mlx_relay.model.tokenizer import encode_prompt
from mlx_relay.server.app import AppServices, create_app
from tests.support.cluster import LocalCluster, local_cluster
from tests.support.reference import reference_tokens

pytestmark = pytest.mark.asyncio(loop_scope="module")

MESSAGES: list[Any] = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
]
PROMPT = "The quick brown fox"


@dataclass
class Served:
    url: str
    cluster: LocalCluster
    model_dir: Path

    @property
    def model(self) -> str:
        info = self.cluster.orchestrator.model_info
        assert info is not None
        return info.name

    @property
    def tokenizer(self) -> Any:
        return self.cluster.orchestrator.tokenizer


@contextlib.asynccontextmanager
async def serve_cluster(model_dir: Path, **cluster_options: Any) -> AsyncIterator[Served]:
    """A cluster of two in-process workers and the coordinator's app on a real uvicorn."""
    async with local_cluster(model_dir, 2, **cluster_options) as cluster:
        services = AppServices(config=cluster.config, orchestrator=cluster.orchestrator)
        async with HTTPServer(create_app(services)) as http:
            yield Served(http.url, cluster, model_dir)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def served(tiny_model_dir: Path) -> AsyncIterator[Served]:
    async with serve_cluster(tiny_model_dir) as served:
        yield served


@pytest_asyncio.fixture(loop_scope="module")
async def client(served: Served) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def greedy_reference(model_dir: Path, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """The tokens one process generates with the whole model (eos left out, as served)."""
    return [t.token_id for t in reference_tokens(model_dir, prompt_ids, max_tokens)]


async def test_models_lists_the_served_model(served: Served, client: AsyncOpenAI) -> None:
    models = await client.models.list()
    assert [(m.id, m.owned_by, m.object) for m in models.data] == [
        (served.model, "mlx-relay", "model")
    ]
    assert (await client.models.retrieve(served.model)).id == served.model
    async with httpx.AsyncClient(base_url=served.url) as raw:
        body = (await raw.get("/v1/models")).json()
    assert body["object"] == "list"
    assert body["data"][0]["max_model_len"] == 512  # the tiny model's context


async def test_chat_streamed_equals_whole_and_matches_single_process(
    served: Served, client: AsyncOpenAI
) -> None:
    prompt_ids = encode_prompt(served.tokenizer, messages=MESSAGES)
    expected_ids = greedy_reference(served.model_dir, prompt_ids, 12)
    # Fields a client may send that change nothing are accepted and ignored.
    whole = await client.chat.completions.create(
        model=served.model,
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,
        user="someone",
        presence_penalty=0,
        frequency_penalty=0,
        extra_body={"unknown_field": 1},
    )
    choice = whole.choices[0]
    assert whole.id.startswith("chatcmpl-") and whole.object == "chat.completion"
    assert whole.model == served.model
    assert choice.message.role == "assistant"
    assert choice.message.content == served.tokenizer.decode(expected_ids)
    assert choice.finish_reason == ("length" if len(expected_ids) == 12 else "stop")
    assert choice.logprobs is None
    assert whole.usage is not None
    assert whole.usage.prompt_tokens == len(prompt_ids)
    assert whole.usage.completion_tokens == len(expected_ids)
    assert whole.usage.total_tokens == len(prompt_ids) + len(expected_ids)

    stream = await client.chat.completions.create(
        model=served.model,
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    *with_choices, usage_chunk = chunks
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert with_choices[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in with_choices][-1] == choice.finish_reason
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert usage_chunk.choices == []
    assert usage_chunk.usage == whole.usage


async def test_completion_streamed_equals_whole_with_logprobs(
    served: Served, client: AsyncOpenAI
) -> None:
    prompt_ids = encode_prompt(served.tokenizer, prompt=PROMPT, chat=False)
    expected_ids = greedy_reference(served.model_dir, prompt_ids, 10)
    whole = await client.completions.create(
        model=served.model, prompt=PROMPT, max_tokens=10, temperature=0, logprobs=2
    )
    choice = whole.choices[0]
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert choice.text == served.tokenizer.decode(expected_ids)
    assert whole.usage is not None
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (
        len(prompt_ids),
        len(expected_ids),
    )
    logprobs = choice.logprobs
    assert logprobs is not None and logprobs.tokens is not None
    assert logprobs.tokens == [served.tokenizer.decode([t]) for t in expected_ids]
    assert logprobs.token_logprobs is not None and logprobs.top_logprobs is not None
    assert logprobs.text_offset is not None
    for token, logprob, top in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True
    ):
        assert logprob <= 0 and len(top) in (1, 2)
        assert max(top.values()) == pytest.approx(logprob)  # greedy picks the most likely
        assert top[token] == pytest.approx(logprob)
    assert logprobs.text_offset[0] == 0

    stream = await client.completions.create(
        model=served.model,
        prompt=PROMPT,
        max_tokens=10,
        temperature=0,
        logprobs=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    *with_choices, usage_chunk = chunks
    assert "".join(c.choices[0].text for c in with_choices) == choice.text
    assert with_choices[-1].choices[0].finish_reason == choice.finish_reason
    streamed_tokens = [
        token
        for c in with_choices
        if c.choices[0].logprobs is not None
        for token in c.choices[0].logprobs.tokens or []
    ]
    assert streamed_tokens == logprobs.tokens
    assert usage_chunk.usage == whole.usage


async def test_prompt_as_token_ids_equals_prompt_as_text(
    served: Served, client: AsyncOpenAI
) -> None:
    prompt_ids = encode_prompt(served.tokenizer, prompt=PROMPT, chat=False)
    as_text = await client.completions.create(
        model=served.model, prompt=PROMPT, max_tokens=6, temperature=0
    )
    as_ids = await client.completions.create(
        model=served.model, prompt=prompt_ids, max_tokens=6, temperature=0
    )
    assert as_ids.choices[0].text == as_text.choices[0].text
    assert as_ids.usage == as_text.usage


async def test_chat_logprobs_list_the_most_likely_tokens(
    served: Served, client: AsyncOpenAI
) -> None:
    response = await client.chat.completions.create(
        model=served.model,
        messages=MESSAGES,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    choice = response.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    entries = choice.logprobs.content
    assert response.usage is not None and len(entries) == response.usage.completion_tokens
    assert "".join(e.token for e in entries) == choice.message.content
    for entry in entries:
        values = [t.logprob for t in entry.top_logprobs]
        assert len(values) == 3 and values == sorted(values, reverse=True)
        assert entry.top_logprobs[0].token == entry.token
        assert entry.logprob == pytest.approx(values[0]) and entry.logprob <= 0
        assert entry.bytes == list(entry.token.encode("utf-8"))


async def test_stop_string_ends_the_text_before_it(served: Served, client: AsyncOpenAI) -> None:
    full = await client.chat.completions.create(
        model=served.model, messages=MESSAGES, max_tokens=16, temperature=0
    )
    text = full.choices[0].message.content or ""
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), f"the random model's output is too short for this test: {text!r}"
    expected = text[: text.index(stop)]

    stopped = await client.chat.completions.create(
        model=served.model, messages=MESSAGES, max_tokens=16, temperature=0, stop=stop
    )
    assert stopped.choices[0].message.content == expected
    assert stopped.choices[0].finish_reason == "stop"

    stream = await client.chat.completions.create(
        model=served.model,
        messages=MESSAGES,
        max_tokens=16,
        temperature=0,
        stop=["never appears \x00", stop],
        stream=True,
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_seed_makes_sampling_reproducible(served: Served, client: AsyncOpenAI) -> None:
    async def sample(seed: int) -> str:
        response = await client.completions.create(
            model=served.model, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=seed
        )
        return response.choices[0].text

    first = await sample(1234)
    assert await sample(1234) == first
    others = [await sample(seed) for seed in (1, 2, 3)]
    assert any(other != first for other in others)


@pytest.mark.slow
async def test_bundled_model_knows_the_capital_of_france(bundled_model_dir: Path) -> None:
    async with (
        serve_cluster(bundled_model_dir) as served,
        AsyncOpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0) as client,
    ):
        response = await client.chat.completions.create(
            model=served.model,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=8,
            temperature=0,
        )
    assert "Paris" in (response.choices[0].message.content or "")


async def test_cli_chat_streams_replies_and_keeps_the_history(
    served: Served, client: AsyncOpenAI
) -> None:
    questions = ["What is the capital of France?", "/reset", "Hello", "And of Italy?"]

    def converse() -> tuple[ChatSession, str, str]:
        inputs = iter(questions)

        def read(prompt: str) -> str:
            try:
                return next(inputs)
            except StopIteration:
                raise EOFError from None

        out, err = io.StringIO(), io.StringIO()
        with ChatSession(served.url, max_tokens=6, temperature=0) as session:
            repl(session, read, out, err)
        return session, out.getvalue(), err.getvalue()

    # The CLI is synchronous; the server runs on this event loop.
    session, out, err = await asyncio.to_thread(converse)
    assert session.model == served.model
    assert [m["content"] for m in session.messages if m["role"] == "user"] == questions[2:]
    first = await client.chat.completions.create(
        model=served.model,
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=6,
        temperature=0,
    )
    assert session.messages[1] == {"role": "assistant", "content": first.choices[0].message.content}
    assert first.choices[0].message.content in out
    assert err.count(" tokens in ") == 3 and "(conversation cleared)" in err
