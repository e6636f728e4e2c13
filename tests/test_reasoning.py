"""A QwQ-style server (the demo target with `tests/data/qwq_style.jinja`, whose prompt
opens `<think>`) driven by the real `openai` client: the thinking in `reasoning_content`,
the answer in `content`, streamed and whole; the thinking budget; thinking off."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam

from coordinator.api.reasoning import CLOSE_THINKING
from coordinator.api.schema import ChatCompletionRequest
from coordinator.api.templates import ChatOptions, chat_prompt, load_template
from tests.chat_server import MODEL, QWQ_STYLE, ChatServer, chat_server

pytestmark = pytest.mark.slow

# The demo target is no reasoning model: asked to, it closes the block the template
# opened and then answers (greedy: "2 + 3 = 5\n</think>\nThe answer is 5.").
SUM: list[ChatCompletionMessageParam] = [{"role": "user", "content": (
    "What is 2+3? First reason inside the think block and close it with </think>. "
    "Then, after the block, state the answer as a sentence.")}]
EXPLAIN: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Explain how to reverse a list in Python."}]
SHORT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is 2+3?"}]


@pytest.fixture(scope="module")
def server(demo_target: Path) -> Iterator[ChatServer]:
    with chat_server(demo_target, ChatOptions(template=load_template(QWQ_STYLE))) as s:
        yield s


def ask(server: ChatServer, messages: list[ChatCompletionMessageParam], max_tokens: int,
        **extra: Any) -> ChatCompletion:
    return server.client().chat.completions.create(
        model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0,
        extra_body=extra or None)


def reasoning_of(message: Any) -> str | None:
    return getattr(message, "reasoning_content", None)


def reasoning_tokens(answer: Any) -> int:
    assert answer.usage is not None and answer.usage.completion_tokens_details is not None
    return int(answer.usage.completion_tokens_details.reasoning_tokens)


def test_thinking_and_answer_apart(server: ChatServer):
    raw = server.raw([dict(m) for m in SUM], 40)
    assert "</think>" in raw.text and "<think>" not in raw.text  # the template opened it
    answer = ask(server, SUM, 40)
    message = answer.choices[0].message
    thought, said = raw.text.split("</think>")
    assert reasoning_of(message) == thought.strip() != ""
    assert message.content == said.strip() != ""
    assert "5" in message.content and answer.choices[0].finish_reason == "stop"
    # the tokens up to the one that completes the closing tag are the thinking
    pieces = [server.engine.tokenizer.decode([t]) for t in raw.tokens]
    closing = next(i for i in range(len(pieces)) if "</think>" in "".join(pieces[:i + 1]))
    assert "</think>" not in pieces[closing]  # the tag is split across tokens
    assert reasoning_tokens(answer) == closing + 1
    # llama-server's per-request `reasoning_format: none`: the text as the model wrote it
    plain = ask(server, SUM, 40, reasoning_format="none").choices[0].message
    assert plain.content == raw.text and reasoning_of(plain) is None


def test_thinking_and_answer_streamed(server: ChatServer):
    whole = ask(server, SUM, 40).choices[0].message
    stream = server.client().chat.completions.create(
        model=MODEL, messages=SUM, max_tokens=40, temperature=0, stream=True,
        stream_options={"include_usage": True})
    kinds: list[str] = []
    thought: list[str] = []
    said: list[str] = []
    finish, usage = None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk
        for choice in chunk.choices:
            delta = choice.delta
            if text := reasoning_of(delta):
                kinds.append("reasoning")
                thought.append(text)
            if delta.content:
                kinds.append("content")
                said.append(delta.content)
            finish = choice.finish_reason or finish
    assert "".join(thought) == reasoning_of(whole)
    assert "".join(said) == whole.content
    assert len(thought) > 1 and len(said) > 1  # streamed as it came, not at the end
    assert kinds == sorted(kinds, key=lambda k: k == "content")  # thinking, then answer
    assert not any("<" in piece for piece in thought + said)  # no tag, nor a piece of one
    assert finish == "stop"
    assert usage is not None and reasoning_tokens(usage) > 0


def test_budget_closes_the_thinking(server: ChatServer):
    unlimited = ask(server, EXPLAIN, 24)  # left alone, it thinks past 24 tokens
    assert reasoning_tokens(unlimited) == 24 and not unlimited.choices[0].message.content
    answer = ask(server, EXPLAIN, 40, thinking_budget_tokens=8)
    message = answer.choices[0].message
    assert reasoning_tokens(answer) == 8
    thought = reasoning_of(message)
    assert thought and abs(len(server.engine.tokenizer.encode(thought, add_bos=False)) - 8) <= 1
    assert message.content  # the model answered once the block was closed
    assert answer.usage is not None and answer.usage.completion_tokens == 40


@pytest.mark.parametrize("off", [{"chat_template_kwargs": {"enable_thinking": False}},
                                 {"thinking_budget_tokens": 0}])
def test_thinking_off(server: ChatServer, off: dict[str, Any]):
    answer = ask(server, SHORT, 20, **off)
    message = answer.choices[0].message
    assert reasoning_of(message) is None
    assert message.content and "5" in message.content
    assert reasoning_tokens(answer) == 0


def test_prompt_follows_the_thinking_settings(server: ChatServer):
    tokenizer = server.engine.tokenizer
    body = ChatCompletionRequest.model_validate({"messages": SHORT})
    opened = chat_prompt(body, tokenizer, server.chat)
    assert opened.text.endswith("<think>\n") and opened.thinking and opened.budget == -1
    off = chat_prompt(body, tokenizer, ChatOptions(reasoning_budget=0,
                                                   template=server.chat.template))
    assert off.text == opened.text + CLOSE_THINKING and not off.thinking and off.budget == 0
    budget = ChatCompletionRequest.model_validate({"messages": SHORT,
                                                   "thinking_token_budget": 16})
    assert chat_prompt(budget, tokenizer, server.chat).budget == 16  # vLLM's name
    plain = chat_prompt(body, tokenizer, ChatOptions())  # the model's own template
    assert not plain.thinking and plain.text.endswith("<|im_start|>assistant\n")
