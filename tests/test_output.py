"""A request's output processing, without a ring: what a verdict's tokens become (text,
stop strings, the thinking guard, limits, the finish reason)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.engine.output import Output, StopText
from coordinator.engine.request import GenerationRequest
from coordinator.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_model: Path) -> Iterator[Tokenizer]:
    tok = Tokenizer(tiny_chat_model)
    yield tok
    tok.close()


def words(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_bos=False)


def output(tokenizer: Tokenizer, max_tokens: int = 100, n_ctx: int = 1000,
           **kwargs: object) -> Output:
    prompt = words(tokenizer, "Say something.")
    return Output(GenerationRequest(prompt, max_tokens, **kwargs), tokenizer,  # type: ignore[arg-type]
                  n_ctx)


def test_text_comes_out_as_the_tokens_decode(tokenizer: Tokenizer) -> None:
    out = output(tokenizer)
    tokens = words(tokenizer, "Hello there, world")
    decided = out.decide(tokens, [1.0] * len(tokens))
    assert decided.text == "Hello there, world" and decided.kept == tokens
    assert decided.finish is None and decided.forced == [] and len(decided.gaps) == len(tokens)
    assert out.generated == len(tokens)


def test_a_stop_string_ends_the_text_before_it_across_verdicts(tokenizer: Tokenizer) -> None:
    out = output(tokenizer, stop=("STOP",))
    first = out.decide(words(tokenizer, "one two ST"), [0.0] * 4)
    assert first.finish is None and "ST" not in first.text  # held back: may start a stop
    rest = words(tokenizer, "OP three")
    second = out.decide(rest, [0.0] * len(rest))
    assert second.finish == "stop"
    assert first.text + second.text == "one two "
    assert out.tail() == ""  # a stopped request releases nothing more


def test_held_back_text_is_released_at_the_end(tokenizer: Tokenizer) -> None:
    out = output(tokenizer, stop=("STOP",))
    decided = out.decide(words(tokenizer, "ends with ST"), [0.0] * 3)
    assert decided.finish is None and not decided.text.endswith("ST")
    assert decided.text + out.tail() == "ends with ST"


def test_an_end_token_stops_unless_told_to_ignore_it(tokenizer: Tokenizer) -> None:
    end = next(t for t in range(tokenizer.n_vocab) if tokenizer.is_end(t))
    tokens = [*words(tokenizer, "done"), end, *words(tokenizer, " after")]
    stopped = output(tokenizer).decide(tokens, [0.0] * len(tokens))
    assert stopped.finish == "stop" and stopped.kept == tokens[:tokens.index(end) + 1]
    going = output(tokenizer, ignore_eos=True).decide(tokens, [0.0] * len(tokens))
    assert going.finish is None and going.kept == tokens


def test_max_tokens_and_the_context_end_with_length(tokenizer: Tokenizer) -> None:
    tokens = words(tokenizer, "a b c d e f g")
    by_tokens = output(tokenizer, max_tokens=3).decide(tokens, [0.0] * len(tokens))
    assert by_tokens.finish == "length" and by_tokens.kept == tokens[:3]
    prompt = len(words(tokenizer, "Say something."))
    by_context = output(tokenizer, n_ctx=prompt + 2).decide(tokens, [0.0] * len(tokens))
    assert by_context.finish == "length" and by_context.kept == tokens[:2]


class CloseAfter:
    """A guard that forces `text` once it has seen `trigger` (as the thinking budget
    closes a `<think>` block)."""

    def __init__(self, trigger: str, text: str) -> None:
        self.trigger, self.text, self.seen = trigger, text, ""

    def push(self, text: str) -> str | None:
        self.seen += text
        if self.trigger in self.seen:
            self.seen = ""
            return self.text
        return None


def test_the_guard_forces_its_text_and_drops_what_followed(tokenizer: Tokenizer) -> None:
    out = output(tokenizer, guard=CloseAfter("two", " [closed]"))
    tokens = words(tokenizer, "one two three four")
    decided = out.decide(tokens, [5.0] * len(tokens))
    assert decided.finish is None
    assert decided.text == "one two [closed]"
    assert decided.kept == words(tokenizer, "one two")  # "three four" never became tokens
    assert decided.forced == words(tokenizer, " [closed]")
    assert decided.gaps == [5.0] * len(decided.kept) + [0.0] * len(decided.forced)
    assert out.generated == len(decided.tokens)


def test_forced_text_respects_max_tokens(tokenizer: Tokenizer) -> None:
    out = output(tokenizer, max_tokens=3, guard=CloseAfter("one", " and a long tail"))
    decided = out.decide(words(tokenizer, "one two"), [0.0, 0.0])
    assert len(decided.tokens) == 3 and decided.finish == "length"


def test_stop_text_holds_back_the_longest_stop_less_one() -> None:
    stop = StopText(("</s>", "END"))
    assert stop.push("abc<") == "a"  # "bc<" may be the start of "</s>"
    assert stop.push("/s>x") == "bc" and stop.stopped
