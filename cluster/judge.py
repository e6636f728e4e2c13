"""The last stage's verdict on a slice: verify draft guesses, pick the next token."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from cluster.constrain import masked
from cluster.messages import SeqResult, Slice, TokenLogprobs
from cluster.sampling import transform
from cluster.verify import verify

log = logging.getLogger(__name__)


def top2_gap(row: np.ndarray, best: int | None = None) -> float:
    """The margin of the argmax over the runner-up: one max pass with the best entry
    hidden and put back (docs/overhead.md, "A step's path", has the timings)."""
    best = int(np.argmax(row)) if best is None else best
    top = row[best]
    if row.size < 2:
        return float("inf")
    if not row.flags.writeable:  # a view of someone's buffer: read only
        return float(top - max(row[:best].max(initial=-np.inf),
                               row[best + 1:].max(initial=-np.inf)))
    row[best] = -np.inf
    try:
        return float(top - row.max())
    finally:
        row[best] = top


def transformed_rows(piece: Slice, logits: np.ndarray, tokens: Sequence[int]) -> np.ndarray:
    """The judged rows after the request's logit bias and penalties; row i's penalties
    count the sequence's tokens before it, the guesses before row i included. `tokens`:
    the sequence's tokens by position, this slice's included (the last stage keeps them).
    Then, under constrained decoding, every token row i's mask (`Slice.masks`) does not
    allow gets −inf. Returns `logits` itself when the request asks for none of these."""
    if not piece.sampling.transforms:
        if not piece.masks:
            return logits
        return np.stack([masked(logits[i], piece.masks[i]) for i in range(len(logits))])
    first = piece.start + len(piece.tokens) - piece.n_draft  # row 0 predicts this position
    rows = [transform(logits[i], piece.sampling, tokens, first + i)
            for i in range(len(logits))]
    if piece.masks:
        rows = [masked(row, mask) for row, mask in zip(rows, piece.masks, strict=True)]
    return np.stack(rows)


def token_logprobs(row: np.ndarray, token: int, n_top: int) -> TokenLogprobs:
    """log softmax of a raw logit row (f64) at `token`, and its `n_top` likeliest."""
    x = row.astype(np.float64)
    top = float(x.max())
    log_z = top + float(np.log(np.exp(x - top).sum()))
    best: list[tuple[int, float]] = []
    if n_top > 0:
        ids = np.argpartition(x, -n_top)[-n_top:]
        ids = ids[np.lexsort((ids, -x[ids]))]
        best = [(int(i), float(x[i] - log_z)) for i in ids]
    return TokenLogprobs(float(x[token] - log_z), best)


def with_logprobs(piece: Slice, raw: np.ndarray, result: SeqResult) -> SeqResult:
    """The verdict with its emitted tokens' logprobs, when the request asked."""
    n_top = piece.sampling.logprobs
    if n_top is None:
        return result
    return replace(result, logprobs=[token_logprobs(raw[i], token, n_top)
                                     for i, token in enumerate(result.tokens)])


def judge(piece: Slice, logits: np.ndarray, tokens: Sequence[int] = ()) -> SeqResult:
    """`logits` holds the slice's judged rows (`Slice.judged_rows`), in order; `tokens`
    the sequence's tokens by position (needed when the request has penalties)."""
    raw = logits
    logits = transformed_rows(piece, logits, tokens)
    guesses = piece.guesses
    if piece.sampling.greedy:  # the hot path of greedy decoding: one argmax per row
        best = [int(i) for i in logits.argmax(axis=1)]
        n = next((i for i, guess in enumerate(guesses) if best[i] != guess), len(guesses))
        emitted = min(n + 1, len(best))  # a link accepted: no token drawn after it
        return with_logprobs(piece, raw, SeqResult(
            seq=piece.seq, accepted=list(guesses[:n]),
            next_token=best[n] if n < len(best) else -1,
            top2_gaps=[top2_gap(logits[i], best[i]) for i in range(emitted)],
            logits=raw if piece.return_logits else None))
    rng = np.random.default_rng(piece.step_seed)
    verdict = verify(logits, guesses, piece.draft_dists, piece.sampling, rng)
    emitted = len(verdict.accepted) + (verdict.next_token >= 0)
    return with_logprobs(piece, raw, SeqResult(
        seq=piece.seq, accepted=list(verdict.accepted), next_token=int(verdict.next_token),
        top2_gaps=[top2_gap(logits[i]) for i in range(emitted)],
        logits=raw if piece.return_logits else None,
    ))


def judge_all(slices: list[Slice], rows: list[np.ndarray],
              tokens_of: Callable[[int], Sequence[int]] | None = None) -> list[SeqResult]:
    """The verdicts of a batch's judged slices, in order. A slice that cannot be judged
    (its sampling fails on these logits) gets an error verdict of its own: the other
    sequences of the batch are not failed with it. `tokens_of(seq)`: the sequence's
    tokens by position (the last stage's `Stage.tokens`), for the penalties."""
    out = []
    for piece, logits in zip(slices, rows, strict=True):
        if not (piece.judge and piece.tokens):
            continue
        try:
            out.append(judge(piece, logits,
                             tokens_of(piece.seq) if tokens_of is not None else ()))
        except Exception as exc:  # noqa: BLE001 - reported to the engine, per sequence
            log.warning("sequence %d could not be judged: %s", piece.seq, exc)
            out.append(SeqResult(seq=piece.seq, accepted=[], next_token=-1, top2_gaps=[],
                                 error=f"{type(exc).__name__}: {exc}"))
    return out
