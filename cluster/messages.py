"""The small typed structs that travel between coordinator and workers.

Protobuf conversions of these live in one module (`cluster/wire_convert.py`); every
other module deals in these domain objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.sampling import SamplingParams, SparseDist


@dataclass(frozen=True)
class StepRequest:
    """One pass down the pipeline for one sequence.

    `tokens` is the prompt (prefill) or `[last token, d1..dγ]`; the last `n_draft` of
    them are draft guesses for the last worker to verify. `start` is the position of
    tokens[0]: each stage first drops whatever it holds from `start` on, which is how
    the previous step's rejected guesses leave every KV cache.
    """

    seq: int
    start: int
    tokens: list[int]
    sampling: SamplingParams
    n_draft: int = 0
    draft_dists: list[SparseDist] = field(default_factory=list)
    step_seed: int = 0  # the last worker's rng for this step: same seed, same tokens
    step_id: int = 0

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    @property
    def draft(self) -> list[int]:
        return self.tokens[len(self.tokens) - self.n_draft:] if self.n_draft else []


@dataclass(frozen=True)
class StepResult:
    """What the last worker sends back: accepted guesses plus one token of its own."""

    seq: int
    step_id: int
    accepted: list[int]
    next_token: int
    top2_gaps: list[float]  # target logit margin of each emitted token: near-tie evidence

    @property
    def tokens(self) -> list[int]:
        return [*self.accepted, self.next_token]
