"""One request's grammar state, kept by the engine: what the grammar allows next.

The state always stands after the reply's decided tokens (`advance`, with each
verdict's tokens that stand). A slice's masks are computed by pushing its draft guesses
one by one and rolling them back: row i's mask is the state after guesses[:i], so the
last worker masks each row as plain constrained decoding would at that position, and a
guess the grammar forbids is never sent (the guesses are cut before it). Drafters guess
under the same masks (`push`, `mask`, `pop`); masks computed since the last `advance`
are remembered by their guesses, so the slice reuses the drafter's.
"""

from __future__ import annotations

from collections.abc import Callable

import llguidance

from cluster.errors import ClusterError, SpecshardError
from coordinator.constrain.grammar import GrammarSpec
from coordinator.constrain.vocab import end_tokens, ll_tokenizer
from coordinator.tokenizer import Tokenizer


class Constraint:
    def __init__(self, matcher: llguidance.LLMatcher, ends: list[int], what: str) -> None:
        self.matcher = matcher
        self.ends = frozenset(ends)
        self.what = what
        self._pushed: list[int] = []  # guesses pushed since the last advance
        self._memo: dict[tuple[int, ...], bytes] = {}
        self.n_masks = 0  # masks computed (benches divide their time by it)

    # --- the decided tokens ------------------------------------------------------------

    def advance(self, tokens: list[int]) -> None:
        """The reply's next decided tokens. A token the grammar forbids here means the
        masks were not applied: the request fails rather than return a broken shape.
        End tokens are never consumed by the matcher: the reply ends with them."""
        self.pop(len(self._pushed))
        self._memo.clear()
        for token in tokens:
            if token in self.ends:
                continue
            if self.matcher.validate_tokens([token]) != 1 or \
                    not self.matcher.consume_token(token):
                raise ClusterError(f"token {token} breaks the request's {self.what}")

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows nothing more: the reply ends."""
        return self.matcher.is_stopped()

    # --- guesses -----------------------------------------------------------------------

    def mask(self) -> bytes:
        """The tokens allowed after the decided tokens and the guesses pushed."""
        key = tuple(self._pushed)
        hit = self._memo.get(key)
        if hit is None:
            hit = self._memo[key] = self.matcher.compute_bitmask()
            self.n_masks += 1
        return hit

    def allows(self, token: int) -> bool:
        if self._pushed and self._pushed[-1] in self.ends:
            return False  # nothing follows an end token
        if token in self.ends:
            return self.matcher.is_stopped() or self.matcher.is_accepting()
        return not self.matcher.is_stopped() and self.matcher.validate_tokens([token]) == 1

    def push(self, token: int) -> bool:
        """A guess, if the grammar allows it here (False: not pushed)."""
        if not self.allows(token):
            return False
        if token not in self.ends and not self.matcher.consume_token(token):
            raise ClusterError(f"the {self.what} grammar failed: {self.matcher.get_error()}")
        self._pushed.append(token)
        return True

    def pop(self, n: int) -> None:
        """Take back the last n guesses pushed."""
        n = min(n, len(self._pushed))
        if not n:
            return
        gone = self._pushed[len(self._pushed) - n:]
        consumed = sum(token not in self.ends for token in gone)
        if consumed and not self.matcher.rollback(consumed):
            raise ClusterError(f"the {self.what} grammar could not roll back")
        del self._pushed[len(self._pushed) - n:]

    def slice_masks(self, guesses: list[int]) -> tuple[int, list[bytes]]:
        """How many of `guesses` the grammar allows in a row, and the masks of the rows
        that judge them: the state before each kept guess, and after the last."""
        masks = [self.mask()]
        kept = 0
        for guess in guesses:
            if not self.allows(guess):
                break
            self.push(guess)
            kept += 1
            masks.append(self.mask())
        self.pop(kept)
        return kept, masks


def build_constraint(spec: GrammarSpec, tokenizer: Tokenizer) -> Constraint:
    """A fresh state for one request; the grammar is checked against the vocabulary here
    (an invalid schema or grammar: a `SpecshardError` naming the problem)."""
    ll = ll_tokenizer(tokenizer)
    error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(spec.grammar, ll)
    if error:
        raise SpecshardError(f"{spec.what}: {_first_line(messages[0])}")
    matcher = llguidance.LLMatcher(ll, spec.grammar, log_level=0)
    if matcher.is_error():
        raise SpecshardError(f"{spec.what}: {_first_line(matcher.get_error())}")
    return Constraint(matcher, end_tokens(tokenizer), spec.what)


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "invalid"


def single_token(tokenizer: Tokenizer, text: str) -> int | None:
    """The vocabulary's one token for `text` (a special token such as `<tool_call>`)."""
    ids = tokenizer.encode(text, special=True, add_bos=False)
    return ids[0] if len(ids) == 1 else None


def request_constraint(spec_of: Callable[[Callable[[str], int | None]], GrammarSpec | None],
                       tokenizer: Tokenizer) -> Constraint | None:
    """A request's constraint, from its `grammar_spec` (`coordinator/api/schema.py`);
    None when it asks for none. Takes milliseconds (a big schema: more): off the loop."""
    spec = spec_of(lambda text: single_token(tokenizer, text))
    return build_constraint(spec, tokenizer) if spec is not None else None
