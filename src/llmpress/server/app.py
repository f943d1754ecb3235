"""The OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions, /v1/models, /health.

Request bodies are parsed here (not by FastAPI's 422 machinery) so every bad request gets a 400 in
OpenAI's error shape with one sentence saying what is wrong. The engine itself lives behind an
AsyncEngine; this module turns its choices (server/choices.py: text pieces, stop strings, logprob entries)
into OpenAI responses, usage and SSE chunks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from contextlib import aclosing, asynccontextmanager
from typing import AsyncIterator, Awaitable, Callable, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmpress.errors import LlmpressError
from llmpress.generation.sampling import SamplingParams
from llmpress.server import protocol as api
from llmpress.server.async_engine import AsyncEngine, EngineDeadError
from llmpress.server.choices import (Choice, Piece, collect_choices, make_choices, merged_pieces, usage_of,
                                     wait_for_first_outputs)
from llmpress.server.logprobs import CompletionLogprobs, TokenText, chat_logprobs
from llmpress.tokenizer import encode_chat, encode_text

log = logging.getLogger(__name__)

Body = TypeVar("Body", bound=BaseModel)


def build_app(async_engine: AsyncEngine, model_name: str) -> FastAPI:
    """The FastAPI app serving `async_engine` under the model id `model_name`; it starts and stops the engine
    thread with the app's lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async_engine.start()
        yield
        await asyncio.to_thread(async_engine.shutdown)

    app = FastAPI(title="llmpress", summary="OpenAI-compatible server for one model", lifespan=lifespan)
    server = _Server(async_engine, model_name)
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        if async_engine.is_healthy:
            return JSONResponse({"status": "ok"})
        error = async_engine.error
        reason = "the engine is not running" if error is None else f"{type(error).__name__}: {error}"
        return JSONResponse({"status": "unhealthy", "reason": reason}, status_code=503)

    @app.get("/v1/models")
    async def models() -> Response:
        card = api.ModelCard(id=model_name, max_model_len=server.max_model_len)
        return JSONResponse(api.ModelList(data=[card]).model_dump())

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await _parse(request, api.CompletionRequest)
        return await server.completion(request, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await _parse(request, api.ChatCompletionRequest)
        return await server.chat_completion(request, body)

    return app


class _Server:
    """The endpoints' logic over one engine: prompts to token ids, outputs to OpenAI responses."""

    def __init__(self, async_engine: AsyncEngine, model_name: str):
        self.async_engine, self.model_name = async_engine, model_name
        engine = async_engine.engine
        self.tokenizer, self.max_model_len = engine.tokenizer, engine.max_model_len
        self.token_text = TokenText(self.tokenizer)

    # -- endpoints ---------------------------------------------------------------------------
    async def completion(self, request: Request, body: api.CompletionRequest) -> Response:
        self._check_model(body.model)
        if body.echo:
            raise api.APIError(400, "echo is not supported; send the prompt text back yourself.", param="echo")
        if body.best_of is not None and body.best_of > 1:
            raise api.APIError(400, "best_of is not supported; use n to get several choices.", param="best_of")
        prompt_ids = self._completion_prompt(body.prompt)
        params = _sampling_params(body, body.max_tokens or 16, logprobs=body.logprobs)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        choices = self._choices(request_id, prompt_ids, params, body)
        # One builder per choice: text offsets run on across a stream's chunks.
        legacy = [CompletionLogprobs(self.token_text) for _ in choices] if body.logprobs is not None else None

        def choice(i: int, text: str, finish_reason: str | None, entries) -> api.CompletionChoice:
            logprobs = None if legacy is None or entries is None else legacy[i](entries)
            return api.CompletionChoice(index=i, text=text, finish_reason=finish_reason, logprobs=logprobs)

        def response(choices: list[api.CompletionChoice], usage: api.Usage | None = None) -> api.CompletionResponse:
            return api.CompletionResponse(id=request_id, model=self.model_name, choices=choices, usage=usage)

        if body.stream:
            return await _stream(request, choices, len(prompt_ids), body.include_usage, first=None,
                                 piece=lambda i, p: response([choice(i, p.text, p.finish_reason, p.logprobs)]),
                                 usage=lambda usage: response([], usage))
        results = await _until_disconnected(request, collect_choices(choices))
        return JSONResponse(response([choice(i, r.text, r.finish_reason, r.logprobs) for i, r in enumerate(results)],
                                     usage_of(choices, len(prompt_ids))).model_dump())

    async def chat_completion(self, request: Request, body: api.ChatCompletionRequest) -> Response:
        self._check_model(body.model)
        if body.top_logprobs and not body.logprobs:
            raise api.APIError(400, "top_logprobs needs logprobs set to true.", param="top_logprobs")
        prompt_ids = self._chat_prompt(body.messages)
        # No limit asked for: OpenAI's default is "until the model stops", here bounded by the context.
        max_tokens = body.max_completion_tokens or body.max_tokens or max(1, self.max_model_len - len(prompt_ids))
        params = _sampling_params(body, max_tokens, logprobs=(body.top_logprobs or 0) if body.logprobs else None)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        choices = self._choices(request_id, prompt_ids, params, body)

        def logprobs(entries) -> api.ChatLogprobs | None:
            return None if entries is None else chat_logprobs(entries, self.token_text)

        def chunk(i: int | None, delta: api.Delta | None = None, finish_reason: str | None = None, entries=None,
                  usage: api.Usage | None = None) -> api.ChatCompletionChunk:
            listed = [] if i is None else [api.ChatStreamChoice(index=i, delta=delta, finish_reason=finish_reason,
                                                                logprobs=logprobs(entries))]
            return api.ChatCompletionChunk(id=request_id, model=self.model_name, choices=listed, usage=usage)

        def piece(i: int, p: Piece) -> api.ChatCompletionChunk:
            # the last chunk's delta is {} unless text remained (OpenAI's shape)
            content = p.text if p.text or p.finish_reason is None else None
            return chunk(i, api.Delta(content=content), p.finish_reason, p.logprobs)

        if body.stream:
            return await _stream(request, choices, len(prompt_ids), body.include_usage,
                                 first=lambda i: chunk(i, api.Delta(role="assistant")), piece=piece,
                                 usage=lambda usage: chunk(None, usage=usage))
        results = await _until_disconnected(request, collect_choices(choices))
        response = api.ChatCompletionResponse(
            id=request_id, model=self.model_name, usage=usage_of(choices, len(prompt_ids)),
            choices=[api.ChatChoice(index=i, message=api.AssistantMessage(content=r.text),
                                    finish_reason=r.finish_reason, logprobs=logprobs(r.logprobs))
                     for i, r in enumerate(results)])
        return JSONResponse(response.model_dump())

    def _choices(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 body: api.SamplingFields) -> list[Choice]:
        return make_choices(self.async_engine, request_id, prompt_ids, params, body.n, self.tokenizer,
                             body.stop_strings)

    # -- request checks ----------------------------------------------------------------------
    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise api.APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}.",
                               param="model", code="model_not_found")

    def _chat_prompt(self, messages: list[api.ChatMessage]) -> list[int]:
        from jinja2 import TemplateError  # transformers renders chat templates with jinja2
        try:
            return encode_chat(self.tokenizer, [{"role": m.role, "content": m.text()} for m in messages])[0].tolist()
        except TemplateError as error:  # e.g. "Conversation roles must alternate user/assistant/...": the messages'
            raise api.APIError(400, f"the model's chat template refused these messages ({error}).",
                               param="messages") from None

    def _completion_prompt(self, prompt) -> list[int]:
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise api.APIError(400, f"got {len(prompt)} prompts but only one prompt per request is supported; "
                                        "send one request per prompt.", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            return encode_text(self.tokenizer, prompt)[0].tolist()
        return list(prompt)  # the engine checks the ids are in its vocabulary


class _AbortingStreamingResponse(StreamingResponse):
    """Closes its body generator however the response ends: a client that went away must not leave its
    request running in the engine until garbage collection gets to the generator."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def _stream(request: Request, choices: list[Choice], prompt_tokens: int, include_usage: bool,
                  first: Callable[[int], BaseModel] | None, piece: Callable[[int, Piece], BaseModel],
                  usage: Callable[[api.Usage], BaseModel]) -> Response:
    """Server-sent events: `first(i)` per choice (if given), a `piece(i, Piece)` chunk per engine output of
    choice i, `usage(Usage)` when asked for, then [DONE]. Errors before the first token are answered as plain
    errors."""
    await _until_disconnected(request, wait_for_first_outputs(choices))

    async def events() -> AsyncIterator[str]:
        try:
            if first is not None:
                for i in range(len(choices)):
                    yield _sse(first(i))
            # aclosing: a client that left closes this generator, and with it every engine request, right away
            async with aclosing(merged_pieces(choices)) as pieces:
                async for i, p in pieces:
                    yield _sse(piece(i, p))
            if include_usage:
                yield _sse(usage(usage_of(choices, prompt_tokens)))
        except Exception as error:  # noqa: BLE001 (the 200 is sent: the error can only travel in the stream)
            if not isinstance(error, (api.APIError, LlmpressError, EngineDeadError)):
                log.error("a streamed request failed", exc_info=error)  # a bug: keep its traceback
            yield f"data: {json.dumps(_api_error(error).body())}\n\n"
        yield "data: [DONE]\n\n"

    return _AbortingStreamingResponse(events(), media_type="text/event-stream",
                                      headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"


Result = TypeVar("Result")


class _ClientDisconnected(Exception):
    """The client went away before its answer was ready."""


async def _until_disconnected(request: Request, work: Awaitable[Result]) -> Result:
    """Run `work`; if the client disconnects first, cancel it (which aborts its engine request) and raise
    _ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled() or not task.done():
        raise _ClientDisconnected()
    return task.result()


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read: the next ASGI message is the disconnect (vLLM's `with_cancellation` does the same).
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sampling_params(body: api.SamplingFields, max_tokens: int, logprobs: int | None) -> SamplingParams:
    """`logprobs`: the engine's setting (None: none; N: the sampled token's and the top N)."""
    if body.presence_penalty or body.frequency_penalty:
        raise api.APIError(400, "presence_penalty and frequency_penalty are not supported; use "
                                "repetition_penalty instead.", param="presence_penalty")
    return SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                          repetition_penalty=body.repetition_penalty, seed=body.seed, ignore_eos=body.ignore_eos,
                          logprobs=logprobs)


async def _parse(request: Request, model: type[Body]) -> Body:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as error:
        raise api.APIError(400, f"the request body is not valid JSON ({error.msg} at character {error.pos}).")
    except UnicodeDecodeError:
        raise api.APIError(400, "the request body is not valid UTF-8 JSON.")
    if not isinstance(data, dict):
        raise api.APIError(400, "the request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise _validation_error(error.errors()) from None


def _validation_error(errors) -> api.APIError:
    """The first pydantic error as one sentence, naming the field."""
    first = errors[0]
    # Drop "body" (FastAPI's prefix) and union member tags such as "str" or "list[TextPart]" (pydantic reports
    # one error per member of a union): the field path is what the client needs.
    loc = [str(part) for part in first["loc"] if part != "body" and not _is_type_tag(part)]
    field = loc[0] if loc else None
    where = ".".join(loc)
    reason = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        message = f"'{where}' is a required field." if where else "the request body is missing."
    else:
        message = f"{where}: {reason}." if where else f"{reason}."
    return api.APIError(400, message, param=field)


def _is_type_tag(part) -> bool:
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "none"))


def _api_error(error: Exception) -> api.APIError:
    if isinstance(error, api.APIError):
        return error
    if isinstance(error, LlmpressError):
        return api.APIError(400, str(error))
    if isinstance(error, EngineDeadError):
        return api.APIError(500, str(error), code="engine_dead")
    return api.APIError(500, f"internal server error ({type(error).__name__}: {error}).")


def _add_error_handlers(app: FastAPI) -> None:
    def respond(error: api.APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status_code)

    @app.exception_handler(api.APIError)
    @app.exception_handler(LlmpressError)
    @app.exception_handler(EngineDeadError)
    async def on_request_error(request: Request, error: Exception) -> JSONResponse:
        return respond(_api_error(error))

    @app.exception_handler(_ClientDisconnected)
    async def on_client_gone(request: Request, error: _ClientDisconnected) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; nobody is there to read it

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return respond(_validation_error(error.errors()))  # OpenAI answers 400, not FastAPI's 422

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return respond(api.APIError(error.status_code, f"{error.detail} ({request.method} {request.url.path})."))

    @app.exception_handler(Exception)  # a bug: Starlette answers with this, then re-raises so it is logged
    async def on_internal_error(request: Request, error: Exception) -> JSONResponse:
        return respond(_api_error(error))
