"""An in-process server on the demo target for the chat tests: one ring stage, the
engine, the HTTP API in a thread, and the real `openai` client against it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai

from cluster.sampling import SamplingParams
from coordinator.api.app import ServerState, create_app
from coordinator.api.server import ServerThread
from coordinator.api.templates import ChatOptions
from coordinator.engine.frontend import Engine, Generation
from coordinator.engine.request import GenerationRequest
from coordinator.ring.builder import build_ring
from coordinator.service import EngineOptions, start_engine
from coordinator.tokenizer import Message, Tokenizer

MODEL = "specshard-demo"
WAIT = 120.0  # generous: the machine is shared
QWQ_STYLE = Path(__file__).parent / "data" / "qwq_style.jinja"


@dataclass
class ChatServer:
    url: str
    engine: Engine
    chat: ChatOptions

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0,
                             timeout=WAIT)

    def raw(self, messages: list[Message], max_tokens: int,
            tools: list[dict[str, Any]] | None = None) -> Generation:
        """What the model writes for a chat, straight from the engine (greedy): the text
        the server's parsers are given."""
        tokenizer = self.engine.tokenizer
        prompt = tokenizer.chat_prompt(messages, tools, self.chat.template)
        return self.engine.generate(GenerationRequest(tokenizer.encode(prompt), max_tokens,
                                                      SamplingParams(0.0)))


@contextmanager
def chat_server(model: Path, chat: ChatOptions) -> Iterator[ChatServer]:
    built = build_ring(model, stages=1, ctx=1024, parallel=2)
    tokenizer = Tokenizer(model)
    engine = None
    try:
        engine = start_engine(built, tokenizer, MODEL, options=EngineOptions(queue_size=2))
        state = ServerState(engine=engine, chat=chat)
        with ServerThread(create_app(state)) as server:
            yield ChatServer(server.url, engine, chat)
    finally:
        if engine is not None:
            engine.close()
        built.close()
        tokenizer.close()
