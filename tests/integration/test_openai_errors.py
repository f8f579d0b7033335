"""Errors of the OpenAI-compatible API: each with OpenAI's status and body shape, raised as the
right exception by the official client. One server with a bearer token and a queue of one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio
from openai import AsyncOpenAI

from mlx_relay.cli.chat import ChatError, ChatSession
from mlx_relay.coordinator.orchestrator import DistributedOrchestrator
from mlx_relay.core.config import ClusterConfig
from mlx_relay.core.http_server import HTTPServer
from mlx_relay.server.app import AppServices, create_app
from tests.integration.test_openai_api import Served, serve_cluster
from tests.support.cluster import cluster_dict

pytestmark = pytest.mark.asyncio(loop_scope="module")

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HELLO = [{"role": "user", "content": "Hello"}]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def served(tiny_model_dir: Path) -> AsyncIterator[Served]:
    async with serve_cluster(
        tiny_model_dir,
        http={"auth_token": TOKEN},
        inference={"max_running_requests": 1, "max_waiting_requests": 0},
    ) as served:
        yield served


@pytest_asyncio.fixture(loop_scope="module")
async def client(served: Served) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=f"{served.url}/v1", api_key=TOKEN, max_retries=0) as c:
        yield c


@pytest_asyncio.fixture(loop_scope="module")
async def raw(served: Served) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=served.url, headers=AUTH, timeout=30) as c:
        yield c


def assert_error(response: httpx.Response, status: int, param: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["param"] == param
    return dict(error)


async def test_wrong_or_missing_api_key_is_401(served: Served) -> None:
    async with AsyncOpenAI(base_url=f"{served.url}/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as caught:
            await bad.models.list()
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    async with httpx.AsyncClient(base_url=served.url) as anonymous:
        for response in (
            await anonymous.get("/v1/models"),
            await anonymous.post("/v1/chat/completions", json={"model": "x", "messages": []}),
        ):
            error = assert_error(response, 401, None)
            assert error["type"] == "authentication_error"
            assert response.headers["www-authenticate"].startswith("Bearer")


async def test_the_api_and_its_schema_take_the_token_in_the_header_only(served: Served) -> None:
    async with httpx.AsyncClient(base_url=served.url, timeout=30) as anonymous:
        # A token in a URL ends up in proxy logs: /v1, /health and the schema refuse it.
        in_query = await anonymous.get("/v1/models", params={"token": TOKEN})
        assert assert_error(in_query, 401, None)["code"] == "invalid_api_key"
        assert (await anonymous.get("/health", params={"token": TOKEN})).status_code == 401
        for path in ("/openapi.json", "/docs", "/redoc"):
            assert (await anonymous.get(path)).status_code == 401, path
            assert (await anonymous.get(path, params={"token": TOKEN})).status_code == 401, path
            assert (await anonymous.get(path, headers=AUTH)).status_code == 200, path
        schema = (await anonymous.get("/openapi.json", headers=AUTH)).json()
        assert "/v1/chat/completions" in schema["paths"]


async def test_the_schema_says_what_the_api_refuses(served: Served, raw: httpx.AsyncClient) -> None:
    schemas = (await raw.get("/openapi.json")).json()["components"]["schemas"]
    inference = served.cluster.config.inference
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        properties = schemas[name]["properties"]
        assert properties["model"]["enum"] == [served.model], name
        assert properties["n"]["anyOf"] == [{"const": 1}, {"type": "null"}], name
        assert properties["stop"]["anyOf"][0]["maxLength"] == inference.max_stop_length, name
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert chat["messages"]["minItems"] == 1
    assert chat["messages"]["maxItems"] == inference.max_messages
    prompt = schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    vocab = served.cluster.orchestrator.model_info.vocab_size  # type: ignore[union-attr]
    assert prompt[2]["items"] == {"type": "integer", "minimum": 0, "maximum": vocab - 1}


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        ({"messages": []}, "messages", "at least one message"),
        ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"max_tokens": -5}, "max_tokens", "greater than or equal to 1"),
        ({"max_completion_tokens": 0}, "max_completion_tokens", "greater than or equal to 1"),
        ({"n": 2}, "n", "n=1"),
        ({"temperature": "hot"}, "temperature", "valid number"),
        ({"temperature": 3}, "temperature", "less than or equal to 2"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "'user'"),
        ({"messages": "hello"}, "messages", "valid list"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content",
            "only text content parts",
        ),
        ({"presence_penalty": 0.5}, "presence_penalty", "not supported"),
        ({"logit_bias": {"42": 5}}, "logit_bias", "not supported"),
        ({"tools": [{"type": "function"}]}, "tools", "not supported"),
        ({"top_logprobs": 3}, "top_logprobs", "requires logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "stream is true"),
        ({"n": 3, "stream": True}, "n", "n=1"),
        ({"model": None}, "model", "valid string"),
        ({"model": ""}, "model", "at least 1 character"),
        ({"stop": 7}, "stop", "valid string"),
    ],
)
async def test_invalid_chat_parameter_is_400_naming_it(
    served: Served, raw: httpx.AsyncClient, body: dict[str, Any], param: str, needle: str
) -> None:
    request = {"model": served.model, "messages": HELLO, "max_tokens": 4, **body}
    error = assert_error(await raw.post("/v1/chat/completions", json=request), 400, param)
    assert error["type"] == "invalid_request_error"
    assert needle in error["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": ["one", "two"]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [1, 2, 10**6]}, "prompt_tokens"),
        ({"echo": True}, "echo"),
        ({"best_of": 3}, "best_of"),
        ({"logprobs": 50}, "logprobs"),
    ],
)
async def test_invalid_completion_parameter_is_400_naming_it(
    served: Served, raw: httpx.AsyncClient, body: dict[str, Any], param: str
) -> None:
    request = {"model": served.model, "prompt": "Hello", "max_tokens": 4, **body}
    assert_error(await raw.post("/v1/completions", json=request), 400, param)


async def test_missing_fields_and_bad_json_are_400(raw: httpx.AsyncClient) -> None:
    error = assert_error(
        await raw.post("/v1/chat/completions", json={"messages": HELLO}), 400, "model"
    )
    assert "missing" in error["message"]
    bad_json = await raw.post(
        "/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"}
    )
    assert "not valid JSON" in assert_error(bad_json, 400, None)["message"]
    not_object = await raw.post("/v1/completions", json=[1, 2])
    assert_error(not_object, 400, None)


async def test_prompt_longer_than_the_context_is_400(
    served: Served, client: AsyncOpenAI, raw: httpx.AsyncClient
) -> None:
    long_text = "word " * 600  # the tiny model's context is 512 tokens
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(
            model=served.model, messages=[{"role": "user", "content": long_text}], max_tokens=4
        )
    assert caught.value.status_code == 400 and caught.value.param == "messages"
    response = await raw.post(
        "/v1/completions", json={"model": served.model, "prompt": long_text, "max_tokens": 4}
    )
    assert "at most 511" in assert_error(response, 400, "prompt")["message"]


async def test_unknown_model_is_404_model_not_found(
    served: Served, client: AsyncOpenAI, raw: httpx.AsyncClient
) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=4)
    assert caught.value.code == "model_not_found" and caught.value.param == "model"
    response = await raw.post(
        "/v1/completions", json={"model": "gpt-4o", "prompt": "Hi", "max_tokens": 4}
    )
    assert served.model in assert_error(response, 404, "model")["message"]
    assert_error(await raw.get("/v1/models/gpt-4o"), 404, "model")
    # Paths under /v1 that no route takes answer in the same shape, as the schema says.
    assert_error(await raw.get("/v1/models/a%0Ab"), 404, None)
    assert_error(await raw.get("/v1/nothing-here"), 404, None)
    not_allowed = await raw.delete("/v1/chat/completions")
    assert_error(not_allowed, 405, None)
    assert not_allowed.headers["allow"] == "POST"
    # Elsewhere, FastAPI's own shape.
    assert (await raw.get("/nothing-here")).json() == {"detail": "Not Found"}


async def test_full_queue_is_429_until_a_slot_frees(
    served: Served, client: AsyncOpenAI, raw: httpx.AsyncClient
) -> None:
    # Greedy: a sampled stream could meet the end-of-sequence token early and free its slot.
    long_request = {
        "model": served.model,
        "messages": HELLO,
        "max_tokens": 400,
        "temperature": 0,
        "stream": True,
    }
    async with raw.stream("POST", "/v1/chat/completions", json=long_request) as running:
        assert running.status_code == 200
        lines = running.aiter_lines()
        assert (await anext(lines)).startswith("data: ")  # the one slot is taken now
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model=served.model, messages=HELLO, max_tokens=2)
        assert caught.value.status_code == 429
        for stream in (False, True):
            response = await raw.post(
                "/v1/completions",
                json={"model": served.model, "prompt": "Hi", "max_tokens": 2, "stream": stream},
            )
            error = assert_error(response, 429, None)
            assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"
            assert response.headers["retry-after"] == "1"
    # Leaving the stream aborts its request and frees the slot.
    response = await _eventually_not_429(raw, served.model)
    assert response.status_code == 200


async def _eventually_not_429(raw: httpx.AsyncClient, model: str) -> httpx.Response:
    request = {"model": model, "prompt": "Hi", "max_tokens": 2}
    for _ in range(100):
        response = await raw.post("/v1/completions", json=request)
        if response.status_code != 429:
            return response
        await asyncio.sleep(0.05)
    raise AssertionError("the aborted stream's slot was never freed")


async def test_no_pipeline_yet_is_503(tiny_model_dir: Path) -> None:
    config = ClusterConfig.from_dict(cluster_dict(tiny_model_dir, 2))
    orchestrator = DistributedOrchestrator(config, enable_monitoring=False)  # not initialised
    services = AppServices(config=config, orchestrator=orchestrator)
    async with (
        HTTPServer(create_app(services)) as http,
        httpx.AsyncClient(base_url=http.url) as raw,
        AsyncOpenAI(base_url=f"{http.url}/v1", api_key="unused", max_retries=0) as client,
    ):
        with pytest.raises(openai.InternalServerError) as caught:
            await client.chat.completions.create(model="any", messages=HELLO, max_tokens=2)
        assert caught.value.status_code == 503
        for response in (
            await raw.get("/v1/models"),
            await raw.post("/v1/completions", json={"model": "x", "prompt": "Hi"}),
            await raw.post(
                "/v1/chat/completions", json={"model": "x", "messages": HELLO, "stream": True}
            ),
        ):
            error = assert_error(response, 503, None)
            assert error["code"] == "pipeline_not_ready"
            assert response.headers["retry-after"] == "1"


async def test_a_stage_failing_mid_stream_ends_it_with_an_error_event(
    tiny_model_dir: Path,
) -> None:
    # With recovery off; with it on the stream pauses instead (test_recovery.py).
    async with (
        serve_cluster(tiny_model_dir, network={"recovery_timeout": 0}) as served,
        AsyncOpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0) as client,
    ):
        stream = await client.chat.completions.create(
            model=served.model, messages=HELLO, max_tokens=400, temperature=0, stream=True
        )
        received = []
        with pytest.raises(openai.APIError) as caught:
            async for chunk in stream:
                received.append(chunk)
                if len(received) == 3:
                    await served.cluster.workers[1].stop(grace=0)
    assert 3 <= len(received) < 400
    assert all(c.choices[0].finish_reason is None for c in received)
    assert caught.value.code == "worker_unavailable"
    assert "worker-1" in caught.value.message


async def test_cli_chat_reports_a_refused_token_in_one_line(served: Served) -> None:
    with pytest.raises(ChatError, match="missing or invalid API key"):
        await asyncio.to_thread(ChatSession, served.url, token="wrong")
    session = await asyncio.to_thread(ChatSession, served.url, token=TOKEN, max_tokens=0)
    with pytest.raises(ChatError, match="max_tokens"):
        await asyncio.to_thread(lambda: list(session.ask("Hello")))
    assert session.messages == []  # a refused turn leaves no trace
