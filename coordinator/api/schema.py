"""The OpenAI API objects we accept and return, as pydantic models.

Every request field has a stated fate (the table in docs/clients.md): honoured; ignored
(unknown fields, and known ones that change nothing a client relies on: logged once per
field name); or refused with a 400 (what would change the output in a way we do not
implement: another sampler). `response_format`, llama-server's `grammar` and
`json_schema`, and a `tool_choice` that forces a call constrain decoding
(`coordinator/constrain`): their grammar is made here (`grammar_spec`). Ranges
follow the OpenAI API reference; `top_k`, `min_p`, `repeat_penalty`, `repeat_last_n`
and `n_predict` are llama-server's, and so are the chat fields for reasoning models
(`reasoning_format`, `chat_template_kwargs`, `thinking_budget_tokens`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
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

from cluster.errors import SpecshardError
from cluster.sampling import SamplingParams
from coordinator.api.sampling_defaults import SamplingDefaults
from coordinator.constrain.grammar import (
    GrammarSpec,
    gbnf_grammar,
    json_schema_grammar,
    tool_call_grammar,
)

log = logging.getLogger(__name__)
MAX_CHOICES = 16  # `n`: choices a request may ask for (each is a sequence)
MAX_STOP = 64  # stop strings a request may send (continue.dev's FIM sends 9)
Stop = list[str]
# Fields of OpenAI's and llama-server's requests that change nothing a client relies on
# here (docs/clients.md): accepted and logged once per name. Unknown fields too.
_IGNORED_SEEN: set[str] = set()
# llama-server's other samplers, at the value that leaves them off: any other is refused.
OFF_SAMPLERS: dict[str, object] = {
    "typical_p": 1.0, "mirostat": 0, "tfs_z": 1.0, "dynatemp_range": 0.0,
    "xtc_probability": 0.0, "dry_multiplier": 0.0, "top_n_sigma": -1.0}
# Fields that, when on, ask for what is not implemented and what the client then relies
# on (another call protocol, probabilities or token ids in the reply, images): refused
# with what to send instead. Off (absent, null, empty, 0, false) they are ignored.
REFUSED_WHEN_ON: dict[str, str] = {
    "functions": "OpenAI's deprecated function calling is not supported: send `tools`",
    "function_call": "OpenAI's deprecated function calling is not supported: send "
                     "`tool_choice` with `tools`",
    "n_probs": "for token probabilities send `logprobs` (chat: `logprobs: true, "
               "top_logprobs: N`; completions: `logprobs: N`)",
    "return_tokens": "replies carry text only; POST /tokenize gives a text's token ids",
    "image_data": "this server's model reads text only (/props: modalities)",
}
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


def log_ignored(names: set[str]) -> None:
    """Log each ignored field name once per process."""
    for name in sorted(names - _IGNORED_SEEN):
        _IGNORED_SEEN.add(name)
        log.info("request field %r is ignored (docs/clients.md lists every field's fate); "
                 "said once", name)


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
    """The fields chat and text completions share. Sampling fields a request leaves out
    take the server's defaults (`sampling_params`): the stored values below are only
    what an unset field reads as."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | Stop | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n_predict: int | None = Field(None, ge=-1)  # llama-server's max_tokens; -1: no limit
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's default
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, le=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repeat_penalty: float = Field(1.0, gt=0, le=10)
    repeat_last_n: int = Field(64, ge=-1)
    logit_bias: dict[str, float] | None = None  # token id (as text) → bias in [-100, 100]
    seed: int | None = Field(None, ge=-1)  # -1: a random seed, as llama-server reads it
    n: int = 1
    ignore_eos: bool = False  # llama-server's: decode past end tokens
    cache_prompt: bool = True  # llama-server's: start from a slot's cached prefix
    response_format: dict[str, Any] | None = None
    # llama-server's: a GBNF grammar, or a JSON schema, the reply must follow.
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _fates(cls, data: Any) -> Any:
        """Refuse what would change the output in a way we do not implement; log what is
        ignored (once per field name)."""
        if not isinstance(data, dict):
            return data
        for name, off in OFF_SAMPLERS.items():
            value = data.get(name)
            if value is not None and value != off:
                raise ValueError(f"`{name}` is not supported (only its default {off}): "
                                 "samplers here are temperature, top_k, top_p, min_p and the "
                                 "penalties")
        for name, instead in REFUSED_WHEN_ON.items():
            value = data.get(name)
            # function_call "none" and "auto" ask for nothing without `functions`
            if value and not (name == "function_call" and value in ("none", "auto")):
                raise ValueError(f"`{name}` is not supported: {instead}")
        if data.get("min_keep") not in (None, 0, 1):  # 0 and 1: top-p/min-p keep one
            raise ValueError("`min_keep` is not supported (only 0 or 1): the samplers keep "
                             "at least the likeliest token")
        known = set(cls.model_fields) | {a for f in cls.model_fields.values()
                                          for a in _aliases(f.validation_alias)}
        log_ignored({str(k) for k in data} - known - set(OFF_SAMPLERS))
        return data

    @field_validator("stop")
    @classmethod
    def _stop_cap(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > MAX_STOP:
            raise ValueError(f"{len(stop)} stop strings: at most {MAX_STOP}")
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (bias or {}).items():
            if not key.lstrip("-").isdigit() or int(key) < 0:
                raise ValueError(f"logit_bias keys are token ids, got {key!r}")
            if not -100 <= value <= 100:
                raise ValueError(f"logit_bias values are in [-100, 100], got {value}")
        return bias

    @field_validator("response_format")
    @classmethod
    def _format(cls, fmt: dict[str, Any] | None) -> dict[str, Any] | None:
        kind = (fmt or {}).get("type", "text")
        if kind not in ("text", "json_object", "json_schema"):
            raise ValueError(f"response_format type {kind!r} is not one of 'text', "
                             "'json_object', 'json_schema'")
        if kind == "json_schema":
            spec = (fmt or {}).get("json_schema")
            if not isinstance(spec, dict):
                raise ValueError("response_format json_schema needs a `json_schema` object "
                                 "({\"name\": …, \"schema\": {…}, \"strict\": …})")
            if not isinstance(spec.get("schema", {}), dict | bool):
                raise ValueError("response_format json_schema: `schema` must be a JSON "
                                 "schema (an object)")
        return fmt

    @model_validator(mode="after")
    def _one_constraint(self) -> Sampling:
        given = [name for name, on in (
            ("response_format", self._format_kind != "text"),
            ("grammar", bool(self.grammar)), ("json_schema", self.json_schema is not None))
            if on]
        if len(given) > 1:
            raise ValueError(f"{' and '.join(f'`{g}`' for g in given)} both constrain the "
                             "reply: send one")
        return self

    @property
    def _format_kind(self) -> str:
        return str((self.response_format or {}).get("type", "text"))

    @property
    def constrained(self) -> bool:
        """The reply must follow a grammar (`grammar_spec` makes it)."""
        return self._format_kind != "text" or bool(self.grammar) or \
            self.json_schema is not None

    def grammar_spec(self, special_token: Callable[[str], int | None]) -> GrammarSpec | None:
        """The grammar the reply must follow, or None (raises `SpecshardError` naming the
        problem: a 400). `special_token(text)`: the vocabulary's one token for `text`."""
        kind = self._format_kind
        if kind == "json_object":
            return json_schema_grammar({"type": "object"}, what="response_format json_object")
        if kind == "json_schema":
            spec = (self.response_format or {})["json_schema"]
            return json_schema_grammar(spec.get("schema", {"type": "object"}),
                                       strict=bool(spec.get("strict", False)))
        if self.grammar:
            return gbnf_grammar(self.grammar)
        if self.json_schema is not None:
            return json_schema_grammar(self.json_schema, strict=False, what="json_schema")
        return None

    @field_validator("seed")
    @classmethod
    def _random_seed(cls, seed: int | None) -> int | None:
        return None if seed == -1 else seed

    @field_validator("n")
    @classmethod
    def _choices(cls, n: int) -> int:
        if not 1 <= n <= MAX_CHOICES:
            raise ValueError(f"n is the number of choices: 1 to {MAX_CHOICES}, got {n}")
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
        """max_completion_tokens, max_tokens, llama-server's n_predict, in that order."""
        if self.max_completion_tokens:
            return self.max_completion_tokens
        if self.n_predict and self.n_predict > 0 and "max_tokens" not in self.model_fields_set:
            return self.n_predict
        return self.max_tokens or default

    @property
    def n_logprobs(self) -> int | None:
        """Likeliest tokens to report beside each token's logprob; None: no logprobs."""
        return None

    def sampling_params(self, defaults: SamplingDefaults, n_vocab: int,
                        penalty_from: int = 0) -> SamplingParams:
        """The request's sampling: its own fields where it sent them, else `defaults`."""
        given = self.model_fields_set
        values: dict[str, Any] = {
            name: getattr(self, name) for name in
            ("temperature", "top_k", "top_p", "min_p", "presence_penalty",
             "frequency_penalty", "repeat_penalty", "repeat_last_n") if name in given}
        bias = tuple(sorted((int(k), float(v)) for k, v in (self.logit_bias or {}).items()))
        beyond = [token for token, _ in bias if token >= n_vocab]
        if beyond:
            raise SpecshardError(f"logit_bias names token {beyond[0]}, beyond the "
                                 f"vocabulary of {n_vocab}")
        return defaults.params(**values, seed=self.seed, logit_bias=bias,
                               penalty_from=penalty_from, logprobs=self.n_logprobs)


def _aliases(alias: object) -> list[str]:
    if isinstance(alias, str):
        return [alias]
    choices = getattr(alias, "choices", None)
    return [c for c in choices if isinstance(c, str)] if choices else []


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
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    parallel_tool_calls: bool | None = None  # False: a forced call is one call

    @property
    def n_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def constrained(self) -> bool:
        return self.forces_call or super().constrained

    @property
    def forces_call(self) -> bool:
        """`tool_choice` "required" or a named function: the reply is tool calls only."""
        return bool(self.tools) and (self.tool_choice == "required" or
                                     isinstance(self.tool_choice, NamedToolChoice))

    @model_validator(mode="after")
    def _constrained_replies_do_not_think(self) -> ChatCompletionRequest:
        """A grammar holds from the reply's first token: a constrained reply answers at
        once (as with a thinking budget of 0), its thinking would break the shape."""
        if self.forces_call and (self._format_kind != "text" or self.grammar or
                                 self.json_schema is not None):
            raise ValueError("a forced tool call (tool_choice) and a response_format or "
                             "grammar both constrain the reply: send one")
        if self.constrained:
            self.thinking_budget_tokens = 0
        return self

    def grammar_spec(self, special_token: Callable[[str], int | None]) -> GrammarSpec | None:
        if self.forces_call:
            choice = self.tool_choice
            return tool_call_grammar(
                self.template_tools() or [],
                choice.function.name if isinstance(choice, NamedToolChoice) else None,
                self.parallel_tool_calls is not False,
                special_token("<tool_call>"), special_token("</tool_call>"))
        return super().grammar_spec(special_token)

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
    logprobs: int | None = Field(None, ge=0, le=20)  # OpenAI: up to 5; llama-server more
    suffix: str | None = None
    best_of: int | None = None

    @property
    def n_logprobs(self) -> int | None:
        return self.logprobs

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix: str | None) -> str | None:
        if suffix:
            raise ValueError("suffix (fill-in-the-middle) is not supported: send the whole "
                             "prompt in the model's own FIM format instead")
        return suffix

    @field_validator("best_of")
    @classmethod
    def _one_best(cls, best_of: int | None) -> int | None:
        if best_of not in (None, 1):
            raise ValueError("only best_of=1 is supported")
        return best_of

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


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # found in the slot's caches, not computed (prompt reuse)


class Usage(Sparse):
    omitted_when_none = frozenset({"completion_tokens_details"})

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
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


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """OpenAI's `choices[].logprobs` of a chat completion (or chunk)."""

    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    """The legacy completions' `choices[].logprobs`."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
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
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(Completed):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class TextChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
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
