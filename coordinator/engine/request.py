"""What a request asks of the engine and what it gets back: the engine's small messages."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from cluster.errors import SpecshardError
from cluster.messages import TokenLogprobs
from cluster.sampling import SamplingParams

if TYPE_CHECKING:
    from coordinator.constrain.state import Constraint


class QueueFull(SpecshardError):
    """More requests are waiting than the queue holds (HTTP 429)."""


class ContextExceeded(SpecshardError):
    """The prompt (plus at least one token) does not fit the context (HTTP 400)."""


class TextGuard(Protocol):
    """Watches a request's text as it is decided and may force text into it.

    Called by the engine with each token's text, in order; what it returns is appended
    to the sequence as if the model had written it (the thinking budget closes a
    `<think>` block this way), and the tokens the model wrote after the one that
    triggered it are dropped.
    """

    def push(self, text: str) -> str | None: ...


@dataclass(frozen=True)
class GenerationRequest:
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    guard: TextGuard | None = None
    with_gaps: bool = False  # events carry each token's top-2 logit gap (tests, benches)
    ignore_eos: bool = False  # decode past end tokens (fixed lengths for benchmarks)
    cache_prompt: bool = True  # may start from a slot's cached prefix (llama-server's)
    # Constrained decoding: this request's grammar state (coordinator/constrain), used by
    # the engine's thread only once submitted.
    constraint: Constraint | None = None


@dataclass
class Stats:
    n_prompt_tokens: int = 0
    n_cached_tokens: int = 0  # of the prompt, found in the slot's caches (not computed)
    n_tokens: int = 0
    steps: int = 0  # judged slices: the prompt's last chunk, then one per decode step
    ahead_windows: int = 0  # judged windows sent before the verdict they continue
    stale_windows: int = 0  # … of which dropped: a verdict before them broke their chain
    skipped_windows: int = 0  # … of which the last worker skipped (early cancellation)
    prefill_s: float = 0.0  # arrival → first token
    decode_s: float = 0.0  # first generated token → last generated token
    proposed: list[int] = field(default_factory=list)  # guesses offered at position k
    accepted: list[int] = field(default_factory=list)  # … and accepted there

    @property
    def tok_s(self) -> float:
        return (self.n_tokens - 1) / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def prompt_tok_s(self) -> float:
        return self.n_prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def tokens_per_step(self) -> float:
        decode_steps = self.steps - 1  # the prompt's step emits one token, drafts nothing
        return (self.n_tokens - 1) / decode_steps if decode_steps > 0 else 0.0

    def record_acceptance(self, n_proposed: int, n_accepted: int) -> None:
        while len(self.proposed) < n_proposed:
            self.proposed.append(0)
            self.accepted.append(0)
        for k in range(n_proposed):
            self.proposed[k] += 1
            self.accepted[k] += k < n_accepted

    def as_dict(self) -> dict[str, object]:
        decode_steps = max(self.steps - 1, 1)
        return {
            "tok_s": round(self.tok_s, 3), "prompt_tok_s": round(self.prompt_tok_s, 3),
            "ttft_s": round(self.prefill_s, 3),
            "n_tokens": self.n_tokens, "n_prompt_tokens": self.n_prompt_tokens,
            "n_cached_tokens": self.n_cached_tokens,
            "steps": self.steps, "tokens_per_step": round(self.tokens_per_step, 3),
            "ahead_windows": self.ahead_windows, "stale_windows": self.stale_windows,
            "skipped_windows": self.skipped_windows,
            "acceptance_by_position": [round(a / p, 3) if p else 0.0
                                       for a, p in zip(self.accepted, self.proposed,
                                                       strict=True)],
            "gamma_mean": round(sum(self.proposed) / decode_steps, 3),
            "decode_s": round(self.decode_s, 4), "proposed": list(self.proposed),
            "accepted": list(self.accepted),
        }


@dataclass(frozen=True)
class TextChunk:
    text: str  # newly visible text (may be empty while a stop string is possible)
    token_ids: list[int]
    top2_gaps: list[float] = field(default_factory=list)
    # The model's tokens' logprobs when the request asked (SamplingParams.logprobs): one
    # per token of token_ids the model wrote (text a guard forced after them has none).
    logprobs: list[TokenLogprobs] = field(default_factory=list)


@dataclass(frozen=True)
class Finished:
    # "stop" (end token or stop string), "length", or "abort" (the server drained it)
    finish_reason: str
    n_prompt_tokens: int
    n_completion_tokens: int
    stats: Stats = field(default_factory=Stats)


@dataclass(frozen=True)
class Failed:
    """The request could not be completed (its error, as the API reports it)."""

    error: BaseException


Event = TextChunk | Finished | Failed
EventSink = Callable[[Event], None]
