"""The OpenAI-compatible wire format: request schemas, errors, response and chunk bodies.

Requests are strict pydantic models (``"max_tokens": "5"`` or ``"stream": 0`` is a 400, as
the published schema says) that ignore fields they do not know (clients such as the
openai package and guidellm send many); fields whose non-default value would change
the output in a way the engine cannot honour (n > 1, logprobs, tools, penalties, ...)
are refused with a 400 that names the field. Extensions from vLLM / SGLang: ``top_k``,
``ignore_eos``, ``chat_template_kwargs``, ``stream_options.continuous_usage_stats``.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

MAX_STOP_STRINGS = 16


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# An integer as JSON Schema counts them: 219.0 is one, "219" and 219.5 are not. (Bounds go
# before the validator, as in max_tokens, or the published schema loses them.)
JsonInt = Annotated[int, BeforeValidator(_integral)]


class APIError(Exception):
    """An error answered with an OpenAI-style body and an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type, param, code)

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False
    continuous_usage_stats: bool = False


class SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: Annotated[int, Field(ge=-1), BeforeValidator(_integral)] | None = None
    max_tokens: Annotated[int, Field(ge=1), BeforeValidator(_integral)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1), BeforeValidator(_integral)] | None = None
    stop: str | list[str] | None = None
    seed: JsonInt | None = None
    n: JsonInt | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = False
    # Accepted only at their neutral values (see ``unsupported_field``).
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: bool | JsonInt | None = None
    top_logprobs: JsonInt | None = None
    best_of: JsonInt | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise APIError(400, f"stop has {len(stops)} strings: at most {MAX_STOP_STRINGS}",
                           param="stop")
        if any(not stop for stop in stops):
            raise APIError(400, "stop strings must not be empty", param="stop")
        return tuple(stops)

    def requested_max_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def unsupported_field(self) -> APIError | None:
        """The first field set to something this server cannot do, as a 400."""
        checks = [
            ("n", self.n not in (None, 1), "only n=1 is supported: send n separate requests"),
            ("best_of", self.best_of not in (None, 1), "best_of > 1 is not supported"),
            ("presence_penalty", bool(self.presence_penalty), "penalties are not supported"),
            ("frequency_penalty", bool(self.frequency_penalty), "penalties are not supported"),
            ("logit_bias", bool(self.logit_bias), "logit_bias is not supported"),
            ("logprobs", bool(self.logprobs), "logprobs are not supported"),
            ("top_logprobs", bool(self.top_logprobs), "logprobs are not supported"),
            ("tools", bool(self.tools), "tool calling is not supported"),
            ("response_format", (self.response_format or {}).get("type", "text") != "text",
             "only response_format type 'text' is supported"),
        ]
        for param, bad, message in checks:
            if bad:
                return APIError(400, message, param=param)
        return None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """String content, or the text parts of a multi-part content (images refused)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"content part of type {part.get('type')!r} is not "
                                    "supported: send text parts only", param="messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[JsonInt] | list[list[JsonInt]]
    echo: bool | None = False
    suffix: str | None = None

    def single_prompt(self) -> str | list[int]:
        """The one prompt (text or token ids); batches of prompts are refused."""
        if self.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if self.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return prompt
        if len(prompt) != 1:
            raise APIError(400, f"prompt is a batch of {len(prompt)}: send one prompt per "
                                "request", param="prompt")
        return prompt[0]


# ---------------------------------------------------------------------- responses
def new_id(kind: Literal["chat", "completion"]) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int,
          decoding: dict[str, Any] | None = None) -> dict[str, Any]:
    """OpenAI usage plus ``decoding``: the request's ISD statistics (TPF, acceptance)."""
    body: dict[str, Any] = {"prompt_tokens": prompt_tokens,
                            "completion_tokens": completion_tokens,
                            "total_tokens": prompt_tokens + completion_tokens}
    if decoding is not None:
        body["decoding"] = decoding
    return body


def chat_response(request_id: str, model: str, text: str, finish_reason: str,
                  usage_body: dict[str, Any], fingerprint: str) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()),
            "model": model, "system_fingerprint": fingerprint,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage_body}


def completion_response(request_id: str, model: str, text: str, finish_reason: str,
                        usage_body: dict[str, Any], fingerprint: str) -> dict[str, Any]:
    return {"id": request_id, "object": "text_completion", "created": int(time.time()),
            "model": model, "system_fingerprint": fingerprint,
            "choices": [{"index": 0, "text": text, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": usage_body}


def chunk(kind: Literal["chat", "completion"], request_id: str, model: str, created: int,
          fingerprint: str, *, text: str | None = None, role: bool = False,
          finish_reason: str | None = None, usage_body: dict[str, Any] | None = None,
          with_usage: bool = False, no_choices: bool = False) -> dict[str, Any]:
    """One streamed chunk. ``no_choices``: the final usage-only chunk (``choices: []``)."""
    if kind == "chat":
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None,
                                  "finish_reason": finish_reason}
        body = {"id": request_id, "object": "chat.completion.chunk"}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None,
                  "finish_reason": finish_reason}
        body = {"id": request_id, "object": "text_completion"}
    body.update({"created": created, "model": model, "system_fingerprint": fingerprint,
                 "choices": [] if no_choices else [choice]})
    if with_usage:
        body["usage"] = usage_body
    return body


def finish_reason(engine_reason: str) -> str:
    """The engine's stop / stop_string / length as OpenAI's stop / length."""
    return "length" if engine_reason == "length" else "stop"


class ChunkWriter:
    """The SSE lines of one streamed answer (``data: {chunk}``, then ``data: [DONE]``).

    ``include_usage`` puts ``usage: null`` on every chunk and the usage on a last chunk
    with no choices (OpenAI); ``continuous_usage_stats`` puts running counts on every
    chunk (vLLM's extension, which guidellm asks for).
    """

    def __init__(self, kind: Literal["chat", "completion"], model: str, fingerprint: str,
                 options: StreamOptions | None, prompt_tokens: int) -> None:
        self.kind, self.model, self.fingerprint = kind, model, fingerprint
        self.options = options or StreamOptions()
        self.request_id, self.created = new_id(kind), int(time.time())
        self.prompt_tokens, self.completion_tokens = prompt_tokens, 0

    def text(self, delta: str | None, *, role: bool = False,
             finish_reason: str | None = None) -> str:
        return self._line(text=delta, role=role, finish_reason=finish_reason)

    def final_usage(self, usage_body: dict[str, Any]) -> str:
        return self._line(no_choices=True, usage_body=usage_body)

    @staticmethod
    def error(message: str) -> str:
        return sse_line(error_body(message, "server_error"))

    @staticmethod
    def done() -> str:
        return "data: [DONE]\n\n"

    def _line(self, **parts: Any) -> str:
        if self.options.continuous_usage_stats and "usage_body" not in parts:
            parts["usage_body"] = usage(self.prompt_tokens, self.completion_tokens)
        with_usage = self.options.include_usage or self.options.continuous_usage_stats
        return sse_line(chunk(self.kind, self.request_id, self.model, self.created,
                              self.fingerprint, with_usage=with_usage, **parts))


def sse_line(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"
