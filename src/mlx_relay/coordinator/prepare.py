"""Checking a request and turning it into prompt token ids, before it takes any resource.

The cheap checks come first: parameters, the number of messages, stop strings, and the
prompt's size in UTF-8 bytes, so that an oversized prompt is refused before the tokenizer
(or the chat template) spends any time on it. The orchestrator runs :func:`prepare_request`
off the event loop (``DistributedOrchestrator.start_stream`` and ``process_request``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from mlx_relay.coordinator.requests import InferenceRequest
from mlx_relay.core.errors import InvalidRequest
from mlx_relay.model.sampling import SamplingParams
from mlx_relay.model.tokenizer import encode_prompt

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20
# Default prompt-size cap in UTF-8 bytes per accepted prompt token (no tokenizer's tokens
# are longer on real text, so a prompt past this could never fit).
BYTES_PER_PROMPT_TOKEN = 32
DEFAULT_MAX_MESSAGES = 1024
DEFAULT_MAX_STOP_LENGTH = 256
# The error code of a prompt too long for the context (OpenAI's), or over the byte cap.
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"


@dataclass(frozen=True)
class PromptLimits:
    """What the cluster accepts: ``max_prompt_tokens`` from the configuration, the model's
    context length (None if unknown) and vocabulary size, and the input limits checked before
    tokenizing: the prompt's UTF-8 bytes (None: :data:`BYTES_PER_PROMPT_TOKEN` per
    ``max_prompt_tokens``), chat messages, characters of one stop string."""

    max_prompt_tokens: int
    max_context: int | None
    vocab_size: int
    max_prompt_bytes: int | None = None
    max_messages: int = DEFAULT_MAX_MESSAGES
    max_stop_length: int = DEFAULT_MAX_STOP_LENGTH

    @property
    def prompt_bytes(self) -> int:
        if self.max_prompt_bytes is not None:
            return self.max_prompt_bytes
        return BYTES_PER_PROMPT_TOKEN * self.max_prompt_tokens


@dataclass(frozen=True)
class PreparedRequest:
    """A validated request: its prompt ids, sampling parameters and the number of tokens it
    may generate (``max_tokens``, shortened to what fits in the model's context)."""

    request: InferenceRequest
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    submitted_at: float
    # When checking and tokenizing ended (time.monotonic(), like submitted_at).
    prepared_at: float = field(default_factory=time.monotonic)


def prepare_request(
    request: InferenceRequest, tokenizer: Any, limits: PromptLimits
) -> PreparedRequest:
    """Validate ``request`` and tokenize its prompt.

    Raises:
        InvalidRequest: naming the offending parameter.
    """
    submitted_at = time.monotonic()
    _check_max_tokens(request.max_tokens)
    params = SamplingParams(
        temperature=_number(request.temperature, "temperature"),
        top_p=_number(request.top_p, "top_p"),
        # A top_k past the vocabulary keeps every token, as 0 (off) does.
        top_k=min(_integer(request.top_k, "top_k"), limits.vocab_size),
        seed=None if request.seed is None else _integer(request.seed, "seed"),
        top_logprobs=_integer(request.top_logprobs, "top_logprobs"),
    )
    if params.top_logprobs > MAX_TOP_LOGPROBS:
        raise InvalidRequest(
            f"top_logprobs must be at most {MAX_TOP_LOGPROBS}, got {params.top_logprobs}",
            param="top_logprobs",
        )
    _check_stops(request.stop, limits.max_stop_length)
    prompt_ids, param = _prompt_ids(request, tokenizer, limits)
    if not prompt_ids:
        raise InvalidRequest("the prompt is empty after tokenization", param=param)
    longest = limits.max_prompt_tokens
    if limits.max_context is not None:
        longest = min(longest, limits.max_context - 1)
    if len(prompt_ids) > longest:
        raise InvalidRequest(
            f"the prompt has {len(prompt_ids)} tokens; at most {longest} are accepted "
            f"(max_prompt_tokens {limits.max_prompt_tokens}, model context "
            f"{limits.max_context})",
            param=param,
            code=CONTEXT_LENGTH_EXCEEDED,
        )
    max_tokens = request.max_tokens
    if limits.max_context is not None:
        max_tokens = min(max_tokens, limits.max_context - len(prompt_ids))
    return PreparedRequest(request, prompt_ids, params, max_tokens, submitted_at)


def _prompt_ids(
    request: InferenceRequest, tokenizer: Any, limits: PromptLimits
) -> tuple[list[int], str]:
    vocab_size = limits.vocab_size
    given = [
        name
        for name in ("prompt", "messages", "prompt_tokens")
        if getattr(request, name) is not None
    ]
    if not given:
        raise InvalidRequest("give a prompt, messages or prompt_tokens", param="prompt")
    if len(given) > 1:
        raise InvalidRequest(f"give only one of {', '.join(given)}", param=given[1])
    if request.prompt_tokens is not None:
        ids = request.prompt_tokens
        if not isinstance(ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in ids
        ):
            raise InvalidRequest(
                f"prompt_tokens must be a list of token ids in [0, {vocab_size})",
                param="prompt_tokens",
            )
        return list(ids), "prompt_tokens"
    if request.messages is not None:
        _check_messages(request.messages, limits.max_messages)
        text_bytes = sum(_utf8_length(m["content"]) for m in request.messages)
        _check_prompt_bytes(text_bytes, limits.prompt_bytes, "messages")
        return encode_prompt(tokenizer, messages=request.messages), "messages"
    if not isinstance(request.prompt, str) or not request.prompt:
        raise InvalidRequest("the prompt must be a non-empty string", param="prompt")
    _check_prompt_bytes(_utf8_length(request.prompt), limits.prompt_bytes, "prompt")
    return encode_prompt(tokenizer, prompt=request.prompt, chat=False), "prompt"


def _utf8_length(text: str) -> int:
    return len(text.encode("utf-8", errors="surrogatepass"))


def _check_prompt_bytes(size: int, limit: int, param: str) -> None:
    if size > limit:
        raise InvalidRequest(
            f"the {param} text has {size} bytes; at most {limit} are accepted "
            "(inference.max_prompt_bytes)",
            param=param,
            code=CONTEXT_LENGTH_EXCEEDED,
        )


def _check_messages(messages: Any, limit: int) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list", param="messages")
    if len(messages) > limit:
        raise InvalidRequest(
            f"{len(messages)} messages; at most {limit} are accepted (inference.max_messages)",
            param="messages",
        )
    for i, message in enumerate(messages):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise InvalidRequest(
                f"messages[{i}] must have a string 'role' and a string 'content'",
                param="messages",
            )


def _check_max_tokens(value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidRequest(f"max_tokens must be an integer >= 1, got {value!r}", "max_tokens")


def _check_stops(stops: Any, max_length: int) -> None:
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise InvalidRequest("stop must be a list of non-empty strings", param="stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"at most {MAX_STOP_STRINGS} stop strings", param="stop")
    longest = max((len(s) for s in stops), default=0)
    if longest > max_length:
        raise InvalidRequest(
            f"a stop string has {longest} characters; at most {max_length} are accepted "
            "(inference.max_stop_length)",
            param="stop",
        )


def _number(value: Any, param: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequest(f"{param} must be a number, got {value!r}", param=param)
    return float(value)


def _integer(value: Any, param: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{param} must be an integer, got {value!r}", param=param)
    return value
