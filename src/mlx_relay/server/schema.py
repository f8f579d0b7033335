"""The app's schema as served: FastAPI's, with the limits of this cluster filled in.

What a request may hold depends on the configuration and the served model: the model's name
(any other is a 404), the token ids of its vocabulary, ``inference.max_messages`` and
``inference.max_stop_length`` for ``/v1``; the device ids ``/api/placement?without=`` takes.
``/openapi.json`` states them once the pipeline is up, so that the schema says exactly what
the API accepts. One limit no schema can state is left to the descriptions: a prompt's size
in tokens (and its UTF-8 bytes), checked when it is tokenized.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from mlx_relay.server.deps import AppServices

Schema = dict[str, Any]

_REQUESTS = ("ChatCompletionRequest", "CompletionRequest")


def with_served_limits(
    schema: Schema, *, model: str, vocab_size: int, max_messages: int, max_stop_length: int
) -> Schema:
    """A copy of the OpenAPI ``schema`` with the served model's and configuration's limits."""
    schema = copy.deepcopy(schema)
    components = schema.get("components", {}).get("schemas", {})
    for name in _REQUESTS:
        properties = components.get(name, {}).get("properties")
        if properties is None:
            continue
        properties["model"] = {"type": "string", "enum": [model], "title": "Model"}
        for option in properties["stop"]["anyOf"]:
            if option.get("type") == "string":
                option["maxLength"] = max_stop_length
            elif option.get("type") == "array":
                option["items"]["maxLength"] = max_stop_length
        if "messages" in properties:
            properties["messages"]["maxItems"] = max_messages
        if "prompt" in properties:
            _limit_token_ids(properties["prompt"], vocab_size - 1)
    return schema


def _limit_token_ids(node: Any, highest: int) -> None:
    """Every integer in the prompt's schema is a token id: at most ``highest``."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            node["maximum"] = highest
        for value in node.values():
            _limit_token_ids(value, highest)
    elif isinstance(node, list):
        for value in node:
            _limit_token_ids(value, highest)


def with_device_ids(schema: Schema, device_ids: list[str]) -> Schema:
    """A copy of ``schema`` where ``/api/placement``'s ``without`` names workers, never all
    of them (no device would be left to place layers on)."""
    schema = copy.deepcopy(schema)
    operation = schema.get("paths", {}).get("/api/placement", {}).get("get", {})
    for parameter in operation.get("parameters", []):
        if parameter.get("name") == "without":
            every = [{"contains": {"const": device}} for device in device_ids]
            parameter["schema"].update(
                items={"type": "string", "enum": device_ids}, **{"not": {"allOf": every}}
            )
    return schema


def install_served_schema(app: FastAPI, services: AppServices) -> None:
    """Serve ``/openapi.json`` with :func:`with_device_ids` and, once the pipeline is up,
    :func:`with_served_limits`."""
    built: Callable[[], Schema] = app.openapi  # FastAPI's own, cached after the first call

    def served() -> Schema:
        schema = with_device_ids(built(), [w.id for w in services.config.workers])
        orchestrator = services.orchestrator
        info = orchestrator.model_info if orchestrator is not None else None
        if orchestrator is None or info is None or not orchestrator.ready:
            return schema
        inference = services.config.inference
        return with_served_limits(
            schema,
            model=info.name,
            vocab_size=info.vocab_size,
            max_messages=inference.max_messages,
            max_stop_length=inference.max_stop_length,
        )

    app.openapi = served  # type: ignore[method-assign]
