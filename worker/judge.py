"""The last stage's verdict on a step: verify draft guesses, pick the next token."""

from __future__ import annotations

import numpy as np

from cluster.messages import StepRequest, StepResult
from cluster.verify import verify


def logit_rows(request: StepRequest) -> list[int]:
    """Rows whose logits the verdict needs: the last real token and every guess."""
    n = len(request.tokens)
    return list(range(n - request.n_draft - 1, n))


def top2_gap(row: np.ndarray) -> float:
    top = np.partition(row, -2)[-2:]
    return float(top[1] - top[0])


def judge(request: StepRequest, logits: np.ndarray) -> StepResult:
    rng = np.random.default_rng(request.step_seed)
    verdict = verify(logits, request.draft, request.draft_dists, request.sampling, rng)
    emitted = len(verdict.accepted) + 1
    return StepResult(
        seq=request.seq, step_id=request.step_id, accepted=list(verdict.accepted),
        next_token=int(verdict.next_token),
        top2_gaps=[top2_gap(logits[i]) for i in range(emitted)],
        logits=logits if request.return_logits else None,
    )
