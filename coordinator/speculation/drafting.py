"""What the engine asks of a drafter: guesses for several sequences at once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from cluster.sampling import SamplingParams, SparseDist


@dataclass(frozen=True)
class Draft:
    tokens: list[int]
    dists: list[SparseDist]  # the draft's filtered distribution at each guess


@dataclass(frozen=True)
class DraftRequest:
    seq: int  # the sequence's slot: a drafter with a KV cache keeps one stream per slot
    context: list[int]  # every decided token so far
    gamma: int
    sampling: SamplingParams
    rng: np.random.Generator  # for sampled guesses; its own stream (see `draft_rng`)
    # Constrained decoding: the grammar's state after `context`; guesses are drawn under
    # its masks and pushed on it, and taken back before `propose` returns.
    constraint: GuessConstraint | None = None


class GuessConstraint(Protocol):
    """What a drafter needs of a request's grammar (`coordinator.constrain.Constraint`)."""

    def mask(self) -> bytes: ...  # allowed tokens after the guesses pushed (packed bits)

    def allows(self, token: int) -> bool: ...

    def push(self, token: int) -> bool: ...

    def pop(self, n: int) -> None: ...


class Drafter(Protocol):
    def propose(self, requests: list[DraftRequest]) -> list[Draft]: ...

    def release(self, seq: int) -> None: ...  # the slot's sequence ended

    def close(self) -> None: ...


def draft_rng(step_seed: int) -> np.random.Generator:
    """The drafter's stream for a step: the verifier draws from default_rng(step_seed),
    so guesses drawn from that very stream would bias acceptance."""
    return np.random.default_rng([step_seed, 1])


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens `a` and `b` share from the start (a slot's cache and a context)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    return int(np.argmax(np.asarray(a[:n]) != np.asarray(b[:n])))
