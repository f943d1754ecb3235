"""The OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions, /v1/models, /health.

Request bodies are parsed here (not by FastAPI's 422 machinery) so every bad request gets a 400 in
OpenAI's error shape with one sentence saying what is wrong. The engine itself lives behind an
AsyncEngine; this module turns its token outputs into text, stop strings, usage and SSE chunks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from contextlib import aclosing, asynccontextmanager
from typing import AsyncIterator, Awaitable, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmpress.errors import LlmpressError
from llmpress.generation.sampling import SamplingParams
from llmpress.server import protocol as api
from llmpress.server.async_engine import AsyncEngine, EngineDeadError
from llmpress.server.text_stream import CompletionText
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

    # -- endpoints ---------------------------------------------------------------------------
    async def completion(self, request: Request, body: api.CompletionRequest) -> Response:
        self._check_model(body.model)
        if body.echo:
            raise api.APIError(400, "echo is not supported; send the prompt text back yourself.", param="echo")
        prompt_ids = self._completion_prompt(body.prompt)
        params = _sampling_params(body, body.max_tokens or 16)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        generation = _Generation(self.async_engine, request_id, prompt_ids, params,
                                 CompletionText(self.tokenizer, body.stop_strings))

        def chunk(text: str, finish_reason: str | None, usage: api.Usage | None = None,
                  final_usage_only: bool = False) -> api.CompletionResponse:
            choices = [] if final_usage_only else [api.CompletionChoice(text=text, finish_reason=finish_reason)]
            return api.CompletionResponse(id=request_id, model=self.model_name, choices=choices, usage=usage)

        if body.stream:
            return await _stream(request, generation, body.include_usage,
                                 first=None, piece=lambda text, reason: chunk(text, reason),
                                 usage=lambda usage: chunk("", None, usage, final_usage_only=True))
        text = await _until_disconnected(request, generation.collect())
        return JSONResponse(chunk(text, generation.finish_reason, generation.usage()).model_dump())

    async def chat_completion(self, request: Request, body: api.ChatCompletionRequest) -> Response:
        self._check_model(body.model)
        prompt_ids = self._chat_prompt(body.messages)
        # No limit asked for: OpenAI's default is "until the model stops", here bounded by the context.
        max_tokens = body.max_completion_tokens or body.max_tokens or max(1, self.max_model_len - len(prompt_ids))
        params = _sampling_params(body, max_tokens)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        generation = _Generation(self.async_engine, request_id, prompt_ids, params,
                                 CompletionText(self.tokenizer, body.stop_strings))

        def chunk(delta: api.Delta | None, finish_reason: str | None = None,
                  usage: api.Usage | None = None) -> api.ChatCompletionChunk:
            choices = [] if delta is None else [api.ChatStreamChoice(delta=delta, finish_reason=finish_reason)]
            return api.ChatCompletionChunk(id=request_id, model=self.model_name, choices=choices, usage=usage)

        if body.stream:
            return await _stream(request, generation, body.include_usage,
                                 first=chunk(api.Delta(role="assistant")),
                                 # the last chunk's delta is {} unless text remained (OpenAI's shape)
                                 piece=lambda text, reason: chunk(api.Delta(content=text if text or reason is None
                                                                            else None), reason),
                                 usage=lambda usage: chunk(None, usage=usage))
        text = await _until_disconnected(request, generation.collect())
        response = api.ChatCompletionResponse(
            id=request_id, model=self.model_name, usage=generation.usage(),
            choices=[api.ChatChoice(message=api.AssistantMessage(content=text), finish_reason=generation.finish_reason)])
        return JSONResponse(response.model_dump())

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


class _Generation:
    """One request in flight: engine outputs turned into text pieces, plus the counts `usage` reports."""

    def __init__(self, async_engine: AsyncEngine, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 text: CompletionText):
        self.outputs = async_engine.generate(request_id, prompt_ids, params)
        self.text, self.prompt_tokens = text, len(prompt_ids)
        self.completion_tokens = self.cached_tokens = 0
        self.finish_reason: str | None = None
        self._first = None

    async def start(self) -> None:
        """Wait for the first output: the engine's refusal (prompt too long, ...) is raised here."""
        self._first = await anext(self.outputs)

    async def pieces(self) -> AsyncIterator[str]:
        """Text as it is released; `finish_reason` is set when the last piece has been yielded."""
        async with aclosing(self.outputs) as outputs:  # closing it aborts the request if it is still running
            if self._first is None:
                await self.start()
            output, self._first = self._first, None
            while True:
                piece = self.text.push(output.new_token_ids)
                self.completion_tokens += len(output.new_token_ids)
                self.cached_tokens = output.num_cached_tokens
                if self.text.stopped:  # a stop string: end here; leaving the block aborts the engine request
                    self.finish_reason = "stop"
                elif output.finished:
                    piece += self.text.finish()
                    self.finish_reason = output.finish_reason
                yield piece
                if self.finish_reason is not None:
                    return
                output = await anext(outputs)

    async def collect(self) -> str:
        return "".join([piece async for piece in self.pieces()])

    def usage(self) -> api.Usage:
        return api.Usage.of(self.prompt_tokens, self.completion_tokens, self.cached_tokens)


class _AbortingStreamingResponse(StreamingResponse):
    """Closes its body generator however the response ends: a client that went away must not leave its
    request running in the engine until garbage collection gets to the generator."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def _stream(request: Request, generation: _Generation, include_usage: bool, first, piece, usage) -> Response:
    """Server-sent events: `first` (if any), a `piece(text, finish_reason)` chunk per engine output,
    `usage(Usage)` when asked for, then [DONE]. Errors before the first token are answered as plain errors."""
    await _until_disconnected(request, generation.start())

    async def events() -> AsyncIterator[str]:
        try:
            if first is not None:
                yield _sse(first)
            # aclosing: a client that left closes this generator, and with it the engine request, right away
            async with aclosing(generation.pieces()) as pieces:
                async for text in pieces:
                    yield _sse(piece(text, generation.finish_reason))
            if include_usage:
                yield _sse(usage(generation.usage()))
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


def _sampling_params(body: api.SamplingFields, max_tokens: int) -> SamplingParams:
    if body.n != 1:
        raise api.APIError(400, f"n must be 1 (got {body.n}); llmpress returns one choice per request, "
                                "so send n requests instead.", param="n")
    if body.logprobs:
        raise api.APIError(400, "logprobs are not supported by this server.", param="logprobs")
    if body.presence_penalty or body.frequency_penalty:
        raise api.APIError(400, "presence_penalty and frequency_penalty are not supported; use "
                                "repetition_penalty instead.", param="presence_penalty")
    return SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                          repetition_penalty=body.repetition_penalty, seed=body.seed, ignore_eos=body.ignore_eos)


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
