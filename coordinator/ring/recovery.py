"""What the engine needs of a ring, and how a rebuilt ring gets its caches back.

Every sequence keeps the slices of its completed batches (`Sequence.history`). After a
rebuild (all KV caches empty), the completed batches are sent again in their order,
each restricted to the sequences still running and without verdicts: the caches then
hold what they held before the loss. A sequence that ran alone had batches of its own,
which come back unchanged, so its caches are bit-identical and its text goes on exactly
as the undisturbed run's; batched sequences may differ only at a near tie (llama.cpp's
kernels are not batch-invariant, ARCHITECTURE.md "Determinism").
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Protocol

from cluster.messages import Batch, Slice

if TYPE_CHECKING:
    from coordinator.engine.sequence import Sequence
    from coordinator.ring.grpc_ring import RingEvent

REPLAY_WINDOW = 8  # replayed batches in flight at once


class Ring(Protocol):
    @property
    def n_ctx(self) -> int: ...

    @property
    def n_seq(self) -> int: ...

    def connect(self, sink: Callable[[RingEvent], None]) -> None: ...

    def submit(self, batch: Batch) -> None: ...

    def truncate_all(self, seqs: list[int], length: int = 0) -> None: ...

    def close(self) -> None: ...


class Rebuilder(Protocol):
    def rebuild(self, sink: Callable[[RingEvent], None]) -> Ring:
        """Bring lost workers back, reload and reconnect the ring, clear every cache."""
        ...


def replay_plan(sequences: list[Sequence]) -> list[list[Slice]]:
    """The completed batches of the live sequences, in order, restricted to them."""
    by_batch: dict[int, list[Slice]] = defaultdict(list)
    for seq in sequences:
        for batch_id, piece in seq.history:
            # The caches only: the last worker judges nothing (same rows, same K/V).
            by_batch[batch_id].append(replace(piece, judge=False, return_logits=False,
                                              draft_dists=[]))
    return [sorted(by_batch[b], key=lambda s: s.seq) for b in sorted(by_batch)]


def replay_batches(ring: Ring, sequences: list[Sequence], next_id: Callable[[], int],
                   wait: Callable[[set[int]], None], window: int = REPLAY_WINDOW) -> None:
    """Send the replay, `window` batches in flight; `wait` returns when the given batch
    ids are answered (or raises when the ring is lost again)."""
    plan = replay_plan(sequences)
    for start in range(0, len(plan), max(window, 1)):
        ids = set()
        for slices in plan[start:start + window]:
            batch = Batch(next_id(), slices)
            ids.add(batch.batch_id)
            ring.submit(batch)
        wait(ids)
