"""Tool calls in a reply. Qwen models (Hermes-style templates) write each call as

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

and the API returns them as OpenAI `tool_calls`. A block whose JSON is not a call stays
in the text as the model wrote it: a model's mistake is the client's to see, not a 500.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from coordinator.api.tags import partial_tag

TOOL_OPEN = "<tool_call>"
TOOL_CLOSE = "</tool_call>"


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text: OpenAI's shape


def parse_call(body: str) -> ToolCall | None:
    """The call a block's text describes, or None when it describes none."""
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        return None
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):  # some models write the arguments as JSON text
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(f"call_{uuid.uuid4().hex[:24]}", call["name"],
                    json.dumps(arguments, ensure_ascii=False))


def template_arguments(arguments: str | dict[str, Any]) -> str | dict[str, Any]:
    """A past call's arguments as chat templates take them: Qwen's writes them with
    `tojson`, expecting the object Hugging Face passes, where OpenAI clients send text."""
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except ValueError:
            return arguments
        return parsed if isinstance(parsed, dict) else arguments
    return arguments


@dataclass
class Found:
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)


class ToolCallParser:
    """Takes the `<tool_call>` blocks out of an answer as it streams in.

    A block is held back until it closes (then it is a call, or text again); a tag's
    beginning at the end of a piece waits for the next. White space next to a call is
    dropped, so an answer that is only calls has no content."""

    def __init__(self) -> None:
        self.n_calls = 0
        self._pending = ""
        self._inside = False
        self._space = ""  # held: it goes out only if more text follows
        self._after_call = False

    def push(self, text: str) -> Found:
        self._pending += text
        out = Found()
        while True:
            if self._inside:
                at = self._pending.find(TOOL_CLOSE)
                if at < 0:
                    return out
                self._block(out, self._pending[:at], closed=True)
                self._pending = self._pending[at + len(TOOL_CLOSE):]
                self._inside = False
            else:
                at = self._pending.find(TOOL_OPEN)
                if at < 0:
                    cut = len(self._pending) - partial_tag(self._pending, TOOL_OPEN)
                    self._text(out, self._pending[:cut])
                    self._pending = self._pending[cut:]
                    return out
                self._text(out, self._pending[:at])
                self._pending = self._pending[at + len(TOOL_OPEN):]
                self._inside = True

    def flush(self) -> Found:
        """The rest, once the answer has ended. A block left open (the model stopped
        without the closing tag, or ran out of tokens) is a call if its JSON is whole."""
        out = Found()
        rest, self._pending = self._pending, ""
        if self._inside:
            self._block(out, rest, closed=False)
        else:
            self._text(out, rest)
        if not self.n_calls:
            out.content += self._space
        return out

    def _block(self, out: Found, body: str, closed: bool) -> None:
        call = parse_call(body)
        if call is None:
            self._text(out, TOOL_OPEN + body + (TOOL_CLOSE if closed else ""))
            return
        out.calls.append(call)
        self.n_calls += 1
        self._space = ""
        self._after_call = True

    def _text(self, out: Found, text: str) -> None:
        text = self._space + text
        if self._after_call:
            text = text.lstrip()
        body = text.rstrip()
        self._space = text[len(body):]
        if body:
            self._after_call = False
            out.content += body
