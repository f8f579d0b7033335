"""What a caller hands the orchestrator and what it gets back."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass
class InferenceRequest:
    """One generation request.

    Exactly one of ``prompt`` (raw text, or a chat template's output) and ``messages``
    (chat messages rendered with the model's chat template) is given; ``prompt_tokens``
    may replace both when the caller already tokenized.
    """

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    prompt_tokens: list[int] | None = None
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    top_logprobs: int = 0
    logprobs: bool = False
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Timings:
    """Seconds, measured on the coordinator's monotonic clock (stage compute as reported by
    each worker for its own forward calls).

    ``queue``: waiting for a running slot; ``ttft``: arrival to first token; ``prefill``: from
    admission to the first token; ``decode``: first token to the end; ``stage_compute``:
    per device, summed over the request's forward calls; ``network``: forward RPC time minus
    compute, summed; ``tokens_per_second``: generated tokens over prefill + decode.
    """

    queue: float = 0.0
    ttft: float | None = None
    total: float = 0.0
    prefill: float = 0.0
    decode: float = 0.0
    stage_compute: dict[str, float] = field(default_factory=dict)
    network: float = 0.0
    tokens_per_second: float = 0.0


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class TokenEvent:
    """One streamed step: the new token and the text it completes (may be empty while a
    multi-byte character is incomplete). The last event has ``finish_reason`` set."""

    request_id: str
    token_id: int | None
    text: str
    index: int
    logprob: TokenLogprob | None = None
    finish_reason: FinishReason | None = None
    usage: Usage | None = None


@dataclass
class InferenceResponse:
    """A finished request.

    ``token_ids`` are the generated tokens without the end-of-sequence token (the token that
    completed a stop string is included); ``text`` ends before the first stop string;
    ``finish_reason`` is ``stop`` (end of sequence or stop string) or ``length``
    (``max_tokens`` reached, or the model's context is full).
    """

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    logprobs: list[TokenLogprob] | None = None
