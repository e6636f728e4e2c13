"""The OpenAI API objects we accept and return, as pydantic models.

Requests ignore unknown fields: OpenAI clients send options we do not implement, mostly
at their defaults (`frequency_penalty: 0`, `logprobs: false`). Ranges follow the OpenAI
API reference; `top_k` is our extension, as in llama.cpp's server. The `Shape`s turn
engine events into response objects, so the handlers deal only in engine events.
"""

from __future__ import annotations

import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
)

from coordinator.engine import Finished

Stop = Annotated[list[str], Field(max_length=4)]


class Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(Request):
    include_usage: bool = False


class Sampling(Request):
    """The fields chat and text completions share."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | Stop | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's default
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    seed: int | None = None
    n: int = 1

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def token_limit(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class TextPart(Request):
    type: Literal["text"]
    text: str


class ChatMessage(Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)

    def template_messages(self) -> list[dict[str, str]]:
        # Chat templates know "system"; "developer" is OpenAI's newer name for it.
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text}
                for m in self.messages]


class CompletionRequest(Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    echo: bool = False
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        if echo:
            raise ValueError("echo is not supported")
        return echo

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


# --- responses ---------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completed(BaseModel):
    """Fields every completion object and chunk carries."""

    id: str
    created: int
    model: str
    system_fingerprint: str
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str


class ChatCompletion(Completed):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _given(self, to_dict: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # OpenAI sends only what changes: {"content": "…"}, and {} with the finish reason.
        return {k: v for k, v in to_dict(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(Completed):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class TextChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None = None


class TextCompletion(Completed):
    object: Literal["text_completion"] = "text_completion"
    choices: list[TextChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "specshard"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


# --- engine results as API objects -------------------------------------------------------


def usage_of(done: Finished) -> Usage:
    return Usage(prompt_tokens=done.n_prompt_tokens, completion_tokens=done.n_completion_tokens,
                 total_tokens=done.n_prompt_tokens + done.n_completion_tokens)


@dataclass
class Shape(ABC):
    """The objects of one completion: the whole of it, or its stream of chunks."""

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
    def piece(self, text: str) -> BaseModel: ...

    @abstractmethod
    def ending(self, done: Finished) -> BaseModel: ...

    @abstractmethod
    def usage_only(self, done: Finished) -> BaseModel: ...

    @abstractmethod
    def whole(self, text: str, done: Finished) -> BaseModel: ...


class ChatShape(Shape):
    id_prefix = "chatcmpl-"

    def _chunk(self, delta: Delta, finish: str | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(**self.head(), choices=[
            ChatChunkChoice(delta=delta, finish_reason=finish)])

    def opening(self) -> list[BaseModel]:
        return [self._chunk(Delta(role="assistant", content=""))]

    def piece(self, text: str) -> BaseModel:
        return self._chunk(Delta(content=text))

    def ending(self, done: Finished) -> BaseModel:
        return self._chunk(Delta(), done.finish_reason)

    def usage_only(self, done: Finished) -> BaseModel:
        return ChatCompletionChunk(**self.head(), choices=[], usage=usage_of(done))

    def whole(self, text: str, done: Finished) -> BaseModel:
        return ChatCompletion(**self.head(), usage=usage_of(done), choices=[
            ChatChoice(message=AssistantMessage(content=text),
                       finish_reason=done.finish_reason)])


class TextShape(Shape):
    def piece(self, text: str) -> BaseModel:
        return TextCompletion(**self.head(), choices=[TextChoice(text=text)])

    def ending(self, done: Finished) -> BaseModel:
        return TextCompletion(**self.head(), choices=[
            TextChoice(text="", finish_reason=done.finish_reason)])

    def usage_only(self, done: Finished) -> BaseModel:
        return TextCompletion(**self.head(), choices=[], usage=usage_of(done))

    def whole(self, text: str, done: Finished) -> BaseModel:
        return TextCompletion(**self.head(), usage=usage_of(done), choices=[
            TextChoice(text=text, finish_reason=done.finish_reason)])
