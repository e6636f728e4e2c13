"""Verification of draft guesses against the target's logits.

Sampling: accept guess d with probability min(1, p(d)/q(d)); on rejection draw from the
residual max(0, p − q) normalised. The emitted tokens are then distributed exactly as the
target's p. (Greedy slices — accept while the guess is the argmax — are judged in
`cluster/judge.py` without any of this.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cluster.sampling import SamplingParams, SparseDist, filtered_probs, sample


@dataclass(frozen=True)
class Verdict:
    accepted: list[int]  # the accepted prefix of the guesses
    next_token: int  # the correction after a rejection, or the bonus token; -1: none


def residual(p: SparseDist, q: SparseDist) -> SparseDist:
    """max(0, p − q) normalised, over p's support (q adds nothing outside it)."""
    order = np.argsort(q.ids)
    q_ids = q.ids[order]
    at = np.minimum(np.searchsorted(q_ids, p.ids), q_ids.size - 1)
    q_on_p = np.where(q_ids[at] == p.ids, q.probs[order][at], 0.0)
    rest = np.maximum(p.probs - q_on_p, 0.0)
    total = rest.sum()
    if total <= 0:  # p == q: a rejection cannot happen, but stay well-defined
        return p
    return SparseDist(p.ids, rest / total)


def verify(logits: np.ndarray, draft: Sequence[int], draft_dists: Sequence[SparseDist],
           params: SamplingParams, rng: np.random.Generator) -> Verdict:
    """logits[i] is the target's row after guess i (row 0: after the last real token).
    One row per guess: the last guess is a link (run-ahead), no bonus token is drawn
    when every guess is accepted (next_token −1). One more row: the bonus row."""
    if len(logits) not in (len(draft), len(draft) + 1) or not len(logits):
        raise ValueError(f"{len(logits)} logit rows for {len(draft)} guesses")
    if params.greedy:
        raise ValueError("greedy slices are judged by cluster.judge.judge (argmax match)")
    accepted: list[int] = []
    if len(draft_dists) != len(draft):
        raise ValueError(f"{len(draft_dists)} draft distributions for {len(draft)} guesses")
    for i, guess in enumerate(draft):
        p = filtered_probs(logits[i], params)
        q = draft_dists[i]
        p_d, q_d = p.prob(guess), q.prob(guess)
        if q_d > 0 and rng.random() * q_d < p_d:  # u < p/q without dividing
            accepted.append(guess)
            continue
        return Verdict(accepted, sample(residual(p, q), rng))
    if len(logits) == len(draft):
        return Verdict(accepted, -1)
    return Verdict(accepted, sample(filtered_probs(logits[len(draft)], params), rng))
