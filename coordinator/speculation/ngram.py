"""Prompt-lookup drafting: guess that the text repeats what followed its last n tokens.

No model: find the most recent earlier occurrence of the context's last n tokens
(n = n_max..n_min, longest first) and propose the tokens that followed it. Each guess
carries a point-mass distribution, so the sampling rule stays exact: a guess d is kept
with probability p(d), and a rejection draws from p with d removed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from cluster.sampling import SparseDist
from coordinator.speculation.drafting import Draft, DraftRequest


@dataclass(frozen=True)
class NgramConfig:
    n_max: int = 3
    n_min: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.n_min <= self.n_max:
            raise ValueError(f"need 1 ≤ n_min ≤ n_max, got {self.n_min}..{self.n_max}")


def find_match(context: np.ndarray, n: int) -> int | None:
    """Start of the most recent earlier occurrence of the last n tokens, if any."""
    if context.size <= n:
        return None
    windows = sliding_window_view(context[:-1], n)  # starts 0..len−n−1: not the suffix itself
    hits = np.flatnonzero((windows == context[-n:]).all(axis=1))
    return int(hits[-1]) if hits.size else None


def continuation(context: np.ndarray, start: int, n: int, gamma: int) -> list[int]:
    """The γ tokens after the match at `start`, the context read as repeating.

    The match sits `period` tokens before the suffix, so the text is assumed to repeat
    with that period: a continuation that runs past the end wraps round onto itself.
    """
    period = context.size - n - start
    out: list[int] = []
    for j in range(gamma):
        i = start + n + j
        while i >= context.size:
            i -= period
        out.append(int(context[i]))
    return out


def lookup(context: list[int], gamma: int, config: NgramConfig) -> list[int]:
    """Up to γ guesses from the longest n-gram that occurred before; [] if none did."""
    if gamma <= 0:
        return []
    tokens = np.asarray(context, dtype=np.int64)
    for n in range(config.n_max, config.n_min - 1, -1):
        start = find_match(tokens, n)
        if start is not None:
            return continuation(tokens, start, n, gamma)
    return []


class NgramDrafter:
    """A `Drafter` that needs no model; its draft costs microseconds."""

    def __init__(self, config: NgramConfig | None = None) -> None:
        self.config = config or NgramConfig()

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        out = []
        for r in requests:
            guesses = lookup(r.context, r.gamma, self.config)
            if r.constraint is not None:  # the guesses the grammar allows, in a row
                kept = 0
                while kept < len(guesses) and r.constraint.push(guesses[kept]):
                    kept += 1
                r.constraint.pop(kept)
                guesses = guesses[:kept]
            out.append(Draft(guesses, [SparseDist.point(t) for t in guesses]))
        return out

    def release(self, seq: int) -> None:
        """Nothing is kept per sequence."""

    def close(self) -> None:
        """Nothing to free; here so every drafter can be closed the same way."""
