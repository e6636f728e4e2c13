"""The decode loop: prefill, then steps of (draft, verify) until done.

Reads like gpt-fast: `prefill`, `decode_step`, `generate`. The pipeline is anything
with `step(StepRequest) -> StepResult` — in-process stages or gRPC workers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from cluster.errors import SpecshardError
from cluster.messages import StepRequest, StepResult
from cluster.sampling import SamplingParams, SparseDist


class Pipeline(Protocol):
    @property
    def n_ctx(self) -> int: ...

    def step(self, request: StepRequest) -> StepResult: ...

    def reset(self, seq: int) -> None: ...


@dataclass(frozen=True)
class Draft:
    tokens: list[int]
    dists: list[SparseDist]  # the draft's filtered distribution at each guess


class Drafter(Protocol):
    def propose(self, context: list[int], sampling: SamplingParams,
                rng: np.random.Generator) -> Draft: ...

    def observe(self, context: list[int], n_proposed: int, n_accepted: int,
                draft_s: float, verify_s: float) -> None: ...


@dataclass
class Stats:
    n_prompt_tokens: int = 0
    n_tokens: int = 0
    steps: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0  # first generated token → last generated token
    draft_s: float = 0.0
    verify_s: float = 0.0
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
        decode_steps = self.steps - 1  # the prefill step emits one token, drafts nothing
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
            "n_tokens": self.n_tokens, "n_prompt_tokens": self.n_prompt_tokens,
            "steps": self.steps, "tokens_per_step": round(self.tokens_per_step, 3),
            "acceptance_by_position": [round(a / p, 3) if p else 0.0
                                       for a, p in zip(self.accepted, self.proposed,
                                                       strict=True)],
            "gamma_mean": round(sum(self.proposed) / decode_steps, 3),
            "draft_ms": round(1000 * self.draft_s / decode_steps, 3),
            "verify_ms": round(1000 * self.verify_s / decode_steps, 3),
        }


@dataclass
class Generation:
    tokens: list[int]
    stats: Stats
    finish_reason: str  # "stop" (end token or stop text) or "length"
    top2_gaps: list[float]


StopCheck = Callable[[int], bool]


def _seeds(sampling: SamplingParams) -> Iterator[int]:
    rng = np.random.default_rng(sampling.seed)
    while True:
        yield int(rng.integers(0, 2**63 - 1))


def check_fits(pipeline: Pipeline, n_prompt: int, max_tokens: int) -> None:
    if n_prompt == 0:
        raise SpecshardError("the prompt is empty")
    if n_prompt >= pipeline.n_ctx:
        raise SpecshardError(
            f"the prompt has {n_prompt} tokens; the context holds {pipeline.n_ctx}")
    if max_tokens < 1:
        raise SpecshardError("max_tokens must be at least 1")


def generate_stream(pipeline: Pipeline, prompt: list[int], max_tokens: int,
                    sampling: SamplingParams, is_end: StopCheck, seq: int = 0,
                    drafter: Drafter | None = None, stats: Stats | None = None
                    ) -> Generator[tuple[int, float], None, Stats]:
    """Yield (token, top-2 logit gap) as they are decided; return the stats at the end.

    `stats`, when given, is filled in as the generation goes (for a caller that may stop
    consuming early)."""
    check_fits(pipeline, len(prompt), max_tokens)
    seeds = _seeds(sampling)
    stats = stats if stats is not None else Stats()
    stats.n_prompt_tokens = len(prompt)
    context = list(prompt)
    budget = min(max_tokens, pipeline.n_ctx - len(prompt))
    t0 = time.perf_counter()
    result = pipeline.step(StepRequest(seq=seq, start=0, tokens=prompt, sampling=sampling,
                                       step_seed=next(seeds), step_id=0))
    t_first = time.perf_counter()
    stats.prefill_s, stats.steps = t_first - t0, 1
    pending = result
    while True:
        for token, gap in zip(pending.tokens, pending.top2_gaps, strict=True):
            context.append(token)
            stats.n_tokens += 1
            stats.decode_s = time.perf_counter() - t_first
            yield token, gap
            if is_end(token) or stats.n_tokens >= budget:
                return stats
        pending = decode_step(pipeline, context, len(context) - 1, sampling, seq,
                              next(seeds), stats, drafter, budget - stats.n_tokens)


def decode_step(pipeline: Pipeline, context: list[int], start: int,
                sampling: SamplingParams, seq: int, seed: int, stats: Stats,
                drafter: Drafter | None, room: int) -> StepResult:
    """One pass: draft γ guesses after the last token, verify them all at once."""
    t0 = time.perf_counter()
    # The verifier draws from default_rng(seed): the drafter needs a stream of its own,
    # or acceptance would read the very number that chose the guess (biased output).
    draft = drafter.propose(context, sampling, np.random.default_rng([seed, 1])) \
        if drafter else Draft([], [])
    guesses = draft.tokens[:max(0, min(room - 1, pipeline.n_ctx - len(context) - 1))]
    t1 = time.perf_counter()
    result = pipeline.step(StepRequest(
        seq=seq, start=start, tokens=[context[-1], *guesses], sampling=sampling,
        n_draft=len(guesses), draft_dists=draft.dists[:len(guesses)], step_seed=seed,
        step_id=stats.steps))
    t2 = time.perf_counter()
    stats.steps += 1
    stats.draft_s += t1 - t0
    stats.verify_s += t2 - t1
    stats.record_acceptance(len(guesses), len(result.accepted))
    if drafter:
        drafter.observe(context, len(guesses), len(result.accepted), t1 - t0, t2 - t1)
    return result


def generate(pipeline: Pipeline, prompt: list[int], max_tokens: int,
             sampling: SamplingParams, is_end: StopCheck, seq: int = 0,
             drafter: Drafter | None = None) -> Generation:
    stream = generate_stream(pipeline, prompt, max_tokens, sampling, is_end, seq, drafter)
    tokens, gaps = [], []
    while True:
        try:
            token, gap = next(stream)
        except StopIteration as done:
            stats: Stats = done.value
            break
        tokens.append(token)
        gaps.append(gap)
    finish = "stop" if tokens and is_end(tokens[-1]) else "length"
    return Generation(tokens=tokens, stats=stats, finish_reason=finish, top2_gaps=gaps)
