"""The OpenAI-compatible HTTP API over an `Engine`.

Errors use OpenAI's JSON shape `{"error": {message, type, param, code}}`. `/health` and
`/metrics` need no API key: load balancers and Prometheus probe them without
credentials, and they reveal only readiness and aggregate counters (never prompts).
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at
# runtime, and `Ready` below is local to `create_app`.
import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from cluster.errors import SpecshardError
from cluster.sampling import SamplingParams
from coordinator.api_types import (
    ChatCompletionRequest,
    ChatShape,
    CompletionRequest,
    ErrorBody,
    ErrorDetail,
    ModelCard,
    ModelList,
    Sampling,
    Shape,
    TextShape,
)
from coordinator.engine import (
    ContextExceeded,
    Engine,
    Event,
    Finished,
    GenerationRequest,
    QueueFull,
    TextChunk,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
# What `generate_latest` writes: the classic text format, which every scraper reads.
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _fingerprint() -> str:
    try:
        return f"specshard-{version('specshard')}"
    except PackageNotFoundError:
        return "specshard"


@dataclass
class ServerState:
    """What the app serves; `serve` fills `engine` in once the cluster is up."""

    engine: Engine | None
    api_key: str | None = None
    cluster_info: Callable[[], dict[str, object]] | None = None
    model_names: tuple[str, ...] = ()  # accepted in `model`; default: the engine's name

    def names(self, engine: Engine) -> tuple[str, ...]:
        return self.model_names or (engine.model_name,)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.headers = status, headers
        self.detail = ErrorDetail(message=message, type=type_, param=param, code=code)

    def response(self) -> JSONResponse:
        return JSONResponse(ErrorBody(error=self.detail).model_dump(), self.status,
                            headers=self.headers)


def _param(errors: list[dict[str, Any]]) -> str | None:
    """The field a validation error is about, as `messages[0].content`.

    A union (`stop: str | list`) reports one error per member, with the member's name
    appended to the location; the common prefix of those locations is the field."""
    first = errors[0]
    if first["type"] == "json_invalid":
        return None
    locs = [e["loc"] for e in errors if e["loc"][:2] == first["loc"][:2]]
    common = []
    for parts in zip(*locs, strict=False):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    text = ""
    for part in common[1:]:  # [0] is "body"
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".") or None


def _install_error_handlers(app: FastAPI, state: ServerState) -> None:
    def count(outcome: str) -> None:
        if state.engine is not None:
            state.engine.metrics.requests.labels(outcome=outcome).inc()

    async def api_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return exc.response()

    async def invalid_body(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = list(exc.errors())
        param = _param(errors)
        message = errors[0]["msg"] if errors else "invalid request"
        count("invalid")
        return ApiError(400, f"{param}: {message}" if param else message,
                        param=param).response()

    async def http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return ApiError(exc.status_code, str(exc.detail),
                        headers=dict(exc.headers) if exc.headers else None).response()

    async def queue_full(_: Request, exc: Exception) -> Response:
        count("rejected")
        return ApiError(429, str(exc), "rate_limit_error", "rate_limit_exceeded",
                        headers={"Retry-After": "1"}).response()

    async def too_long(request: Request, exc: Exception) -> Response:
        count("invalid")
        param = "messages" if request.url.path.endswith("/chat/completions") else "prompt"
        return ApiError(400, str(exc), code="context_length_exceeded", param=param).response()

    async def invalid(_: Request, exc: Exception) -> Response:
        count("invalid")
        return ApiError(400, str(exc)).response()

    async def internal(_: Request, exc: Exception) -> Response:
        count("error")  # Starlette re-raises it after this answer: uvicorn logs it
        return ApiError(500, "internal error; see the server log", "server_error",
                        "internal_error").response()

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_body)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(QueueFull, queue_full)
    app.add_exception_handler(ContextExceeded, too_long)
    app.add_exception_handler(SpecshardError, invalid)
    app.add_exception_handler(Exception, internal)


# --- talking to the engine -----------------------------------------------------------------


async def _hang_up(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(request: Request, work: Awaitable[T]) -> T | None:
    """`work`'s result, or None when the client hangs up first (`work` is cancelled)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_hang_up(request))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        task.cancel()
        gone.cancel()
    if task in done:
        return task.result()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


async def _collect(events: AsyncIterator[Event]) -> tuple[str, Finished]:
    text: list[str] = []
    async for event in events:
        if isinstance(event, Finished):
            return "".join(text), event
        text.append(event.text)
    raise RuntimeError("the engine stopped without finishing")  # only when cancelled


def _sse(obj: BaseModel) -> str:
    return f"data: {obj.model_dump_json()}\n\n"


class EventStream(StreamingResponse):
    """Server-sent events whose generator is closed as soon as the response ends, so a
    client that hangs up frees its sequence at once (Starlette only cancels it)."""

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[str]) -> None:
        super().__init__(chunks, headers={"Cache-Control": "no-cache"})
        self.chunks = chunks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except asyncio.CancelledError:
            # uvicorn cancels streams still open when its shutdown grace ends, and would
            # log the cancellation as a crash: this stream's end is the expected outcome.
            pass
        finally:
            aclose = getattr(self.chunks, "aclose", None)
            if aclose is not None:
                await aclose()


async def _stream(shape: Shape, first: Event, events: AsyncIterator[Event],
                  include_usage: bool, engine: Engine) -> AsyncIterator[str]:
    try:
        for obj in shape.opening():
            yield _sse(obj)
        event = first
        while isinstance(event, TextChunk):
            if event.text:
                yield _sse(shape.piece(event.text))
            event = await anext(events)
        yield _sse(shape.ending(event))
        if include_usage:
            yield _sse(shape.usage_only(event))
        engine.metrics.requests.labels(outcome="ok").inc()
    except Exception as exc:  # the status line is sent: report in the stream, as OpenAI does
        log.error("stream failed", exc_info=exc)
        engine.metrics.requests.labels(outcome="error").inc()
        error = (ApiError(400, str(exc)) if isinstance(exc, SpecshardError) else
                 ApiError(500, "internal error; see the server log", "server_error",
                          "internal_error"))
        yield _sse(ErrorBody(error=error.detail))
    finally:
        await events.aclose()  # type: ignore[attr-defined]
    yield "data: [DONE]\n\n"


async def _complete(request: Request, engine: Engine, body: Sampling, prompt: list[int],
                    shape: Shape) -> Response:
    job = GenerationRequest(prompt, body.token_limit(engine.n_ctx),
                            SamplingParams(body.temperature, body.top_k, body.top_p, body.seed),
                            body.stops)
    engine.check(job)
    events = engine.stream(job)
    streaming = False
    try:
        # The first event comes once a sequence is free: queue-full and engine errors
        # still get their own status, and a client that leaves the queue is let go.
        if body.stream:
            first = await _unless_gone(request, anext(events))
            if first is not None:
                streaming = True
                return EventStream(_stream(shape, first, events, body.include_usage, engine))
        else:
            result = await _unless_gone(request, _collect(events))
            if result is not None:
                engine.metrics.requests.labels(outcome="ok").inc()
                return JSONResponse(shape.whole(*result).model_dump())
        engine.metrics.requests.labels(outcome="cancelled").inc()
        return Response(status_code=499)  # nobody reads it: the client is gone
    finally:
        if not streaming:
            await events.aclose()  # type: ignore[attr-defined]


# --- the app -------------------------------------------------------------------------------


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="specshard", docs_url=None, redoc_url=None)
    _install_error_handlers(app, state)
    fingerprint = _fingerprint()

    def authorize(authorization: Annotated[str | None, Header()] = None) -> None:
        if state.api_key is None:
            return
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                key.strip().encode(), state.api_key.encode()):
            raise ApiError(401, "Incorrect or missing API key: send "
                                "'Authorization: Bearer <key>'.", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    def ready() -> Engine:
        if state.engine is None:
            raise ApiError(503, "The model is still loading; retry shortly.", "server_error",
                           "not_ready", headers={"Retry-After": "5"})
        return state.engine

    Ready = Annotated[Engine, Depends(ready)]

    def served_name(engine: Engine, asked: str | None) -> str:
        names = state.names(engine)
        if asked and asked not in names:
            raise ApiError(404, f"The model `{asked}` does not exist; this server has "
                                f"{', '.join(names)}.", code="model_not_found", param="model")
        return asked or names[0]

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @v1.post("/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request, engine: Ready) -> Response:
        shape = ChatShape(served_name(engine, body.model), fingerprint)
        tokenizer = engine.tokenizer
        prompt = tokenizer.encode(tokenizer.chat_prompt(body.template_messages()))
        return await _complete(request, engine, body, prompt, shape)

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request, engine: Ready
                          ) -> Response:
        shape = TextShape(served_name(engine, body.model), fingerprint)
        return await _complete(request, engine, body, engine.tokenizer.encode(body.text), shape)

    @v1.get("/models")
    async def models(engine: Ready) -> ModelList:
        return ModelList(data=[ModelCard(id=name, created=0) for name in state.names(engine)])

    @v1.get("/models/{model}")
    async def model(model: str, engine: Ready) -> ModelCard:
        return ModelCard(id=served_name(engine, model), created=0)

    @v1.get("/cluster")
    async def cluster(engine: Ready) -> dict[str, object]:
        if state.cluster_info is not None:
            return state.cluster_info()
        return {"model": engine.model_name, "n_ctx": engine.n_ctx,
                "parallel": engine.parallel, "queue_size": engine.queue_size,
                "pipeline": type(engine.pipeline).__name__}

    app.include_router(v1)

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.engine is None:
            return JSONResponse({"status": "loading"}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        if state.engine is None:
            return Response("loading\n", 503, media_type="text/plain")
        return Response(state.engine.metrics.render(), media_type=METRICS_TYPE)

    return app
