"""The OpenAPI schema ``idlm serve`` publishes, made to tell the truth.

FastAPI derives a schema from the request models, but the server enforces more than the
models say (n = 1, no penalties, one prompt per request, token ids inside the vocabulary
and not the MASK id, the context length) and answers errors as OpenAI bodies with 400,
404, 429 and 503, never FastAPI's 422. A client, or a fuzzer such as schemathesis, reads
this schema; so every rule the server checks is written into it here, from the loaded
engine, and every status it answers is listed with the error body's shape.
"""

from __future__ import annotations

import inspect
from typing import Any

from fastapi.openapi.utils import get_openapi

ERROR_BODY = {
    "type": "object", "required": ["error"], "title": "ErrorBody",
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]},
                       "code": {"type": ["string", "null"]}}}},
}
_ERROR_REF = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
_WHY = {400: "the request is malformed or asks for something this server cannot do",
        404: "no such model (or route)", 429: "the server is at capacity: retry later",
        503: "the engine thread has stopped"}
# Route -> the error statuses it answers (405 for other methods is answered, with Allow).
ROUTE_ERRORS = {"/v1/chat/completions": (400, 404, 429), "/v1/completions": (400, 404, 429),
                "/v1/models/{model}": (404,), "/health": (503,)}
# apply_chat_template's own keywords and the template's variables: a chat_template_kwargs
# key among them collides (a 400), so the schema excludes them.
_TEMPLATE_VARIABLES = ("messages", "conversation", "tools", "documents", "add_generation_prompt")


def truthful_openapi(app: Any, engine: Any, model_name: str) -> dict[str, Any]:
    """The app's schema with the server's real errors and the engine's limits."""
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    components["ErrorBody"] = ERROR_BODY
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            _document_errors(operation, ROUTE_ERRORS.get(path, ()))
    model_path = schema["paths"]["/v1/models/{model}"]["get"]
    model_path["parameters"][0]["schema"]["examples"] = [model_name]  # the one that exists
    for path in ("/v1/chat/completions", "/v1/completions"):
        ok = schema["paths"][path]["post"]["responses"]["200"]["content"]
        ok["text/event-stream"] = {}  # when "stream": true: OpenAI's chunk events
    _constrain_sampling(components)
    _constrain_prompt(components["CompletionRequest"]["properties"], engine)
    _constrain_chat(components, engine)
    schema["info"]["description"] = (
        f"Serves {model_name!r}. Text prompts and chats must also fit the model's context "
        f"of {engine.context_length} tokens once tokenized (a 400 otherwise).")
    return schema


def _document_errors(operation: dict[str, Any], statuses: tuple[int, ...]) -> None:
    responses = operation.setdefault("responses", {})
    responses.pop("422", None)   # validation errors are answered as 400 OpenAI bodies
    if "requestBody" in operation:
        statuses = tuple(sorted({400, *statuses}))
    for status in statuses:
        responses[str(status)] = {"description": _WHY[status], "content": _ERROR_REF}


def _constrain_sampling(components: dict[str, Any]) -> None:
    """The fields accepted only at their neutral values (see SamplingFields)."""
    neutral = {
        "n": {"anyOf": [{"const": 1}, {"type": "null"}]},
        "best_of": {"anyOf": [{"const": 1}, {"type": "null"}]},
        "presence_penalty": {"anyOf": [{"const": 0}, {"type": "null"}]},
        "frequency_penalty": {"anyOf": [{"const": 0}, {"type": "null"}]},
        "logit_bias": {"anyOf": [{"type": "object", "maxProperties": 0}, {"type": "null"}]},
        "logprobs": {"anyOf": [{"const": False}, {"const": 0}, {"type": "null"}]},
        "top_logprobs": {"anyOf": [{"const": 0}, {"type": "null"}]},
        "tools": {"anyOf": [{"type": "array", "maxItems": 0}, {"type": "null"}]},
        "response_format": {"anyOf": [{"type": "null"}, {
            "type": "object", "properties": {"type": {"const": "text"}}}]},
        "stop": {"anyOf": [{"type": "string", "minLength": 1}, {"type": "null"}, {
            "type": "array", "maxItems": 16, "items": {"type": "string", "minLength": 1}}]},
    }
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        properties = components[name]["properties"]
        for field, rule in neutral.items():
            properties[field] = {**rule, "title": properties[field].get("title", field)}
    completion = components["CompletionRequest"]["properties"]
    completion["echo"] = {"anyOf": [{"const": False}, {"type": "null"}], "title": "Echo"}
    completion["suffix"] = {"anyOf": [{"type": "string", "maxLength": 0}, {"type": "null"}],
                            "title": "Suffix"}


def _token_ids(engine: Any) -> dict[str, Any]:
    token = {"type": "integer", "minimum": 0, "maximum": engine.vocab_size - 1,
             "not": {"const": engine.mask_token_id}}   # MASK is reserved for drafting
    return {"type": "array", "items": token, "minItems": 1,
            "maxItems": engine.context_length - 1}


def _constrain_prompt(properties: dict[str, Any], engine: Any) -> None:
    """One prompt per request: a non-empty text or token ids the model can read."""
    text = {"type": "string", "minLength": 1}
    ids = _token_ids(engine)
    properties["prompt"] = {"title": "Prompt", "anyOf": [
        text, ids, {"type": "array", "items": text, "minItems": 1, "maxItems": 1},
        {"type": "array", "items": ids, "minItems": 1, "maxItems": 1}]}


def _constrain_chat(components: dict[str, Any], engine: Any) -> None:
    text_part = {"type": "object", "required": ["type", "text"],
                 "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
    components["ChatMessage"]["properties"]["content"] = {"title": "Content", "anyOf": [
        {"type": "string"}, {"type": "array", "items": text_part}, {"type": "null"}]}
    reserved = reserved_template_keys(engine.tokenizer)
    components["ChatCompletionRequest"]["properties"]["chat_template_kwargs"] = {
        "title": "Chat Template Kwargs", "anyOf": [{"type": "null"}, {
            "type": "object", "propertyNames": {"not": {"enum": reserved}}}]}


def reserved_template_keys(tokenizer: Any) -> list[str]:
    """chat_template_kwargs keys the server refuses: they would collide with a keyword of
    apply_chat_template or a variable the template is rendered with."""
    parameters = inspect.signature(tokenizer.apply_chat_template).parameters.values()
    keywords = [p.name for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD]
    return sorted({*_TEMPLATE_VARIABLES, *keywords})
