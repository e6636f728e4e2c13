"""Greedy answers that may differ only at a near tie: a reused or copied prefix was
computed in other batches than a cold run computes it in."""

from __future__ import annotations

from coordinator.engine.frontend import Generation

NEAR_TIE = 0.5  # as tests/test_speculative.py: batch shapes move top-2 margins this much


def same_but_at_near_ties(got: Generation, cold: Generation) -> int | None:
    """Where `got` first leaves `cold` (None: nowhere); that token must be a near tie of
    the cold run."""
    at = next((k for k, (x, y) in enumerate(zip(got.tokens, cold.tokens, strict=True))
               if x != y), None)
    if at is not None:
        assert cold.top2_gaps[at] < NEAR_TIE, (at, cold.top2_gaps[at])
    return at
