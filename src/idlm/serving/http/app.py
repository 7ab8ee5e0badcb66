"""The FastAPI app: routes, request -> engine request, results -> OpenAI bodies / SSE.

Every error is an OpenAI-style body (``{"error": {message, type, param, code}}``) with a
4xx/5xx status; nothing a client sends can stop the engine thread. (Imported only when
a server is built, so fastapi loads here at module level: its route annotations must
resolve from this module's globals.)
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from idlm.decoding.requests import GenerationRequest, GenerationResult, SamplingParams
from idlm.serving.http import protocol as wire
from idlm.serving.http.openapi import reserved_template_keys
from idlm.serving.http.protocol import APIError
from idlm.serving.http.settings import LOG, ServerSettings
from idlm.serving.http.text import TextStream, chat_prompt_ids, text_ids
from idlm.serving.http.worker import (
    DoneEvent,
    EngineWorker,
    Event,
    FailedEvent,
    Overloaded,
    TokensEvent,
)

Kind = Literal["chat", "completion"]
DISCONNECT_POLL_S = 1.0
SEED_RANGE = 1 << 63


class Service:
    """The handlers' logic, apart from FastAPI so each piece stays small."""

    def __init__(self, engine: Any, settings: ServerSettings) -> None:
        if engine.tokenizer is None:
            raise ValueError("the engine has no tokenizer: the server needs one")
        self.engine, self.settings, self.tokenizer = engine, settings, engine.tokenizer
        session = engine.open_session(max_stride=settings.engine_stride,
                                      max_new_tokens=settings.max_new_tokens)
        self.worker = EngineWorker(session, max_waiting=settings.max_waiting)
        self.created = int(time.time())
        self.reserved_template_keys = set(reserved_template_keys(self.tokenizer))

    # ------------------------------------------------------------------ requests
    def engine_request(self, fields: wire.SamplingFields, prompt_ids: list[int],
                       prompt_param: str) -> GenerationRequest:
        """The engine request for validated fields; a 400/404 for what it cannot run."""
        if fields.model is not None and fields.model != self.settings.model_name:
            raise APIError(404, f"the model {fields.model!r} does not exist: this server "
                                f"serves {self.settings.model_name!r}", param="model",
                           code="model_not_found")
        problem = fields.unsupported_field()
        if problem is not None:
            raise problem
        cap = self.worker.session.max_new_tokens
        room = max(1, self.engine.context_length - len(prompt_ids))
        wanted = fields.requested_max_tokens()
        temperature = 1.0 if fields.temperature is None else fields.temperature
        seed = fields.seed % SEED_RANGE if fields.seed is not None else \
            secrets.randbelow(SEED_RANGE)
        sampling = SamplingParams(
            temperature=temperature, top_p=1.0 if fields.top_p is None else fields.top_p,
            top_k=max(0, fields.top_k or 0),
            max_new_tokens=min(cap, room if wanted is None else wanted),
            stop_token_ids=() if fields.ignore_eos else None,
            stop_strings=fields.stop_strings(), seed=seed)
        request = GenerationRequest(prompt_ids, self.settings.engine_mode,
                                    self.settings.engine_stride, sampling)
        error = self.worker.validate(request)
        if error is not None:
            raise APIError(400, error, param=prompt_param)
        return request

    def chat_request(self, body: wire.ChatCompletionRequest) -> GenerationRequest:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        reserved = sorted(set(body.chat_template_kwargs or {}) & self.reserved_template_keys)
        if reserved:
            raise APIError(400, f"chat_template_kwargs key {reserved[0]!r} is reserved (a "
                                "template variable or apply_chat_template keyword)",
                           param="chat_template_kwargs")
        ids = chat_prompt_ids(self.tokenizer, messages, body.chat_template_kwargs,
                              body.add_generation_prompt)
        return self.engine_request(body, ids, "messages")

    def completion_request(self, body: wire.CompletionRequest) -> GenerationRequest:
        prompt = body.single_prompt()
        ids = text_ids(self.tokenizer, prompt) if isinstance(prompt, str) else list(prompt)
        return self.engine_request(body, ids, "prompt")

    # ------------------------------------------------------------------ answers
    async def answer(self, kind: Kind, fields: wire.SamplingFields,
                     request: GenerationRequest, http_request: Any) -> Any:
        events: asyncio.Queue[Event] = asyncio.Queue()
        ticket = self._submit(request, events, stream=bool(fields.stream))
        if fields.stream:
            return StreamingResponse(
                self._sse(kind, fields, request, events, ticket), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        result = await self._await_result(events, ticket, http_request)
        if result is None:   # the client went away; nobody reads this
            return JSONResponse(wire.error_body("client disconnected"), status_code=499)
        text = TextStream(self.tokenizer, request.sampling.stop_strings).full_text(
            result.token_ids)
        build = wire.chat_response if kind == "chat" else wire.completion_response
        return build(wire.new_id(kind), self.settings.model_name, text,
                     wire.finish_reason(result.finish_reason), self._usage(request, result),
                     self.settings.fingerprint)

    def _submit(self, request: GenerationRequest, events: asyncio.Queue[Event],
                stream: bool) -> int:
        loop = asyncio.get_running_loop()

        def sink(event: Event) -> None:   # called on the engine thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:   # the event loop closed (shutdown): nobody waits
                pass

        try:
            return self.worker.submit(request, sink, stream=stream)
        except Overloaded as error:
            raise APIError(429, str(error), type="rate_limit_error",
                           code="rate_limit_exceeded") from None

    async def _await_result(self, events: asyncio.Queue[Event], ticket: int,
                            http_request: Any) -> GenerationResult | None:
        getter = asyncio.ensure_future(events.get())
        try:
            while True:
                done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S)
                if not done:
                    if await http_request.is_disconnected():
                        self.worker.cancel(ticket)
                        return None
                    continue
                event = getter.result()
                if isinstance(event, DoneEvent):
                    return _checked(event.result)
                if isinstance(event, FailedEvent):
                    raise APIError(event.status, event.message, type="server_error")
                getter = asyncio.ensure_future(events.get())
        except asyncio.CancelledError:
            self.worker.cancel(ticket)
            raise
        finally:
            getter.cancel()

    async def _sse(self, kind: Kind, fields: wire.SamplingFields, request: GenerationRequest,
                   events: asyncio.Queue[Event], ticket: int) -> AsyncIterator[str]:
        """Text deltas as tokens are committed; a failure is one error chunk."""
        writer = wire.ChunkWriter(kind, self.settings.model_name, self.settings.fingerprint,
                                  fields.stream_options, len(request.prompt_ids))
        stream = TextStream(self.tokenizer, request.sampling.stop_strings)
        finished = False
        try:
            if kind == "chat":
                yield writer.text("", role=True)
            while not finished:
                event = await events.get()
                if isinstance(event, TokensEvent):
                    writer.completion_tokens += len(event.token_ids)
                    delta = stream.push(event.token_ids)
                    if delta:
                        yield writer.text(delta)
                    continue
                finished = True
                if isinstance(event, FailedEvent):
                    yield writer.error(event.message)
                elif not event.result.ok:
                    yield writer.error(event.result.error or "invalid request")
                else:
                    result = event.result
                    writer.completion_tokens = len(result.token_ids)
                    rest = stream.finish(result.token_ids)
                    yield writer.text(rest or None,
                                      finish_reason=wire.finish_reason(result.finish_reason))
                    if writer.options.include_usage:
                        yield writer.final_usage(self._usage(request, result))
            yield writer.done()
        finally:
            if not finished:   # the client went away mid-stream
                self.worker.cancel(ticket)

    @staticmethod
    def _usage(request: GenerationRequest, result: GenerationResult) -> dict[str, Any]:
        return wire.usage(len(request.prompt_ids), len(result.token_ids),
                          result.stats.as_dict())

    # ------------------------------------------------------------------ info
    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": self.settings.model_name, "object": "model", "created": self.created,
            "owned_by": "idlm", "max_model_len": self.engine.context_length,
            "mode": self.settings.mode, "stride": self.settings.engine_stride}]}

    def metrics(self) -> dict[str, Any]:
        settings, worker = self.settings, self.worker
        return {"model": settings.model_name, "mode": settings.mode,
                "stride": settings.engine_stride, "max_batch_size": self.engine.max_batch_size,
                "max_waiting": worker.max_waiting,
                **worker.metrics.snapshot(worker.in_flight)}


def _checked(result: GenerationResult) -> GenerationResult:
    if not result.ok:   # validated before submission, so this is rare (e.g. a race)
        raise APIError(400, result.error or "invalid request")
    return result


def build_app(engine: Any, settings: ServerSettings) -> FastAPI:
    """The FastAPI app; its lifespan starts and stops the engine thread."""
    service = Service(engine, settings)

    @asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        service.worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(service.worker.stop)

    app = FastAPI(title="idlm serve", lifespan=lifespan)
    app.state.service = service
    _install_error_handlers(app, service)
    _publish_truthful_schema(app, engine, settings.model_name)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return service.models()

    @app.get("/v1/models/{model}")
    async def model(model: str) -> dict[str, Any]:
        if model != settings.model_name:
            raise APIError(404, f"the model {model!r} does not exist: this server serves "
                                f"{settings.model_name!r}", param="model",
                           code="model_not_found")
        return service.models()["data"][0]

    @app.get("/health")
    async def health() -> Any:
        alive = service.worker.alive
        return JSONResponse({"status": "ok" if alive else "stopped"},
                            status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics() -> dict[str, Any]:
        return service.metrics()

    @app.post("/v1/chat/completions")
    async def chat(body: wire.ChatCompletionRequest, request: Request) -> Any:
        return await service.answer("chat", body, service.chat_request(body), request)

    @app.post("/v1/completions")
    async def completions(body: wire.CompletionRequest, request: Request) -> Any:
        return await service.answer("completion", body, service.completion_request(body),
                                    request)

    return app


def _publish_truthful_schema(app: FastAPI, engine: Any, model_name: str) -> None:
    """/openapi.json states the statuses and limits the server enforces (built once)."""
    from idlm.serving.http.openapi import truthful_openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = truthful_openapi(app, engine, model_name)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _install_error_handlers(app: FastAPI, service: Service) -> None:
    def reply(status: int, message: str, type: str = "invalid_request_error",
              param: str | None = None, code: str | None = None) -> JSONResponse:
        if 400 <= status < 500:
            service.worker.metrics.count("requests_bad" if status != 429 else "http_429")
        return JSONResponse(wire.error_body(message, type, param, code), status_code=status)

    @app.exception_handler(APIError)
    async def api_error(_: Any, error: APIError) -> JSONResponse:
        return reply(error.status, error.message, error.type, error.param, error.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Any, error: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(error.errors())
        return reply(400, message, param=param)

    @app.exception_handler(HTTPException)
    async def http_error(_: Any, error: HTTPException) -> JSONResponse:
        answer = reply(error.status_code, str(error.detail),
                       "not_found_error" if error.status_code == 404 else "invalid_request_error")
        answer.headers.update(error.headers or {})  # a 405 keeps its Allow header (RFC 9110)
        return answer

    @app.exception_handler(Exception)
    async def crash(_: Any, error: Exception) -> JSONResponse:
        LOG.exception("request failed")
        return reply(500, f"internal error: {type(error).__name__}: {error}", "server_error")


def _validation_message(errors: Any) -> tuple[str, str | None]:
    """One line for pydantic's first complaint, and the field it is about."""
    first = list(errors)[0] if errors else {"msg": "invalid request", "loc": ()}
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('msg')}", None
    if first.get("type") == "missing" and not location:
        return "the request has no JSON body", None
    if not location:   # the body parsed, but is not an object (a list, a form, ...)
        return "the request body must be a JSON object", None
    param = ".".join(location) or None
    return (f"{param}: {first.get('msg')}" if param else str(first.get("msg"))), param
