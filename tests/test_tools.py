"""Tool calls through the real `openai` client, on the demo target with its own template
(Qwen2.5's, which writes the tools into the system prompt): `<tool_call>` blocks the
model writes come back as `tool_calls`, whole and streamed; the result goes back in a
`tool` message; a block that is not a call stays text; a bad template file stops
`serve` at start-up with one line."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from coordinator.api.templates import ChatOptions
from tests.chat_server import MODEL, ChatServer, chat_server

pytestmark = pytest.mark.slow

WEATHER: ChatCompletionToolParam = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
QUESTION: ChatCompletionMessageParam = {"role": "user", "content": "What is the weather in Paris?"}
# The demo target never writes Qwen's `<tool_call>` token by itself (its logit is ~22
# below the best); asked for an XML element of that name it writes the same text from
# ordinary tokens ("<", "tool", "_call", ">\n"), which is what the server parses.
CALL_IT: ChatCompletionMessageParam = {"role": "system", "content": (
    "Answer with XML: an element named tool_call whose text is a JSON object with keys "
    "name and arguments.")}
NOT_JSON: ChatCompletionMessageParam = {"role": "system", "content": (
    "Answer with XML: an element named tool_call whose text is the name of the city.")}


@pytest.fixture(scope="module")
def server(demo_target: Path) -> Iterator[ChatServer]:
    with chat_server(demo_target, ChatOptions()) as s:
        yield s


def test_call_returned_as_tool_calls(server: ChatServer):
    raw = server.raw([dict(CALL_IT), dict(QUESTION)], 40, tools=[dict(WEATHER)])
    pieces = [server.engine.tokenizer.decode([t]) for t in raw.tokens]
    assert "<tool_call>" in raw.text and "<tool_call>" not in pieces  # split across tokens
    answer = server.client().chat.completions.create(
        model=MODEL, messages=[CALL_IT, QUESTION], tools=[WEATHER], max_tokens=40,
        temperature=0)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1
    assert calls[0].type == "function" and calls[0].id.startswith("call_")
    assert calls[0].function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]


def test_call_streamed_as_tool_call_deltas(server: ChatServer):
    stream = server.client().chat.completions.create(
        model=MODEL, messages=[CALL_IT, QUESTION], tools=[WEATHER], max_tokens=40,
        temperature=0, stream=True)
    calls: list[Any] = []
    content, finish = "", None
    for chunk in stream:
        for choice in chunk.choices:
            calls += choice.delta.tool_calls or []
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and content == ""
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].id.startswith("call_")
    assert calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}


def test_tool_result_answered_on_the_next_turn(server: ChatServer):
    client = server.client()
    first = client.chat.completions.create(
        model=MODEL, messages=[CALL_IT, QUESTION], tools=[WEATHER], max_tokens=40,
        temperature=0).choices[0].message
    assert first.tool_calls
    call_id = first.tool_calls[0].id
    # The steering system message is left out of the next turn: it would make the model
    # call again. `tool_choice: "none"`: answer, do not call.
    history: list[Any] = [QUESTION, first.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call_id, "content": "Sunny, 17 °C"}]
    answer = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER],
                                            tool_choice="none", max_tokens=30, temperature=0)
    choice = answer.choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    assert choice.message.content and "17" in choice.message.content


def test_malformed_call_stays_content(server: ChatServer):
    raw = server.raw([dict(NOT_JSON), dict(QUESTION)], 40, tools=[dict(WEATHER)])
    assert raw.text.startswith("<tool_call>")
    answer = server.client().chat.completions.create(
        model=MODEL, messages=[NOT_JSON, QUESTION], tools=[WEATHER], max_tokens=40,
        temperature=0)
    choice = answer.choices[0]
    assert choice.message.content == raw.text and not choice.message.tool_calls
    assert choice.finish_reason == "stop"


def test_plain_chat_is_the_model_text(server: ChatServer):
    """No tools, no thinking: the parsers leave the reply as the model wrote it."""
    haiku: ChatCompletionMessageParam = {"role": "user", "content": "A haiku about the sea."}
    raw = server.raw([dict(haiku)], 12)
    answer = server.client().chat.completions.create(model=MODEL, messages=[haiku],
                                                     max_tokens=12, temperature=0)
    message = answer.choices[0].message
    assert message.content == raw.text != ""
    assert getattr(message, "reasoning_content", None) is None and message.tool_calls is None
    assert answer.usage is not None and answer.usage.completion_tokens_details is not None
    assert answer.usage.completion_tokens_details.reasoning_tokens == 0


@pytest.mark.parametrize(("flags", "words"), [
    (["--chat-template-file", "{bad}"], ["broken.jinja", "does not parse", "line 1"]),
    (["--reasoning-format", "raw"], ["--reasoning-format", "deepseek, none", "'raw'"]),
])
def test_bad_chat_settings_stop_serve_with_one_line(tmp_path: Path, flags: list[str],
                                                    words: list[str]):
    bad = tmp_path / "broken.jinja"
    bad.write_text("{% for message in messages %}{{ message.content }")
    args = [flag.format(bad=bad) for flag in flags]
    result = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "serve", *args, "--local-workers", "1",
         "--port", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("specshard: error: "), result.stderr
    assert all(word in lines[0] for word in words), lines[0]
