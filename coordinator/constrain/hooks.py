"""The engine's calls into constrained decoding (`coordinator/engine/core.py`): kept here so
the core only calls them, and a request without a constraint costs one attribute test."""

from __future__ import annotations

from dataclasses import replace

from cluster.sampling import SparseDist
from coordinator.constrain.state import Constraint
from coordinator.engine.output import Decided


def slice_guesses(constraint: Constraint, guesses: list[int], dists: list[SparseDist]
                  ) -> tuple[list[int], list[SparseDist], list[bytes]]:
    """A judged slice's guesses cut before the first one the grammar forbids (a drafter
    that guesses without the masks, or a draft reused after a worker loss, may propose
    one), with their distributions, and the masks of its judged rows."""
    kept, masks = constraint.slice_masks(guesses)
    return guesses[:kept], dists[:kept], masks


def decided_under(constraint: Constraint, decided: Decided) -> Decided:
    """A verdict's tokens that stand advance the grammar; a grammar that allows nothing
    more ends the reply ("stop"), as an end token would."""
    constraint.advance([*decided.kept, *decided.forced])
    if decided.finish is None and constraint.finished:
        return replace(decided, finish="stop")
    return decided
