"""Request bodies of the OpenAI-compatible API (``/v1``); the responses are in
:mod:`mlx_relay.server.openai.responses`.

Requests accept the fields the official clients send; unknown fields are ignored so that a
client that sends ``user`` or ``metadata`` keeps working. Fields that would change the result
and that mlx-relay cannot honour are accepted only at their neutral value (see
:func:`unsupported_values`), so a request never silently means something else.

The schema says exactly what the API accepts: values are not coerced (``"5"`` is no integer),
the neutral-only fields declare their one value (:func:`only`), and the limits that depend on
the configuration and the served model (the model's name, token ids, messages, stop strings)
are filled in when the schema is served (:mod:`mlx_relay.server.schema`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
)

from mlx_relay.coordinator.prepare import MAX_STOP_STRINGS, MAX_TOP_LOGPROBS

_NULL = {"type": "null"}


def _whole(value: Any) -> Any:
    # JSON's integers include 5.0 (a number with no fraction); strict mode alone refuses it.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# Integers as JSON Schema has them: ``5`` and ``5.0``, never ``"5"`` or ``true``. (The
# schema is spelled out: pydantic writes bounds after a BeforeValidator as "ge", which no
# JSON Schema validator reads.)
Integer = Annotated[int, BeforeValidator(_whole)]
PositiveInteger = Annotated[
    int, BeforeValidator(_whole), Field(ge=1), WithJsonSchema({"type": "integer", "minimum": 1})
]
Count = Annotated[
    int, BeforeValidator(_whole), Field(ge=0), WithJsonSchema({"type": "integer", "minimum": 0})
]
LogprobCount = Annotated[
    int,
    BeforeValidator(_whole),
    Field(ge=0, le=MAX_TOP_LOGPROBS),
    WithJsonSchema({"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS}),
]


def only(*values: Any) -> WithJsonSchema:
    """The schema of a field accepted only at its neutral value(s) (or null); anything else
    is answered 400 ``unsupported_parameter`` by :func:`unsupported_values`."""
    return WithJsonSchema({"anyOf": [*({"const": v} for v in values), _NULL]})


def _nullable(schema: dict[str, Any]) -> WithJsonSchema:
    return WithJsonSchema({"anyOf": [schema, _NULL]})


_TEXT_PART = {
    "type": "object",
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
    "required": ["type", "text"],
}
_TOKEN_IDS: dict[str, Any] = {
    "type": "array",
    "items": {"type": "integer", "minimum": 0},
    "minItems": 1,
}
# A prompt: a string, token ids, or a list holding one of these (the batch form).
PROMPT_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "string", "minLength": 1},
        {
            "type": "array",
            "items": {"type": "string", "minLength": 1},
            "minItems": 1,
            "maxItems": 1,
        },
        _TOKEN_IDS,
        {"type": "array", "items": _TOKEN_IDS, "minItems": 1, "maxItems": 1},
    ]
}
STOP_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}, "maxItems": MAX_STOP_STRINGS},
        _NULL,
    ]
}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


def _requires(field: str, when: dict[str, Any], other: str) -> dict[str, Any]:
    """A schema rule: ``field`` matching ``when`` needs ``other`` to be true."""
    return {
        "if": {"properties": {field: when}, "required": [field]},
        "then": {"properties": {other: {"const": True}}, "required": [other]},
    }


# stream_options only with "stream": true (unsupported_values refuses it otherwise).
_STREAM_OPTIONS_RULE = _requires("stream_options", {"type": "object"}, "stream")


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # A string, a list of content parts, or null (an assistant turn that only called tools).
    content: Annotated[
        str | list[dict[str, Any]] | None,
        WithJsonSchema(
            {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}, _NULL]}
        ),
    ] = None
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _text_parts_only(
        cls, value: str | list[dict[str, Any]] | None
    ) -> str | list[dict[str, Any]] | None:
        for part in value if isinstance(value, list) else ():
            kind = part.get("type")
            if kind != "text":
                raise ValueError(f"only text content parts are supported, got type {kind!r}")
            if not isinstance(part.get("text"), str):
                raise ValueError("a text content part needs a string 'text'")
        return value

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(str(part["text"]) for part in self.content)


class StreamOptions(_Request):
    include_usage: bool = False


class _GenerationRequest(_Request):
    """Fields shared by chat and text completions."""

    model: str = Field(min_length=1)
    max_tokens: PositiveInteger | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: Count | None = None  # extension (vLLM, mlx-lm)
    seed: Integer | None = None
    stop: Annotated[str | list[str] | None, WithJsonSchema(STOP_SCHEMA)] = None
    n: Annotated[Integer | None, only(1)] = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float | None, only(0)] = None
    frequency_penalty: Annotated[float | None, only(0)] = None
    repetition_penalty: Annotated[float | None, only(1)] = None  # extension (vLLM)
    logit_bias: Annotated[
        dict[str, float] | None, _nullable({"type": "object", "maxProperties": 0})
    ] = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences are supported")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_GenerationRequest):
    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                _STREAM_OPTIONS_RULE,
                _requires("top_logprobs", {"type": "integer", "minimum": 1}, "logprobs"),
            ]
        }
    )
    # The schema says what the validator below enforces (which words the error itself).
    messages: list[ChatMessage] = Field(json_schema_extra={"minItems": 1})
    max_completion_tokens: PositiveInteger | None = None
    logprobs: bool | None = False
    top_logprobs: LogprobCount | None = None
    tools: Annotated[list[Any] | None, _nullable({"type": "array", "maxItems": 0})] = None
    functions: Annotated[list[Any] | None, _nullable({"type": "array", "maxItems": 0})] = None
    response_format: Annotated[
        dict[str, Any] | None,
        _nullable({"type": "object", "properties": {"type": {"const": "text"}}}),
    ] = None

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not value:
            raise ValueError("messages must contain at least one message")
        return value

    def token_limit(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else (self.max_tokens)
        )


class CompletionRequest(_GenerationRequest):
    model_config = ConfigDict(json_schema_extra={"allOf": [_STREAM_OPTIONS_RULE]})
    # A string, or token ids; a list of one of these (the batch form) holding one prompt.
    prompt: Annotated[
        str | list[str] | list[Integer] | list[list[Integer]], WithJsonSchema(PROMPT_SCHEMA)
    ]
    logprobs: LogprobCount | None = None
    echo: Annotated[bool | None, only(False)] = False
    best_of: Annotated[Integer | None, only(1)] = None
    suffix: Annotated[str | None, _nullable({"type": "string", "maxLength": 0})] = None


def unsupported_values(body: _GenerationRequest) -> tuple[str, str] | None:
    """The first field set to a value mlx-relay cannot honour, as ``(param, message)``."""
    checks: list[tuple[str, bool, str]] = [
        ("n", body.n not in (None, 1), "only n=1 is supported"),
        (
            "presence_penalty",
            body.presence_penalty not in (None, 0.0),
            "presence_penalty is not supported; leave it at 0",
        ),
        (
            "frequency_penalty",
            body.frequency_penalty not in (None, 0.0),
            "frequency_penalty is not supported; leave it at 0",
        ),
        (
            "repetition_penalty",
            body.repetition_penalty not in (None, 1.0),
            "repetition_penalty is not supported; leave it at 1",
        ),
        ("logit_bias", bool(body.logit_bias), "logit_bias is not supported"),
        (
            "stream_options",
            body.stream_options is not None and not body.stream,
            "stream_options is only allowed when stream is true",
        ),
    ]
    if isinstance(body, ChatCompletionRequest):
        response_type = (body.response_format or {}).get("type", "text")
        checks += [
            ("tools", bool(body.tools), "tool calling is not supported"),
            ("functions", bool(body.functions), "function calling is not supported"),
            (
                "response_format",
                response_type != "text",
                f"response_format {response_type!r} is not supported; only 'text'",
            ),
            (
                "top_logprobs",
                bool(body.top_logprobs) and not body.logprobs,
                "top_logprobs requires logprobs to be true",
            ),
        ]
    if isinstance(body, CompletionRequest):
        checks += [
            ("echo", bool(body.echo), "echo is not supported"),
            ("best_of", body.best_of not in (None, 1), "only best_of=1 is supported"),
            ("suffix", bool(body.suffix), "suffix is not supported"),
        ]
    for param, bad, message in checks:
        if bad:
            return param, message
    return None
