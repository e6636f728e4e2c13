"""How a rebuilt ring gets its caches back.

Every sequence keeps the slices of its completed batches (`Sequence.history`). After a
rebuild (all KV caches empty), the completed batches are sent again in their order,
each restricted to the sequences still running and without verdicts: the caches then
hold what they held before the loss. A sequence that ran alone had batches of its own,
which come back unchanged, so its caches are bit-identical and its text goes on exactly
as the undisturbed run's; batched sequences may differ only at a near tie (llama.cpp's
kernels are not batch-invariant: docs/scheduler.md, "Determinism").
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from typing import TYPE_CHECKING

from cluster.messages import Slice

if TYPE_CHECKING:
    from coordinator.engine.sequence import Sequence

REPLAY_WINDOW = 8  # replayed batches in flight at once


def replay_plan(sequences: list[Sequence]) -> list[list[Slice]]:
    """The completed batches of the live sequences, in order, restricted to them."""
    by_batch: dict[int, list[Slice]] = defaultdict(list)
    for seq in sequences:
        for batch_id, piece in seq.history:
            # The caches only: the last worker judges nothing (same rows, same K/V).
            by_batch[batch_id].append(replace(piece, judge=False, return_logits=False,
                                              draft_dists=[], masks=[], link=-1))
    return [sorted(by_batch[b], key=lambda s: s.seq) for b in sorted(by_batch)]
