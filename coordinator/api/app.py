"""The OpenAI-compatible HTTP API over an `Engine`.

Chat replies are parsed after the engine has decided their tokens (`chat.py`: thinking
and tool calls); only the thinking budget acts inside the engine, as a `TextGuard`.
`/health` and `/metrics` need no API key: load balancers and Prometheus probe them
without credentials, and they reveal only readiness and aggregate counters (never
prompts).
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at
# runtime, and `Ready` below is local to `create_app`.
import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from coordinator.api import choices
from coordinator.api.chat import ChatShape, ReplyParser
from coordinator.api.errors import ApiError, api_error_of, install_error_handlers
from coordinator.api.llama_routes import install as install_llama_routes
from coordinator.api.reasoning import ThinkingBudget
from coordinator.api.sampling_defaults import SamplingDefaults
from coordinator.api.schema import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorBody,
    ModelCard,
    ModelList,
    Sampling,
)
from coordinator.api.shapes import Logprobs, Shape, TextShape
from coordinator.api.status_page import install_status_page
from coordinator.api.templates import ChatOptions, chat_prompt
from coordinator.constrain import engine_info, request_constraint
from coordinator.engine.frontend import Engine
from coordinator.engine.request import (
    Finished,
    GenerationRequest,
    TextChunk,
    TextGuard,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
# What `generate_latest` writes: the classic text format, which every scraper reads.
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
GREEDY_BELOW = 1e-5


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
    model_names: tuple[str, ...] = ()  # serve's --alias: accepted besides the engine's name
    chat: ChatOptions = field(default_factory=ChatOptions)
    draining: bool = False  # shutting down: new requests get 503, running ones finish
    open_streams: int = 0  # event streams not ended yet (changed on the event loop only)
    # Sampling for the fields a request leaves out: serve's --temp … flags, the GGUF's.
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    strict_model_name: bool = False  # --strict-model-name: another name is a 404
    props: dict[str, object] = field(default_factory=dict)  # /props: model_path, chat_template

    def names(self, engine: Engine) -> tuple[str, ...]:
        """The names /v1/models lists and --strict-model-name accepts: the served one
        first (what an answer without `model` is named), then the aliases."""
        return tuple(dict.fromkeys((engine.model_name, *self.model_names)))


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


async def _collect(events: AsyncIterator[TextChunk | Finished], shape: Shape
                   ) -> tuple[str, Finished]:
    text: list[str] = []
    async for event in events:
        shape.observe(event)
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

    def __init__(self, chunks: AsyncIterator[str], state: ServerState) -> None:
        super().__init__(chunks, headers={"Cache-Control": "no-cache"})
        self.chunks = chunks
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.state.open_streams += 1
        try:
            await super().__call__(scope, receive, send)
        except asyncio.CancelledError:
            # uvicorn cancels streams still open when its shutdown grace ends, and would
            # log the cancellation as a crash: this stream's end is the expected outcome.
            pass
        finally:
            self.state.open_streams -= 1
            aclose = getattr(self.chunks, "aclose", None)
            if aclose is not None:
                await aclose()


async def _stream(shape: Shape, first: TextChunk | Finished,
                  events: AsyncIterator[TextChunk | Finished], include_usage: bool,
                  engine: Engine) -> AsyncIterator[str]:
    try:
        for obj in shape.opening():
            yield _sse(obj)
        event = first
        while isinstance(event, TextChunk):
            shape.observe(event)
            for obj in shape.piece(event.text) if event.text else []:
                yield _sse(obj)
            event = await anext(events)
        for obj in shape.ending(event):
            yield _sse(obj)
        if include_usage:
            yield _sse(shape.usage_only(event))
        engine.metrics.requests.labels(outcome=_outcome(event)).inc()
    except Exception as exc:  # the status line is sent: report in the stream, as OpenAI does
        yield _stream_failed(exc, engine)
    finally:
        await events.aclose()  # type: ignore[attr-defined]
    yield "data: [DONE]\n\n"


def _stream_failed(exc: Exception, engine: Engine) -> str:
    """A stream's failure after its status line: logged, counted, and its error event."""
    error = api_error_of(exc)
    log.error("stream failed: %s", exc, exc_info=error.status == 500 and
              error.detail.code == "internal_error")
    engine.metrics.requests.labels(outcome=_failure_outcome(error)).inc()
    return _sse(ErrorBody(error=error.detail))


def _outcome_of_all(finishes: list[Finished]) -> str:
    outcomes = {_outcome(done) for done in finishes}
    return "aborted" if "aborted" in outcomes else "ok"


def _failure_outcome(error: ApiError) -> str:
    return {400: "invalid", 503: "unavailable"}.get(error.status, "error")


def _logprobs(body: Sampling, engine: Engine) -> Logprobs | None:
    return Logprobs(engine.tokenizer) if body.n_logprobs is not None else None


def _outcome(done: Finished) -> str:
    # "abort": the server drained the request (shutting down): a clean end, not an error.
    return "aborted" if done.finish_reason == "abort" else "ok"


async def _jobs(state: ServerState, engine: Engine, body: Sampling, prompt: list[int],
                guards: list[TextGuard | None]) -> list[GenerationRequest]:
    """One generation request per choice."""
    # Below this a temperature only sharpens the argmax, and near 0 it overflows the
    # softmax: greedy, as vLLM does under its sampling epsilon.
    sampling = body.sampling_params(state.sampling, engine.tokenizer.n_vocab)
    if sampling.temperature < GREEDY_BELOW:
        sampling = replace(sampling, temperature=0.0)
    jobs = []
    for i, guard in enumerate(guards):
        # A grammar, a JSON schema or a forced tool call (400 when it does not compile);
        # each choice keeps its own grammar state.
        constraint = await asyncio.to_thread(request_constraint, body.grammar_spec,
                                             engine.tokenizer) if body.constrained else None
        # Choice i of a seeded request draws from seed + i: reproducible, not the same.
        seeded = sampling if sampling.seed is None or i == 0 else \
            replace(sampling, seed=sampling.seed + i)
        jobs.append(GenerationRequest(prompt, body.token_limit(engine.n_ctx), seeded,
                                      body.stops, guard, ignore_eos=body.ignore_eos,
                                      cache_prompt=body.cache_prompt or len(guards) > 1,
                                      constraint=constraint))
        engine.check(jobs[-1])
    return jobs


async def _complete(request: Request, state: ServerState, engine: Engine, body: Sampling,
                    prompt: list[int], shapes: list[Shape], guards: list[TextGuard | None]
                    ) -> Response:
    jobs = await _jobs(state, engine, body, prompt, guards)
    if len(jobs) > 1:
        return await _complete_n(request, state, engine, body, jobs, shapes)
    shape = shapes[0]
    events = engine.stream(jobs[0])
    streaming = False
    try:
        # The first event comes once a sequence is free: queue-full and engine errors
        # still get their own status, and a client that leaves the queue is let go.
        if body.stream:
            first = await _unless_gone(request, anext(events))
            if first is not None:
                streaming = True
                return EventStream(_stream(shape, first, events, body.include_usage, engine),
                                   state)
        else:
            result = await _unless_gone(request, _collect(events, shape))
            if result is not None:
                engine.metrics.requests.labels(outcome=_outcome(result[1])).inc()
                return JSONResponse(shape.whole(*result).model_dump())
        engine.metrics.requests.labels(outcome="cancelled").inc()
        return Response(status_code=499)  # nobody reads it: the client is gone
    finally:
        if not streaming:
            await events.aclose()  # type: ignore[attr-defined]


async def _complete_n(request: Request, state: ServerState, engine: Engine, body: Sampling,
                      jobs: list[GenerationRequest], shapes: list[Shape]) -> Response:
    """`n` > 1: n sequences (the later ones copy the prompt the first computes)."""
    for shape in shapes[1:]:  # one response: one id, one time
        shape.id, shape.created = shapes[0].id, shapes[0].created
    streams = [engine.stream(job) for job in jobs]
    streaming = False
    try:
        if body.stream:
            streaming = True
            return EventStream(_stream_n(shapes, streams, body.include_usage, engine), state)
        results = await _unless_gone(request, asyncio.gather(
            *(_collect(events, shape) for events, shape in zip(streams, shapes, strict=True))))
        if results is not None:
            engine.metrics.requests.labels(
                outcome=_outcome_of_all([done for _, done in results])).inc()
            return JSONResponse(choices.whole(shapes, list(results)).model_dump())
        engine.metrics.requests.labels(outcome="cancelled").inc()
        return Response(status_code=499)
    finally:
        if not streaming:
            for events in streams:
                await events.aclose()  # type: ignore[attr-defined]


async def _stream_n(shapes: list[Shape], streams: list[AsyncIterator[TextChunk | Finished]],
                    include_usage: bool, engine: Engine) -> AsyncIterator[str]:
    finished: dict[int, Finished] = {}
    try:
        async for line in choices.chunks(shapes, streams, include_usage, _sse, finished):
            yield line
        engine.metrics.requests.labels(outcome=_outcome_of_all(list(finished.values()))).inc()
    except Exception as exc:  # the status line is sent: report in the stream
        yield _stream_failed(exc, engine)
    finally:
        for events in streams:
            await events.aclose()  # type: ignore[attr-defined]
    yield "data: [DONE]\n\n"


# --- the app -------------------------------------------------------------------------------


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="specshard", docs_url=None, redoc_url=None)

    def count(outcome: str) -> None:
        if state.engine is not None:
            state.engine.metrics.requests.labels(outcome=outcome).inc()

    install_error_handlers(app, count)
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
        if state.draining:
            raise ApiError(503, "The server is shutting down; retry on another.",
                           "server_error", "shutting_down", headers={"Retry-After": "5"})
        return state.engine

    Ready = Annotated[Engine, Depends(ready)]

    def served_name(engine: Engine, asked: str | None, strict: bool = False) -> str:
        """The name a completion is answered under: any name is served by the one model
        (as llama-server), unless --strict-model-name (or `strict`: a lookup)."""
        names = state.names(engine)
        if asked and asked not in names and (strict or state.strict_model_name):
            raise ApiError(404, f"The model `{asked}` does not exist; this server has "
                                f"{', '.join(names)}.", code="model_not_found", param="model")
        return asked or names[0]

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @v1.post("/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request, engine: Ready) -> Response:
        name = served_name(engine, body.model)
        # Templates and tokenizing take milliseconds per kB: off the event loop.
        prompt = await asyncio.to_thread(chat_prompt, body, engine.tokenizer, state.chat)
        tokens = await asyncio.to_thread(engine.tokenizer.encode, prompt.text)
        shapes: list[Shape] = []
        guards: list[TextGuard | None] = []
        for _ in range(body.n):  # each choice: its own guard, parser and shape
            guard = ThinkingBudget(prompt.budget, prompt.thinking)
            reply = ReplyParser(prompt.thinking if prompt.split_reasoning else None,
                                prompt.tools)
            shapes.append(ChatShape(name, fingerprint, reply=reply, guard=guard,
                                    logprobs=_logprobs(body, engine)))
            guards.append(guard)
        return await _complete(request, state, engine, body, tokens, shapes, guards)

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request, engine: Ready
                          ) -> Response:
        name = served_name(engine, body.model)
        shapes: list[Shape] = [TextShape(name, fingerprint, logprobs=_logprobs(body, engine))
                               for _ in range(body.n)]
        tokens = await asyncio.to_thread(engine.tokenizer.encode, body.text)
        return await _complete(request, state, engine, body, tokens, shapes,
                               [None] * body.n)

    @v1.get("/models")
    async def models(engine: Ready) -> ModelList:
        return ModelList(data=[ModelCard(id=name, created=0) for name in state.names(engine)])

    @v1.get("/models/{model}")
    async def model(model: str, engine: Ready) -> ModelCard:
        return ModelCard(id=served_name(engine, model, strict=True), created=0)

    @v1.get("/cluster")
    async def cluster(engine: Ready) -> dict[str, object]:
        if state.cluster_info is not None:
            return {**await asyncio.to_thread(state.cluster_info),
                    "constrained_decoding": engine_info()}
        return {"model": engine.model_name, "n_ctx": engine.n_ctx,
                "parallel": engine.parallel, "queue_size": engine.queue_size,
                "ring": type(engine.core.ring).__name__,
                "constrained_decoding": engine_info()}

    app.include_router(v1)

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.engine is None:
            return JSONResponse({"status": "loading"}, 503)
        if state.draining:
            return JSONResponse({"status": "draining"}, 503)
        ring = state.engine.core.state.value
        if ring != "running":  # recovering: requests wait; down: they get 503
            return JSONResponse({"status": ring}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        if state.engine is None:
            return Response("loading\n", 503, media_type="text/plain")
        return Response(state.engine.metrics.render(), media_type=METRICS_TYPE)

    install_status_page(app, state, authorize)
    # /tokenize, /detokenize, /props; the OpenAI routes also without /v1
    install_llama_routes(app, state, authorize, ready)
    return app
