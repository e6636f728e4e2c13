"""The last stage's verdict on a slice: verify draft guesses, pick the next token."""

from __future__ import annotations

import numpy as np

from cluster.messages import SeqResult, Slice
from cluster.verify import verify


def top2_gap(row: np.ndarray) -> float:
    top = np.partition(row, -2)[-2:]
    return float(top[1] - top[0])


def judge(piece: Slice, logits: np.ndarray) -> SeqResult:
    """`logits` holds the slice's judged rows (`Slice.judged_rows`), in order."""
    rng = np.random.default_rng(piece.step_seed)
    verdict = verify(logits, piece.draft, piece.draft_dists, piece.sampling, rng)
    emitted = len(verdict.accepted) + 1
    return SeqResult(
        seq=piece.seq, accepted=list(verdict.accepted), next_token=int(verdict.next_token),
        top2_gaps=[top2_gap(logits[i]) for i in range(emitted)],
        logits=logits if piece.return_logits else None,
    )
