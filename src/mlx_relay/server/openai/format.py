"""Turning the coordinator's results into OpenAI response bodies and stream chunks.

One formatter per request: :class:`ChatFormatter` for ``/v1/chat/completions``,
:class:`CompletionFormatter` for ``/v1/completions``. Both build the whole response
(``complete``) and the streamed chunks (``opening``, ``chunks``, ``usage_chunk``) from the same
token data, so the streamed and non-streamed forms of one generation carry the same values.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from mlx_relay.coordinator.requests import (
    InferenceResponse,
    TokenEvent,
    TokenLogprob,
    Usage,
)
from mlx_relay.server.openai.responses import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    Delta,
    TokenLogprobEntry,
    TopLogprobEntry,
    UsageInfo,
)


def usage_info(usage: Usage) -> UsageInfo:
    return UsageInfo(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )


class TokenText:
    """The text of single tokens, for logprobs (cached: the same ids recur)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = str(self.tokenizer.decode([token_id]))
            if len(self._cache) < 65536:
                self._cache[token_id] = text
        return text


class _Formatter:
    """What both formatters share: identity of the response and token text."""

    def __init__(
        self, *, response_id: str, model: str, token_text: TokenText, logprobs: bool
    ) -> None:
        self.id = response_id
        self.model = model
        self.created = int(time.time())
        self.token_text = token_text
        self.logprobs = logprobs


class ChatFormatter(_Formatter):
    """Chat completion bodies and ``chat.completion.chunk`` chunks."""

    def complete(self, result: InferenceResponse) -> ChatCompletion:
        return ChatCompletion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[
                ChatChoice(
                    message=AssistantMessage(content=result.text),
                    logprobs=self._logprobs(result.logprobs or []) if self.logprobs else None,
                    finish_reason=result.finish_reason,
                )
            ],
            usage=usage_info(result.usage),
        )

    def opening(self) -> list[BaseModel]:
        """The first chunk announces the assistant's role, as OpenAI's does."""
        return [self._chunk(Delta(role="assistant", content=""))]

    def chunks(self, event: TokenEvent) -> list[BaseModel]:
        out: list[BaseModel] = []
        logprobs = self._logprobs([event.logprob]) if self.logprobs and event.logprob else None
        if event.text or logprobs is not None:
            out.append(self._chunk(Delta(content=event.text), logprobs=logprobs))
        if event.finish_reason is not None:
            out.append(self._chunk(Delta(), finish_reason=event.finish_reason))
        return out

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[], usage=usage_info(usage)
        )

    def _chunk(
        self,
        delta: Delta,
        *,
        logprobs: ChatLogprobs | None = None,
        finish_reason: str | None = None,
    ) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[ChatChunkChoice(delta=delta, logprobs=logprobs, finish_reason=finish_reason)],
        )

    def _logprobs(self, tokens: Sequence[TokenLogprob]) -> ChatLogprobs:
        return ChatLogprobs(content=[self._entry(t) for t in tokens])

    def _entry(self, token: TokenLogprob) -> TokenLogprobEntry:
        text = self.token_text(token.token_id)
        return TokenLogprobEntry(
            token=text,
            logprob=token.logprob,
            bytes=list(text.encode("utf-8")),
            top_logprobs=[
                TopLogprobEntry(
                    token=(alt := self.token_text(token_id)),
                    logprob=logprob,
                    bytes=list(alt.encode("utf-8")),
                )
                for token_id, logprob in token.top_logprobs
            ],
        )


class CompletionFormatter(_Formatter):
    """Text completion bodies and their streamed chunks (same ``text_completion`` shape)."""

    def __init__(
        self, *, response_id: str, model: str, token_text: TokenText, logprobs: bool
    ) -> None:
        super().__init__(
            response_id=response_id, model=model, token_text=token_text, logprobs=logprobs
        )
        self._offset = 0  # characters of completion text streamed so far (text_offset)

    def complete(self, result: InferenceResponse) -> Completion:
        logprobs = None
        if self.logprobs:
            logprobs = self._logprobs(result.logprobs or [], start=0)
        return Completion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[
                CompletionChoice(
                    text=result.text, logprobs=logprobs, finish_reason=result.finish_reason
                )
            ],
            usage=usage_info(result.usage),
        )

    def opening(self) -> list[BaseModel]:
        return []

    def chunks(self, event: TokenEvent) -> list[BaseModel]:
        out: list[BaseModel] = []
        logprobs = None
        if self.logprobs and event.logprob:
            logprobs = self._logprobs([event.logprob], start=self._offset)
        if event.text or logprobs is not None:
            out.append(self._chunk(event.text, logprobs=logprobs))
        self._offset += len(event.text)
        if event.finish_reason is not None:
            out.append(self._chunk("", finish_reason=event.finish_reason))
        return out

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return Completion(
            id=self.id, created=self.created, model=self.model, choices=[], usage=usage_info(usage)
        )

    def _chunk(
        self,
        text: str,
        *,
        logprobs: CompletionLogprobs | None = None,
        finish_reason: str | None = None,
    ) -> Completion:
        return Completion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[CompletionChoice(text=text, logprobs=logprobs, finish_reason=finish_reason)],
        )

    def _logprobs(self, tokens: Sequence[TokenLogprob], *, start: int) -> CompletionLogprobs:
        texts = [self.token_text(t.token_id) for t in tokens]
        offsets = []
        offset = start
        for text in texts:
            offsets.append(offset)
            offset += len(text)
        top: list[dict[str, float]] = []
        for token, text in zip(tokens, texts, strict=True):
            alternatives = {self.token_text(i): lp for i, lp in token.top_logprobs}
            # OpenAI always lists the sampled token among the alternatives.
            alternatives.setdefault(text, token.logprob)
            top.append(alternatives)
        return CompletionLogprobs(
            tokens=texts,
            token_logprobs=[t.logprob for t in tokens],
            top_logprobs=top,
            text_offset=offsets,
        )
