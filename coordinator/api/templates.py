"""From a chat request to the prompt: the chat template (the model's, or
`--chat-template-file`), the tools, `chat_template_kwargs`, and whether the reply starts
inside a thinking block (QwQ's template opens one)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cluster.errors import SpecshardError
from coordinator.api.reasoning import CLOSE_THINKING, opens_thinking
from coordinator.api.schema import ChatCompletionRequest, ChatMessage
from coordinator.api.tools import template_arguments
from coordinator.tokenizer import ChatTemplate, Message, Tokenizer

REASONING_FORMATS = ("deepseek", "none")
# Variables the server gives every template; a request may not replace them.
RESERVED = frozenset({"messages", "tools", "add_generation_prompt", "bos_token",
                      "eos_token"})
_PROBE_TEXT = "specshard-probe-1729"
_PROBE: list[Message] = [{"role": "system", "content": "You are helpful."},
                         {"role": "user", "content": _PROBE_TEXT}]


@dataclass(frozen=True)
class ChatOptions:
    """The server's defaults for chats: `serve`'s --reasoning-format, --reasoning-budget
    and --chat-template-file."""

    reasoning_format: str = "deepseek"
    reasoning_budget: int = -1  # thinking tokens per reply; -1: no limit, 0: no thinking
    template: ChatTemplate | None = None  # instead of the model's own


def load_template(path: Path) -> ChatTemplate:
    """A chat template file, checked by rendering a short conversation with it."""
    try:
        source = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecshardError(f"cannot read the chat template {path}: {exc.strerror}"
                             ) from None
    except UnicodeDecodeError:
        raise SpecshardError(f"the chat template {path} is not UTF-8 text") from None
    try:
        template = ChatTemplate(source)
        text = template.render(_PROBE, bos_token="", eos_token="")
    except SpecshardError as exc:
        raise SpecshardError(f"{path}: {exc}") from None
    if _PROBE_TEXT not in text:
        raise SpecshardError(f"{path}: the chat template does not write the messages it "
                             "is given")
    return template


def chat_options(reasoning_format: str, reasoning_budget: int, template_file: str | None
                 ) -> ChatOptions:
    if reasoning_format not in REASONING_FORMATS:
        raise SpecshardError(f"--reasoning-format is one of {', '.join(REASONING_FORMATS)}, "
                             f"not {reasoning_format!r}")
    if reasoning_budget < -1:
        raise SpecshardError("--reasoning-budget is -1 (unlimited), 0 (no thinking) or a "
                             "number of tokens")
    template = load_template(Path(template_file)) if template_file else None
    return ChatOptions(reasoning_format, reasoning_budget, template)


def template_messages(messages: list[ChatMessage]) -> list[Message]:
    """The messages as chat templates read them (Hugging Face's conventions)."""
    out: list[Message] = []
    for m in messages:
        # Templates know "system"; "developer" is OpenAI's newer name for it.
        item: Message = {"role": "system" if m.role == "developer" else m.role,
                         "content": m.text}
        if m.tool_calls:
            item["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {
                    "name": c.function.name,
                    "arguments": template_arguments(c.function.arguments)}}
                for c in m.tool_calls]
        if m.tool_call_id:
            item["tool_call_id"] = m.tool_call_id
        if m.name:
            item["name"] = m.name
        out.append(item)
    return out


def split_prefill(messages: list[ChatMessage]) -> tuple[list[ChatMessage], str]:
    """A conversation ending with an assistant message is a prefill, as llama-server
    reads it: the template renders the messages before it (with the generation prompt)
    and the reply continues its text. Otherwise: the messages, and no prefill."""
    if not messages or messages[-1].role != "assistant":
        return messages, ""
    last = messages[-1]
    if last.tool_calls:
        raise SpecshardError("the last message is an assistant message with tool calls: "
                             "send the tool results, or leave the calls out to continue "
                             "its text")
    if len(messages) >= 2 and messages[-2].role == "assistant":
        raise SpecshardError("two assistant messages end the conversation: only the last "
                             "may be continued")
    if len(messages) == 1:
        raise SpecshardError("an assistant message to continue needs a message before it")
    return messages[:-1], last.text


@dataclass(frozen=True)
class ChatPrompt:
    text: str
    thinking: bool  # the reply starts inside a thinking block the prompt opened
    budget: int  # thinking tokens allowed; -1: no limit
    split_reasoning: bool  # --reasoning-format deepseek: the thinking apart
    tools: bool  # tool calls are taken out of the answer


def chat_prompt(body: ChatCompletionRequest, tokenizer: Tokenizer, options: ChatOptions
                ) -> ChatPrompt:
    variables = dict(body.chat_template_kwargs or {})
    clash = sorted(RESERVED & variables.keys())
    if clash:
        raise SpecshardError(f"chat_template_kwargs may not set {', '.join(clash)}")
    budget = (options.reasoning_budget if body.thinking_budget_tokens is None
              else body.thinking_budget_tokens)
    if budget == 0:  # as llama-server: no budget is thinking off, for templates that can
        variables.setdefault("enable_thinking", False)
    thinking_off = variables.get("enable_thinking") is False
    tools = body.template_tools()
    messages, prefill = split_prefill(body.messages)
    text = tokenizer.chat_prompt(template_messages(messages), tools, options.template,
                                 **variables)
    thinking = opens_thinking(text)
    if thinking and thinking_off:
        # The template opens the block whatever it is told (QwQ's does): close it empty,
        # as Qwen3's template does when thinking is off, so the model answers at once.
        text += CLOSE_THINKING
        thinking = False
    if prefill:
        # The reply continues the assistant's text (inside the thinking block the
        # template opened, unless the text closes it); only what follows is returned.
        text += prefill
        thinking = thinking and CLOSE_THINKING.strip() not in prefill
    return ChatPrompt(text, thinking, 0 if thinking_off else budget,
                      (body.reasoning_format or options.reasoning_format) == "deepseek",
                      tools is not None)
