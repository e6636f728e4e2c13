"""The chat reply's parsers and the prompt's template, without a model: thinking apart
from the answer, the thinking budget, tool calls, and chat templates."""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import pytest

from cluster.errors import SpecshardError
from coordinator.api.chat import ReplyParser
from coordinator.api.reasoning import (
    CLOSE_THINKING,
    ReasoningSplitter,
    Split,
    ThinkingBudget,
    opens_thinking,
)
from coordinator.api.schema import ChatCompletionRequest
from coordinator.api.tags import partial_tag, partial_tag_after_space
from coordinator.api.templates import chat_options, load_template, template_messages
from coordinator.api.tools import ToolCallParser, parse_call, template_arguments
from coordinator.tokenizer import ChatTemplate

QWQ_STYLE = Path(__file__).parent / "data" / "qwq_style.jinja"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city (<= 1 call/s & cached)",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


def split_all(pieces: list[str], thinking: bool) -> Split:
    splitter = ReasoningSplitter(thinking)
    out = Split()
    for piece in pieces:
        part = splitter.push(piece)
        out.reasoning += part.reasoning
        out.content += part.content
    rest = splitter.flush()
    return Split(out.reasoning + rest.reasoning, out.content + rest.content)


def cuts(text: str, n: int) -> list[list[str]]:
    """`text` cut into n+1 pieces, at every choice of n positions."""
    return [[text[a:b] for a, b in zip((0, *at), (*at, len(text)), strict=True)]
            for at in combinations(range(1, len(text)), n)]


# --- thinking apart from the answer -------------------------------------------------------


def test_prompt_that_ends_in_an_open_block_opens_thinking():
    assert opens_thinking("<|im_start|>assistant\n<think>\n")
    assert not opens_thinking("<|im_start|>assistant\n")
    assert not opens_thinking("<|im_start|>user\nwhat is <think>?<|im_end|>\n"
                              "<|im_start|>assistant\n")
    assert not opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")


@pytest.mark.parametrize(("thinking", "reply"), [
    (True, "2 + 3 = 5, so the sum is five.\n</think>\n\nThe answer is 5."),
    (False, "<think>\n2 + 3 = 5, so the sum is five.\n</think>\n\nThe answer is 5."),
    (False, "\n  <think>2 + 3 = 5, so the sum is five.</think>The answer is 5."),
])
def test_closing_tag_split_at_every_position(thinking: bool, reply: str):
    expected = Split("2 + 3 = 5, so the sum is five.", "The answer is 5.")
    assert split_all([reply], thinking) == expected
    for n in (1, 2):
        for pieces in cuts(reply, n):
            assert split_all(pieces, thinking) == expected, pieces
    assert split_all(list(reply), thinking) == expected


def test_tag_pieces_are_held_back_until_they_are_whole():
    splitter = ReasoningSplitter(thinking=True)
    assert splitter.push("so it is 5\n</") == Split("so it is 5")
    assert splitter.push("think") == Split()
    assert splitter.push(">\n\nFive") == Split(content="Five")
    # what looked like the tag's start but was not goes out as thinking
    splitter = ReasoningSplitter(thinking=True)
    assert splitter.push("a </") == Split("a")
    assert splitter.push("b>") == Split(" </b>")


def test_reply_without_thinking_is_left_as_written():
    assert split_all(["\n  Hello", " there\n"], thinking=False) == Split("", "\n  Hello there\n")
    assert split_all(["<", "b>bold</b>"], thinking=False) == Split("", "<b>bold</b>")
    assert split_all(["<thi"], thinking=False) == Split("", "<thi")  # ended mid-tag


def test_a_later_think_tag_is_answer_text():
    assert split_all(["Use <think> tags."], thinking=False) == Split("", "Use <think> tags.")
    assert split_all(["a</think>b <think>c</think>"], thinking=True) == \
        Split("a", "b <think>c</think>")


def test_reply_cut_short_inside_the_block_is_all_thinking():
    assert split_all(["Let me think about", " this carefully\n</thi"], thinking=True) == \
        Split("Let me think about this carefully\n</thi", "")


# --- the thinking budget --------------------------------------------------------------------


def test_budget_closes_the_block_after_that_many_tokens():
    guard = ThinkingBudget(budget=3, thinking=True)
    assert [guard.push(t) for t in ["Let", " me", " see"]] == [None, None, CLOSE_THINKING]
    assert guard.tokens == 3
    assert guard.push("The answer") is None  # answering: no longer counted or closed
    assert guard.tokens == 3


def test_budget_counts_a_block_the_model_opens_and_closes_itself():
    guard = ThinkingBudget(budget=-1, thinking=False)
    tokens = ["<", "think", ">\n", "a", " b", "\n</", "think", ">\n\n", "Hi", "!"]
    assert all(guard.push(t) is None for t in tokens)
    assert guard.tokens == 8  # the opening tag's tokens too, though "<" might have been text


def test_budget_zero_closes_a_block_the_model_opens():
    guard = ThinkingBudget(budget=0, thinking=False)
    assert guard.push("Sure") is None
    guard = ThinkingBudget(budget=0, thinking=False)
    assert guard.push("<think>") == CLOSE_THINKING


def test_unlimited_budget_never_closes():
    guard = ThinkingBudget(budget=-1, thinking=True)
    assert all(guard.push("hmm ") is None for _ in range(1000))
    assert guard.tokens == 1000


# --- tool calls -----------------------------------------------------------------------------

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def parse_all(pieces: list[str]) -> tuple[str, list[tuple[str, dict[str, object]]]]:
    parser = ToolCallParser()
    content, calls = "", []
    for piece in [*pieces, None]:
        found = parser.flush() if piece is None else parser.push(piece)
        content += found.content
        calls += [(c.name, json.loads(c.arguments)) for c in found.calls]
    return content, calls


def test_call_parsed_with_its_tags_split_at_every_position():
    expected = ("", [("get_weather", {"city": "Paris"})])
    reply = CALL + "\n"
    assert parse_all([reply]) == expected
    for pieces in cuts(reply, 1):
        assert parse_all(pieces) == expected, pieces
    assert parse_all(list(reply)) == expected


def test_text_around_calls_stays_content():
    two = f"Checking both.\n{CALL}\n{CALL.replace('Paris', 'Rome')}"
    assert parse_all([two]) == ("Checking both.", [("get_weather", {"city": "Paris"}),
                                                   ("get_weather", {"city": "Rome"})])
    assert parse_all(["no calls here\n"]) == ("no calls here\n", [])


@pytest.mark.parametrize("body", [
    "oops", '{"name": "get_weather", "arguments": {"city": "Par', '["get_weather"]',
    '{"arguments": {}}', '{"name": "f", "arguments": [1, 2]}', '{"name": "", "arguments": {}}'])
def test_malformed_call_stays_text(body: str):
    reply = f"Let me look.\n<tool_call>\n{body}\n</tool_call>"
    assert parse_all([reply]) == (reply, [])
    assert parse_all(list(reply)) == (reply, [])


def test_unclosed_block_is_a_call_only_if_whole():
    assert parse_all([CALL.removesuffix("</tool_call>")])[1] == [
        ("get_weather", {"city": "Paris"})]
    cut = '<tool_call>\n{"name": "get_weather", "argu'
    assert parse_all([cut]) == (cut, [])


def test_call_ids_differ_and_arguments_are_json_text():
    first, second = parse_call('{"name": "f", "arguments": "{\\"x\\": 1}"}'), parse_call(
        '{"name": "f", "arguments": {"x": "é"}}')
    assert first is not None and second is not None
    assert first.id != second.id and first.id.startswith("call_")
    assert json.loads(first.arguments) == {"x": 1}
    assert second.arguments == '{"x": "é"}'


def test_reply_parser_takes_thinking_then_calls():
    reply = ReplyParser(thinking=True, tools=True)
    text = f"I should call the tool.\n</think>\n\n{CALL}"
    parts = [reply.push(c) for c in text] + [reply.flush()]
    assert "".join(p.reasoning for p in parts) == "I should call the tool."
    assert "".join(p.content for p in parts) == ""
    assert [c.name for p in parts for c in p.calls] == ["get_weather"]
    # format none: everything is text, tool calls still parsed
    reply = ReplyParser(thinking=None, tools=True)
    part = reply.push(text)
    rest = reply.flush()
    assert part.content + rest.content == "I should call the tool.\n</think>"
    assert len(part.calls + rest.calls) == 1


def test_partial_tags():
    assert partial_tag("abc <tool_", "<tool_call>") == 6
    assert partial_tag("abc", "<tool_call>") == 0
    assert partial_tag("<tool_call", "<tool_call>") == 10
    assert partial_tag_after_space("x \n </th", "</think>") == 7


# --- templates ------------------------------------------------------------------------------


def test_qwq_style_template_renders_tools_and_opens_thinking():
    template = load_template(QWQ_STYLE)
    chat = [{"role": "user", "content": "Weather in Paris?"}]
    prompt = template.render(chat, tools=[WEATHER])
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")
    assert opens_thinking(prompt)
    assert "# Tools" in prompt and "<tools>" in prompt
    # Hugging Face's tojson: the description is written as is, not HTML-escaped
    assert json.dumps(WEATHER, ensure_ascii=False) in prompt
    assert "<= 1 call/s & cached" in prompt
    assert "# Tools" not in template.render(chat)


def test_history_with_tool_calls_and_results_renders():
    body = ChatCompletionRequest.model_validate({"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 17}'}],
        "tools": [WEATHER]})
    prompt = load_template(QWQ_STYLE).render(template_messages(body.messages),
                                             tools=body.template_tools())
    # the arguments as an object (as the template expects), not a JSON string in a string
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n' \
           '</tool_call><|im_end|>' in prompt
    assert '<|im_start|>user\n<tool_response>\n{"temp_c": 17}\n</tool_response><|im_end|>' \
        in prompt
    assert template_arguments("not json") == "not json"


def test_tool_message_needs_its_call_id():
    with pytest.raises(ValueError, match="tool_call_id"):
        ChatCompletionRequest.model_validate({"messages": [{"role": "tool", "content": "x"}]})


def test_tool_choice():
    def tools_of(choice: object) -> list[str] | None:
        body = ChatCompletionRequest.model_validate({
            "messages": [{"role": "user", "content": "hi"}], "tool_choice": choice,
            "tools": [WEATHER, {"type": "function", "function": {"name": "get_time"}}]})
        tools = body.template_tools()
        return None if tools is None else [t["function"]["name"] for t in tools]
    assert tools_of("auto") == ["get_weather", "get_time"]
    assert tools_of("none") is None
    assert tools_of({"type": "function", "function": {"name": "get_time"}}) == ["get_time"]
    with pytest.raises(ValueError, match="not among the tools"):
        tools_of({"type": "function", "function": {"name": "nope"}})


def test_template_that_knows_enable_thinking_gets_it():
    qwen3_like = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
                  "<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
                  "{% if enable_thinking is defined and not enable_thinking %}"
                  "<think>\n\n</think>\n\n{% endif %}")
    template = ChatTemplate(qwen3_like)
    chat = [{"role": "user", "content": "hi"}]
    assert template.render(chat, enable_thinking=False).endswith("<think>\n\n</think>\n\n")
    assert template.render(chat).endswith("assistant\n")


@pytest.mark.parametrize(("source", "words"), [
    ("{% for m in messages %}{{ m.content }", ["does not parse", "line 1"]),
    ("{{ raise_exception('no system messages here') }}", ["failed", "no system messages"]),
    ("Hello!", ["does not write the messages"]),
])
def test_bad_template_file_is_one_line(tmp_path: Path, source: str, words: list[str]):
    path = tmp_path / "bad.jinja"
    path.write_text(source)
    with pytest.raises(SpecshardError) as caught:
        load_template(path)
    message = str(caught.value)
    assert "\n" not in message and "bad.jinja" in message
    assert all(w in message for w in words), message


def test_reasoning_options_are_checked():
    with pytest.raises(SpecshardError, match="--reasoning-format"):
        chat_options("raw", -1, None)
    with pytest.raises(SpecshardError, match="--reasoning-budget"):
        chat_options("deepseek", -2, None)
    with pytest.raises(SpecshardError, match="cannot read"):
        chat_options("deepseek", -1, "/nonexistent/template.jinja")
    assert chat_options("none", 0, str(QWQ_STYLE)).template is not None
