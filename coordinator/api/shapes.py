"""Engine events as API objects: a `Shape` turns one request's events into the whole
response or its stream of chunks, so the handlers deal only in engine events."""

from __future__ import annotations

import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel

from cluster.messages import TokenLogprobs
from coordinator.api.schema import (
    ChatLogprobs,
    CompletionLogprobs,
    CompletionTokensDetails,
    PromptTokensDetails,
    TextChoice,
    TextCompletion,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from coordinator.engine.request import Finished, TextChunk
from coordinator.tokenizer import Tokenizer


def usage_of(done: Finished, reasoning_tokens: int | None = None) -> Usage:
    details = (None if reasoning_tokens is None else
               CompletionTokensDetails(reasoning_tokens=reasoning_tokens))
    return Usage(prompt_tokens=done.n_prompt_tokens, completion_tokens=done.n_completion_tokens,
                 total_tokens=done.n_prompt_tokens + done.n_completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(
                     cached_tokens=done.stats.n_cached_tokens),
                 completion_tokens_details=details)


@dataclass
class Logprobs:
    """A request's tokens' logprobs as they come with its text, until a chunk takes them
    (OpenAI sends each token's logprobs with the chunk that carries its text; a chunk held
    back for a stop string keeps them for the next)."""

    tokenizer: Tokenizer
    pending: list[tuple[int, TokenLogprobs]] = field(default_factory=list)
    offset: int = 0  # text offset of the next token (completions' text_offset)

    def add(self, chunk: TextChunk) -> None:
        # Tokens a guard forced carry no logprobs: zip stops at the model's own.
        self.pending += list(zip(chunk.token_ids, chunk.logprobs, strict=False))

    def _text(self, token: int) -> str:
        return self.tokenizer.piece(token).decode("utf-8", errors="replace")

    def _take(self) -> list[tuple[int, TokenLogprobs]]:
        out, self.pending = self.pending, []
        return out

    def chat(self) -> ChatLogprobs | None:
        items = self._take()
        if not items:
            return None

        def top(token: int, logprob: float) -> TopLogprob:
            return TopLogprob(token=self._text(token), logprob=logprob,
                              bytes=list(self.tokenizer.piece(token)))

        return ChatLogprobs(content=[TokenLogprob(
            **top(token, lp.logprob).model_dump(),
            top_logprobs=[top(i, v) for i, v in lp.top]) for token, lp in items])

    def completion(self) -> CompletionLogprobs | None:
        items = self._take()
        if not items:
            return None
        texts = [self._text(token) for token, _ in items]
        offsets = []
        for text in texts:
            offsets.append(self.offset)
            self.offset += len(text)
        return CompletionLogprobs(
            tokens=texts, token_logprobs=[lp.logprob for _, lp in items],
            top_logprobs=[{self._text(i): v for i, v in lp.top} for _, lp in items],
            text_offset=offsets)


@dataclass
class Shape(ABC):
    """The objects of one completion: the whole of it, or its stream of chunks. A shape
    may keep state across a stream (what it holds back), so it serves one request."""

    model: str
    fingerprint: str
    id_prefix: ClassVar[str] = "cmpl-"
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    logprobs: Logprobs | None = None  # the request asked for logprobs

    def __post_init__(self) -> None:
        self.id = self.id or self.id_prefix + uuid.uuid4().hex

    def observe(self, event: TextChunk | Finished) -> None:
        """Every engine event, before `piece` or `whole` (the logprobs ride on them)."""
        if self.logprobs is not None and isinstance(event, TextChunk):
            self.logprobs.add(event)

    def head(self) -> dict[str, Any]:
        return {"id": self.id, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    def opening(self) -> list[BaseModel]:
        return []

    @abstractmethod
    def piece(self, text: str) -> list[BaseModel]:
        """The chunks for newly decided text (none while it is held back)."""

    @abstractmethod
    def ending(self, done: Finished) -> list[BaseModel]:
        """The last chunks: what was held back, then the finish reason."""

    @abstractmethod
    def usage_only(self, done: Finished) -> BaseModel: ...

    @abstractmethod
    def whole(self, text: str, done: Finished) -> BaseModel: ...


class TextShape(Shape):
    def _logprobs(self) -> CompletionLogprobs | None:
        return self.logprobs.completion() if self.logprobs is not None else None

    def piece(self, text: str) -> list[BaseModel]:
        return [TextCompletion(**self.head(), choices=[
            TextChoice(text=text, logprobs=self._logprobs())])]

    def ending(self, done: Finished) -> list[BaseModel]:
        return [TextCompletion(**self.head(), choices=[
            TextChoice(text="", finish_reason=done.finish_reason, logprobs=self._logprobs())])]

    def usage_only(self, done: Finished) -> BaseModel:
        return TextCompletion(**self.head(), choices=[], usage=usage_of(done))

    def whole(self, text: str, done: Finished) -> BaseModel:
        return TextCompletion(**self.head(), usage=usage_of(done), choices=[
            TextChoice(text=text, finish_reason=done.finish_reason, logprobs=self._logprobs())])
