"""Request validation: each bad parameter is refused with its name, before any resource."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mlx_relay.coordinator.prepare import PromptLimits, prepare_request
from mlx_relay.coordinator.requests import InferenceRequest
from mlx_relay.core.errors import InvalidRequest
from mlx_relay.model.tokenizer import encode_prompt, load_tokenizer

LIMITS = PromptLimits(max_prompt_tokens=64, max_context=128, vocab_size=384)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    return load_tokenizer(tiny_model_dir)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"prompt": ""}, "prompt"),
        ({}, "prompt"),
        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user"}]}, "messages"),
        ({"prompt_tokens": [1, 999]}, "prompt_tokens"),
        ({"prompt_tokens": []}, "prompt_tokens"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 1.5}, "max_tokens"),
        ({"prompt": "hi", "temperature": -0.1}, "temperature"),
        ({"prompt": "hi", "temperature": float("nan")}, "temperature"),
        ({"prompt": "hi", "top_p": 0.0}, "top_p"),
        ({"prompt": "hi", "top_p": 1.5}, "top_p"),
        ({"prompt": "hi", "top_k": -1}, "top_k"),
        ({"prompt": "hi", "top_logprobs": 21}, "top_logprobs"),
        ({"prompt": "hi", "seed": "7"}, "seed"),
        ({"prompt": "hi", "stop": [""]}, "stop"),
        ({"prompt": "hi", "stop": "x"}, "stop"),
        ({"prompt": "word " * 100}, "prompt"),
    ],
)
def test_invalid_parameters_are_named(tokenizer: Any, fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as failed:
        prepare_request(InferenceRequest(**fields), tokenizer, LIMITS)
    assert failed.value.param == param


def test_prompt_longer_than_the_context_is_refused(tokenizer: Any) -> None:
    limits = PromptLimits(max_prompt_tokens=4096, max_context=10, vocab_size=384)
    with pytest.raises(InvalidRequest, match="at most 9 are accepted") as failed:
        prepare_request(InferenceRequest(prompt_tokens=list(range(10))), tokenizer, limits)
    assert failed.value.param == "prompt_tokens"


def test_max_tokens_is_shortened_to_the_context(tokenizer: Any) -> None:
    prepared = prepare_request(
        InferenceRequest(prompt_tokens=list(range(60)), max_tokens=500), tokenizer, LIMITS
    )
    assert prepared.max_tokens == 128 - 60


def test_prompt_and_messages_are_tokenized(tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = prepare_request(InferenceRequest(messages=messages), tokenizer, LIMITS)
    assert chat.prompt_ids == encode_prompt(tokenizer, messages=messages)
    raw = prepare_request(InferenceRequest(prompt="The quick brown fox"), tokenizer, LIMITS)
    assert raw.prompt_ids == list(tokenizer.encode("The quick brown fox"))
    assert raw.prompt_ids != chat.prompt_ids


def test_sampling_parameters_are_carried(tokenizer: Any) -> None:
    prepared = prepare_request(
        InferenceRequest(prompt="hi", temperature=0.7, top_p=0.9, top_k=5, seed=3, stop=["x"]),
        tokenizer,
        LIMITS,
    )
    params = prepared.params
    assert (params.temperature, params.top_p, params.top_k, params.seed) == (0.7, 0.9, 5, 3)
    assert prepared.submitted_at > 0


class _NoTokenizer:
    """Fails the test if the prompt reaches the tokenizer."""

    has_chat_template = True

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("tokenized a prompt that the limits refuse")

    apply_chat_template = encode


@pytest.mark.parametrize(
    ("fields", "param", "needle"),
    [
        ({"prompt": "ab" * 40}, "prompt", "80 bytes; at most 64"),
        ({"prompt": "é" * 33}, "prompt", "66 bytes; at most 64"),
        ({"messages": [{"role": "user", "content": "x" * 40}] * 2}, "messages", "80 bytes"),
        ({"messages": [{"role": "user", "content": "x"}] * 4}, "messages", "at most 3"),
        ({"prompt": "hi", "stop": ["abcdef"]}, "stop", "6 characters; at most 5"),
    ],
)
def test_input_limits_are_checked_before_tokenizing(
    fields: dict[str, Any], param: str, needle: str
) -> None:
    limits = PromptLimits(
        max_prompt_tokens=64,
        max_context=128,
        vocab_size=384,
        max_prompt_bytes=64,
        max_messages=3,
        max_stop_length=5,
    )
    with pytest.raises(InvalidRequest, match=needle) as caught:
        prepare_request(InferenceRequest(**fields), _NoTokenizer(), limits)
    assert caught.value.param == param


def test_the_default_byte_cap_follows_max_prompt_tokens() -> None:
    assert PromptLimits(100, None, 384).prompt_bytes == 3200
    assert PromptLimits(100, None, 384, max_prompt_bytes=10).prompt_bytes == 10
