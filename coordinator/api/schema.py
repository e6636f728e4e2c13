"""The OpenAI API objects we accept and return, as pydantic models.

Requests ignore unknown fields: OpenAI clients send options we do not implement, mostly
at their defaults (`frequency_penalty: 0`, `logprobs: false`). Ranges follow the OpenAI
API reference; `top_k` is our extension, as in llama.cpp's server, and so are the chat
fields for reasoning models that llama-server accepts (`reasoning_format`,
`chat_template_kwargs`, `thinking_budget_tokens`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

Stop = Annotated[list[str], Field(max_length=4)]
# JSON may escape half a UTF-16 pair ("\ud800"); Python decodes it to a string that no
# UTF-8 can carry, so the tokenizer and any answer quoting it would fail (a 500).
_SURROGATE = re.compile("[\ud800-\udfff]")


def _has_lone_surrogate(data: Any) -> bool:
    todo = [data]  # a loop, not recursion: the JSON may be nested as deep as it parses
    while todo:
        value = todo.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return True
        elif isinstance(value, dict):
            todo += [*value.keys(), *value.values()]
        elif isinstance(value, list):
            todo += value
    return False


class Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        if _has_lone_surrogate(data):
            raise ValueError("the request holds a lone UTF-16 surrogate (a \\ud800-\\udfff "
                             "escape without its pair): text must be valid Unicode")
        return data


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
    seed: int | None = Field(None, ge=-1)  # -1: a random seed, as llama-server reads it
    n: int = 1

    @field_validator("seed")
    @classmethod
    def _random_seed(cls, seed: int | None) -> int | None:
        return None if seed == -1 else seed

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


class CalledFunction(Request):
    name: str
    arguments: str | dict[str, Any] = "{}"  # OpenAI sends JSON text; some clients an object


class PastToolCall(Request):
    """A call an earlier assistant turn made, as the client sends it back."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[PastToolCall] | None = None  # assistant turns
    tool_call_id: str | None = None  # tool turns: the call this is the result of
    name: str | None = None

    @model_validator(mode="after")
    def _tool_result_names_its_call(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a message with role 'tool' needs tool_call_id")
        return self

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionDefinition(Request):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Request):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(Request):
    name: str


class NamedToolChoice(Request):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    # llama-server's per-request fields for reasoning models; vLLM's name for the budget
    # is accepted too.
    reasoning_format: Literal["deepseek", "none"] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    thinking_budget_tokens: int | None = Field(
        None, ge=-1, validation_alias=AliasChoices("thinking_budget_tokens",
                                                   "thinking_token_budget"))

    @model_validator(mode="after")
    def _tool_choice_has_tools(self) -> ChatCompletionRequest:
        choice = self.tool_choice
        names = {tool.function.name for tool in self.tools or []}
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice names `{choice.function.name}`, which is not "
                             "among the tools")
        if choice == "required" and not names:
            raise ValueError("tool_choice 'required' needs tools")
        return self

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools the template shows the model: none for `tool_choice: "none"`, only
        the named one for a named choice (a hint: decoding is not constrained)."""
        choice = self.tool_choice
        if not self.tools or choice == "none":
            return None
        tools = [tool for tool in self.tools if not isinstance(choice, NamedToolChoice)
                 or tool.function.name == choice.function.name]
        return [tool.model_dump(exclude_none=True) for tool in tools]


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


class Sparse(BaseModel):
    """Leaves out the fields named in `omitted_when_none` while they are None: OpenAI
    sends only what applies (a delta only what changes, a message without tool calls no
    `tool_calls`)."""

    omitted_when_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _given(self, to_dict: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in to_dict(self).items()
                if v is not None or k not in self.omitted_when_none}


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int


class Usage(Sparse):
    omitted_when_none = frozenset({"completion_tokens_details"})

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: CompletionTokensDetails | None = None  # chat only


class Completed(BaseModel):
    """Fields every completion object and chunk carries."""

    id: str
    created: int
    model: str
    system_fingerprint: str
    usage: Usage | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCallObject(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolCallDelta(ToolCallObject):
    index: int


class AssistantMessage(Sparse):
    omitted_when_none = frozenset({"reasoning_content", "tool_calls"})

    role: Literal["assistant"] = "assistant"
    content: str | None  # None only beside tool calls, as OpenAI sends it
    reasoning_content: str | None = None
    tool_calls: list[ToolCallObject] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str


class ChatCompletion(Completed):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class Delta(Sparse):
    # OpenAI sends only what changes: {"content": "…"}, and {} with the finish reason.
    omitted_when_none = frozenset({"role", "content", "reasoning_content", "tool_calls"})

    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


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
