"""The OpenAI-compatible inference API: ``/v1/models``, ``/v1/chat/completions`` and
``/v1/completions``, streamed (server-sent events) or not.

Any OpenAI client works against it (``base_url=http://<host>:<port>/v1``). The bearer token
of the app (``http.auth_token``) is the API key when one is set. Parameters
mlx-relay cannot honour are refused with a 400 naming them rather than ignored: ``n`` and
``best_of`` other than 1, non-zero ``presence_penalty``/``frequency_penalty``, ``logit_bias``,
tools, ``response_format`` other than text, ``echo`` and ``suffix``. Fields that change
nothing (``user``, ``metadata``, ``store``...) are ignored. Left out, ``temperature`` and
``top_p`` default to 1 as in OpenAI's API, and ``max_tokens`` to the configuration's
``inference.default_max_tokens`` (shortened to what fits in the context).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from mlx_relay.coordinator.orchestrator import DistributedOrchestrator
from mlx_relay.coordinator.requests import InferenceRequest, TokenEvent
from mlx_relay.core.http_access import require_token
from mlx_relay.server.deps import get_services
from mlx_relay.server.openai.errors import OpenAIError, OpenAIRoute, service_unavailable
from mlx_relay.server.openai.format import ChatFormatter, CompletionFormatter, TokenText
from mlx_relay.server.openai.models import (
    ChatCompletionRequest,
    CompletionRequest,
    unsupported_values,
)
from mlx_relay.server.openai.responses import (
    ChatCompletion,
    Completion,
    ErrorBody,
    ModelCard,
    ModelList,
)
from mlx_relay.server.openai.stream import ClientGone, open_stream, unless_disconnected

logger = logging.getLogger(__name__)

# Sampling defaults of OpenAI's API, used when a request leaves a parameter out.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
# Status logged for a request whose client left before its answer (nginx's convention).
CLIENT_CLOSED_REQUEST = 499
# "created" of the model card when the app does not say when it started.
_LOADED_AT = int(time.time())


def _orchestrator(request: Request) -> DistributedOrchestrator:
    orchestrator = get_services(request).orchestrator
    if orchestrator is None:
        raise service_unavailable("this server runs no inference pipeline (dashboard only)")
    return orchestrator


def served_model(request: Request) -> tuple[str, int | None]:
    """The served model's id and context length.

    Raises:
        OpenAIError: 503 while the model is not loaded yet.
    """
    orchestrator = _orchestrator(request)
    info = orchestrator.model_info  # known once the pipeline is initialised
    if info is None or not orchestrator.ready:
        raise service_unavailable("the pipeline is not initialised yet")
    context = info.max_context
    if orchestrator.config.model.max_context is not None:
        context = min(context, orchestrator.config.model.max_context)
    return info.name, context


def _check_model(request: Request, model: str) -> str:
    served, _ = served_model(request)
    if model != served:
        # A model the server does not have is a 404, as OpenAI answers it: the request itself
        # is well formed (the schema takes any model name).
        raise OpenAIError(
            404,
            f"the model '{model}' does not exist; this server serves '{served}'",
            param="model",
            code="model_not_found",
            error_type="invalid_request_error",
        )
    return served


def _check_supported(body: ChatCompletionRequest | CompletionRequest) -> None:
    problem = unsupported_values(body)
    if problem is not None:
        param, message = problem
        raise OpenAIError(400, message, param=param, code="unsupported_parameter")


def _sampling(request: Request, body: ChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
    limit = body.token_limit() if isinstance(body, ChatCompletionRequest) else body.max_tokens
    if limit is None:
        limit = get_services(request).config.inference.default_max_tokens
    return {
        "max_tokens": limit,
        "temperature": DEFAULT_TEMPERATURE if body.temperature is None else body.temperature,
        "top_p": DEFAULT_TOP_P if body.top_p is None else body.top_p,
        "top_k": body.top_k or 0,
        "seed": body.seed,
        "stop": body.stop_list(),
    }


def _completion_prompt(body: CompletionRequest) -> dict[str, Any]:
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise OpenAIError(
                400,
                f"only one prompt per request is supported, got {len(prompt)}",
                param="prompt",
            )
        prompt = prompt[0]
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if not prompt:
        raise OpenAIError(400, "the prompt must not be empty", param="prompt")
    return {"prompt_tokens": list(prompt)}


async def _answer(
    request: Request,
    body: ChatCompletionRequest | CompletionRequest,
    inference: InferenceRequest,
    formatter_class: type[ChatFormatter] | type[CompletionFormatter],
    id_prefix: str,
    model: str,
) -> Response:
    """Run ``inference`` through the pipeline and answer it in OpenAI's shape: one JSON body,
    or server-sent events when the body asks to stream."""
    formatter = formatter_class(
        response_id=f"{id_prefix}-{inference.request_id}",
        model=model,
        token_text=_token_text(request),
        logprobs=inference.logprobs,
    )
    orchestrator = _orchestrator(request)
    headers = {"X-Request-Id": inference.request_id}
    try:
        if body.stream:
            # Tokenized off the event loop; refused here (400, 429, 503) before any event.
            events = await unless_disconnected(request, orchestrator.start_stream(inference))

            def start() -> AsyncIterator[TokenEvent]:
                return events

            return await open_stream(
                request,
                start,
                formatter,
                include_usage=body.include_usage(),
                stall_timeout=get_services(request).config.http.stream_stall_timeout,
                headers=headers,
            )
        result = await unless_disconnected(request, orchestrator.process_request(inference))
    except ClientGone:
        logger.info("request %s: client disconnected before the answer", inference.request_id)
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    if result.finish_reason not in ("stop", "length"):
        raise OpenAIError(500, f"the generation ended with {result.finish_reason!r}")
    return JSONResponse(formatter.complete(result).model_dump(mode="json"), headers=headers)


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (400, 401, 404, 429, 500, 503)
}

# A streamed answer ("stream": true): server-sent events, each a chunk in JSON.
# Each event's data is one chunk in JSON (the body's shape, object "...chunk" for chat), an
# error in the error shape, or "[DONE]" last.
_SSE_EVENT = {"type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]}
_SSE: dict[str, Any] = {"content": {"text/event-stream": {"schema": _SSE_EVENT}}}

router = APIRouter(
    prefix="/v1",
    tags=["OpenAI-compatible API"],
    route_class=OpenAIRoute,
    dependencies=[Depends(require_token)],  # the app's bearer token is the API key
    responses=_ERRORS,
)


@router.get("/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    """The served model (one per cluster)."""
    name, context = served_model(request)
    return ModelList(data=[_card(request, name, context)])


@router.get("/models/{model_id:path}", response_model=ModelCard)
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    """The served model, if ``model_id`` names it."""
    name, context = served_model(request)
    _check_model(request, model_id)
    return _card(request, name, context)


def _card(request: Request, name: str, context: int | None) -> ModelCard:
    started = getattr(request.app.state, "started_at", None)
    return ModelCard(id=name, created=int(started or _LOADED_AT), max_model_len=context)


@router.post(
    "/chat/completions",
    response_model=None,
    responses={200: {"model": ChatCompletion, "description": "JSON, or an event stream", **_SSE}},
)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    """A chat completion; the messages are rendered with the model's chat template."""
    model = _check_model(request, body.model)
    _check_supported(body)
    inference = InferenceRequest(
        # "developer" is OpenAI's newer name for the system role; templates know "system".
        messages=[
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in body.messages
        ],
        logprobs=bool(body.logprobs),
        top_logprobs=(body.top_logprobs or 0) if body.logprobs else 0,
        **_sampling(request, body),
    )
    return await _answer(request, body, inference, ChatFormatter, "chatcmpl", model)


@router.post(
    "/completions",
    response_model=None,
    responses={200: {"model": Completion, "description": "JSON, or an event stream", **_SSE}},
)
async def completions(body: CompletionRequest, request: Request) -> Response:
    """A text completion of a raw prompt (no chat template)."""
    model = _check_model(request, body.model)
    _check_supported(body)
    inference = InferenceRequest(
        logprobs=body.logprobs is not None,
        top_logprobs=body.logprobs or 0,
        **_completion_prompt(body),
        **_sampling(request, body),
    )
    return await _answer(request, body, inference, CompletionFormatter, "cmpl", model)


def _token_text(request: Request) -> TokenText:
    # One cache of token texts per tokenizer, kept on the app across requests.
    tokenizer = _orchestrator(request).tokenizer
    state = request.app.state
    cached: TokenText | None = getattr(state, "openai_token_text", None)
    if cached is None or cached.tokenizer is not tokenizer:
        cached = TokenText(tokenizer)
        state.openai_token_text = cached
    return cached
