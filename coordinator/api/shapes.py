"""Engine events as API objects: a `Shape` turns one request's events into the whole
response or its stream of chunks, so the handlers deal only in engine events."""

from __future__ import annotations

import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel

from coordinator.api.schema import CompletionTokensDetails, TextChoice, TextCompletion, Usage
from coordinator.engine.request import Finished


def usage_of(done: Finished, reasoning_tokens: int | None = None) -> Usage:
    details = (None if reasoning_tokens is None else
               CompletionTokensDetails(reasoning_tokens=reasoning_tokens))
    return Usage(prompt_tokens=done.n_prompt_tokens, completion_tokens=done.n_completion_tokens,
                 total_tokens=done.n_prompt_tokens + done.n_completion_tokens,
                 completion_tokens_details=details)


@dataclass
class Shape(ABC):
    """The objects of one completion: the whole of it, or its stream of chunks. A shape
    may keep state across a stream (what it holds back), so it serves one request."""

    model: str
    fingerprint: str
    id_prefix: ClassVar[str] = "cmpl-"
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or self.id_prefix + uuid.uuid4().hex

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
    def piece(self, text: str) -> list[BaseModel]:
        return [TextCompletion(**self.head(), choices=[TextChoice(text=text)])]

    def ending(self, done: Finished) -> list[BaseModel]:
        return [TextCompletion(**self.head(), choices=[
            TextChoice(text="", finish_reason=done.finish_reason)])]

    def usage_only(self, done: Finished) -> BaseModel:
        return TextCompletion(**self.head(), choices=[], usage=usage_of(done))

    def whole(self, text: str, done: Finished) -> BaseModel:
        return TextCompletion(**self.head(), usage=usage_of(done), choices=[
            TextChoice(text=text, finish_reason=done.finish_reason)])
