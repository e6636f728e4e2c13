"""What llama-server's clients rely on beyond OpenAI's routes: `/tokenize`,
`/detokenize`, `/props` (context size, model, chat template, sampling defaults), and the
OpenAI routes also without their `/v1` prefix (llama-server serves both)."""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations.
import asyncio
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI
from pydantic import Field
from starlette.types import ASGIApp, Receive, Scope, Send

from coordinator.api.errors import ApiError
from coordinator.api.sampling_defaults import SamplingDefaults
from coordinator.api.schema import Request
from coordinator.constrain import engine_info
from coordinator.engine.frontend import Engine


class TokenizeRequest(Request):
    content: str
    add_special: bool = False  # llama-server's default: no BOS
    with_pieces: bool = False


class DetokenizeRequest(Request):
    tokens: list[Annotated[int, Field(ge=0)]]


def sampling_of(state: Any) -> SamplingDefaults:
    """The server's sampling defaults (`ServerState.sampling`, once serve sets it)."""
    defaults = getattr(state, "sampling", None)
    return defaults if isinstance(defaults, SamplingDefaults) else SamplingDefaults()


def install(app: FastAPI, state: Any, authorize: Callable[..., None],
            ready: Callable[[], Engine]) -> None:
    """Add the routes to `app` behind the app's own key and readiness checks, and serve
    its OpenAI routes also without /v1. `state` is the app's ServerState."""

    Ready = Annotated[Engine, Depends(ready)]
    router = APIRouter(dependencies=[Depends(authorize)])

    @router.post("/tokenize")
    async def tokenize(body: TokenizeRequest, engine: Ready) -> dict[str, object]:
        tokens = await asyncio.to_thread(engine.tokenizer.encode, body.content, True,
                                         body.add_special)
        if not body.with_pieces:
            return {"tokens": tokens}
        pieces = []
        for token in tokens:
            raw = engine.tokenizer.piece(token)
            try:
                piece: str | list[int] = raw.decode("utf-8")
            except UnicodeDecodeError:  # part of a character: its bytes, as llama-server
                piece = list(raw)
            pieces.append({"id": token, "piece": piece})
        return {"tokens": pieces}

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, engine: Ready) -> dict[str, object]:
        n_vocab = engine.tokenizer.n_vocab
        beyond = [t for t in body.tokens if t >= n_vocab]
        if beyond:
            raise ApiError(400, f"token {beyond[0]} is beyond the vocabulary of {n_vocab}",
                           param="tokens")
        return {"content": engine.tokenizer.decode(body.tokens)}

    @router.get("/props")
    async def props(engine: Ready) -> dict[str, object]:
        defaults = sampling_of(state)
        extra = dict(getattr(state, "props", None) or {})
        params = {"temperature": defaults.temperature, "top_k": defaults.top_k,
                  "top_p": defaults.top_p, "min_p": defaults.min_p,
                  "presence_penalty": defaults.presence_penalty,
                  "frequency_penalty": defaults.frequency_penalty,
                  "repeat_penalty": defaults.repeat_penalty,
                  "repeat_last_n": defaults.repeat_last_n,
                  "n_predict": -1, "seed": -1}
        return {
            "default_generation_settings": {"n_ctx": engine.n_ctx, "params": params},
            "total_slots": engine.parallel,
            "model_alias": engine.model_name,
            "model_path": extra.pop("model_path", engine.model_name),
            "chat_template": extra.pop("chat_template", ""),
            "modalities": {"vision": False, "audio": False},
            "build_info": "specshard",
            # response_format, grammar, json_schema, forced tool calls (docs/clients.md)
            "constrained_decoding": engine_info(),
            **extra,
        }

    app.include_router(router)
    app.add_middleware(WithoutV1)


# The OpenAI routes llama-server also serves without their /v1 prefix.
BARE_PATHS = ("/chat/completions", "/completions", "/models")


class WithoutV1:
    """ASGI middleware: a request for an OpenAI route without /v1 is served by the /v1
    route itself (same handler, same key and readiness checks)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path in BARE_PATHS or path.startswith("/models/"):
                scope = dict(scope, path="/v1" + path,
                             raw_path=b"/v1" + scope.get("raw_path", path.encode()))
        await self.app(scope, receive, send)
