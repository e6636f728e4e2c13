"""A reasoning model's thinking, kept apart from its answer, and its token budget.

QwQ and DeepSeek-R1 think inside `<think> … </think>` before they answer. QwQ's template
opens the block in the prompt, so its reply starts inside it without the opening tag;
other models write the tag themselves. `--reasoning-format deepseek` (llama-server's
name, and its default) returns the block's text as `reasoning_content`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from coordinator.api.tags import partial_tag_after_space

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
# How the server closes a block: as QwQ closes its own, and — after the "<think>\n" a
# template opened — the empty block Qwen3's template writes when thinking is off.
CLOSE_THINKING = "\n</think>\n\n"


def opens_thinking(prompt: str) -> bool:
    """Whether a rendered prompt leaves the reply inside a thinking block: it ends with
    the opening tag (QwQ's generation prompt is "<|im_start|>assistant\\n<think>\\n").
    Only the end counts: a `<think>` a user wrote earlier in the chat opens nothing."""
    return prompt.rstrip().endswith(THINK_OPEN)


class Phase(Enum):
    START = "start"  # nothing but white space yet: a `<think>` here opens the block
    THINKING = "thinking"
    ANSWER = "answer"


@dataclass
class Split:
    reasoning: str = ""
    content: str = ""


class ReasoningSplitter:
    """Splits a reply into its thinking and its answer as the text streams in.

    The thinking is a block at the very start of the reply (or the start itself, when
    the prompt opened the block); any later tag is answer text. A tag split across
    pieces is held back until it is whole, as `StopText` holds back a stop string; so is
    the white space around the tags, which belongs to neither part."""

    def __init__(self, thinking: bool) -> None:
        self.phase = Phase.THINKING if thinking else Phase.START
        self._pending = ""
        self._fresh = True  # no text of the current part yet: its leading space is dropped

    def push(self, text: str) -> Split:
        self._pending += text
        out = Split()
        while self._pending:
            if self.phase is Phase.START:
                head = self._pending.lstrip()
                if head.startswith(THINK_OPEN):
                    self._pending = head[len(THINK_OPEN):]
                    self._enter(Phase.THINKING)
                elif THINK_OPEN.startswith(head):  # white space, or the tag's beginning
                    break
                else:  # a reply without thinking: its text is left as the model wrote it
                    self._enter(Phase.ANSWER, fresh=False)
            elif self.phase is Phase.THINKING:
                at = self._pending.find(THINK_CLOSE)
                if at >= 0:
                    out.reasoning += self._lead(self._pending[:at].rstrip())
                    self._pending = self._pending[at + len(THINK_CLOSE):]
                    self._enter(Phase.ANSWER)
                else:
                    cut = len(self._pending) - partial_tag_after_space(self._pending,
                                                                       THINK_CLOSE)
                    out.reasoning += self._lead(self._pending[:cut])
                    self._pending = self._pending[cut:]
                    break
            else:
                out.content += self._lead(self._pending)
                self._pending = ""
        return out

    def flush(self) -> Split:
        """The rest, once the reply has ended."""
        rest, self._pending = self._pending, ""
        if self.phase is Phase.THINKING:
            return Split(reasoning=self._lead(rest.rstrip()))
        return Split(content=rest)

    def _enter(self, phase: Phase, fresh: bool = True) -> None:
        self.phase = phase
        self._fresh = fresh

    def _lead(self, text: str) -> str:
        if self._fresh:
            text = text.lstrip()
            self._fresh = not text
        return text


class ThinkingBudget:
    """The engine's `TextGuard` for a chat: counts the tokens the model thinks in and,
    once `budget` of them are spent (-1: never), closes the block so that it answers.

    The engine calls it with every token's text as it is decided (up to a stop string),
    so its count is exact per token; a token counts when any of it is inside the block
    (the closing tag's tokens included; not the closing text it forces). It cannot act
    before the first token: a prompt whose thinking is off closes the block itself
    (`templates.chat_prompt`)."""

    def __init__(self, budget: int, thinking: bool) -> None:
        self.budget = budget
        self.tokens = 0  # read once the request has finished (the engine's thread is done)
        self._split = ReasoningSplitter(thinking)
        self._waiting = 0  # tokens at the start that may turn out to open a block

    def push(self, text: str) -> str | None:
        was = self._split.phase
        part = self._split.push(text)
        now = self._split.phase
        if was is Phase.START:
            self._waiting += 1
            if now is not Phase.START:
                if now is Phase.THINKING or part.reasoning:
                    self.tokens += self._waiting
                self._waiting = 0
        elif was is Phase.THINKING:
            self.tokens += 1
        if self._split.phase is Phase.THINKING and 0 <= self.budget <= self.tokens:
            self._split.push(CLOSE_THINKING)
            return CLOSE_THINKING
        return None
