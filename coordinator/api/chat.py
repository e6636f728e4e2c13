"""A chat reply as the API returns it: the thinking (`reasoning_content`), the answer
(`content`) and the tool calls, apart, whole or streamed."""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel

from coordinator.api.reasoning import ReasoningSplitter, Split, ThinkingBudget
from coordinator.api.schema import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    Delta,
    FunctionCall,
    ToolCallDelta,
    ToolCallObject,
)
from coordinator.api.shapes import Shape, usage_of
from coordinator.api.tools import ToolCall, ToolCallParser
from coordinator.engine.request import Finished


@dataclass
class ReplyPart:
    reasoning: str = ""
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)


class ReplyParser:
    """Splits a reply's text into its parts as it streams in: the thinking first (when
    `thinking` is not None: `--reasoning-format deepseek`; True when the prompt opened
    the block), then tool calls out of the answer (when the request gave tools)."""

    def __init__(self, thinking: bool | None, tools: bool) -> None:
        self._reasoning = ReasoningSplitter(thinking) if thinking is not None else None
        self._tools = ToolCallParser() if tools else None

    def push(self, text: str) -> ReplyPart:
        return self._answer(self._reasoning.push(text) if self._reasoning else Split(
            content=text), final=False)

    def flush(self) -> ReplyPart:
        return self._answer(self._reasoning.flush() if self._reasoning else Split(),
                            final=True)

    def _answer(self, split: Split, final: bool) -> ReplyPart:
        part = ReplyPart(split.reasoning, split.content)
        if self._tools is not None:
            found = self._tools.push(split.content)
            if final:
                rest = self._tools.flush()
                found.content += rest.content
                found.calls += rest.calls
            part.content, part.calls = found.content, found.calls
        return part


def _function(call: ToolCall) -> FunctionCall:
    return FunctionCall(name=call.name, arguments=call.arguments)


@dataclass
class ChatShape(Shape):
    id_prefix = "chatcmpl-"
    reply: ReplyParser = field(default_factory=lambda: ReplyParser(None, tools=False))
    guard: ThinkingBudget | None = None  # the request's: it counted the thinking tokens
    n_calls: int = 0

    def _chunk(self, delta: Delta, finish: str | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(**self.head(), choices=[
            ChatChunkChoice(delta=delta, finish_reason=finish)])

    def _deltas(self, part: ReplyPart) -> list[BaseModel]:
        out: list[BaseModel] = []
        if part.reasoning:
            out.append(self._chunk(Delta(reasoning_content=part.reasoning)))
        if part.content:
            out.append(self._chunk(Delta(content=part.content)))
        for call in part.calls:
            out.append(self._chunk(Delta(tool_calls=[ToolCallDelta(
                index=self.n_calls, id=call.id, function=_function(call))])))
            self.n_calls += 1
        return out

    def _finish_reason(self, done: Finished) -> str:
        return "tool_calls" if self.n_calls and done.finish_reason == "stop" else \
            done.finish_reason

    def _usage(self, done: Finished) -> BaseModel:
        return usage_of(done, self.guard.tokens if self.guard else 0)

    def opening(self) -> list[BaseModel]:
        return [self._chunk(Delta(role="assistant", content=""))]

    def _with_logprobs(self, chunks: list[BaseModel]) -> list[BaseModel]:
        """The pending logprobs ride on the last of these chunks (none: they wait)."""
        if self.logprobs is not None and chunks:
            last = chunks[-1]
            assert isinstance(last, ChatCompletionChunk)
            last.choices[0].logprobs = self.logprobs.chat()
        return chunks

    def piece(self, text: str) -> list[BaseModel]:
        return self._with_logprobs(self._deltas(self.reply.push(text)))

    def ending(self, done: Finished) -> list[BaseModel]:
        return [*self._with_logprobs(self._deltas(self.reply.flush())),
                *self._with_logprobs([self._chunk(Delta(), self._finish_reason(done))])]

    def usage_only(self, done: Finished) -> BaseModel:
        return ChatCompletionChunk(**self.head(), choices=[], usage=self._usage(done))

    def whole(self, text: str, done: Finished) -> BaseModel:
        head, rest = self.reply.push(text), self.reply.flush()
        calls = head.calls + rest.calls
        self.n_calls = len(calls)
        content = head.content + rest.content
        reasoning = head.reasoning + rest.reasoning
        message = AssistantMessage(
            content=content if content or not calls else None,
            reasoning_content=reasoning or None,
            tool_calls=[ToolCallObject(id=c.id, function=_function(c)) for c in calls] or None)
        return ChatCompletion(**self.head(), usage=self._usage(done), choices=[
            ChatChoice(message=message, finish_reason=self._finish_reason(done),
                       logprobs=self.logprobs.chat() if self.logprobs is not None else None)])
