"""What the engine needs of a ring, what a ring tells it, and how a lost ring comes back.

A ring takes batches (`submit` never blocks) and reports each one's outcome to the sink
it was connected to, from its own threads: `BatchDone` (the verdicts), `BatchFailed`
(refused whole, caches unchanged) or `RingLost` (a worker is gone; every batch in flight
is lost). `LocalRing` and `GrpcRing` implement it; a `Rebuilder` makes a new one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cluster.errors import ClusterUnavailable
from cluster.messages import Batch, BatchResult


class WorkerLost(ClusterUnavailable):
    """A worker stopped answering: the batches in flight are lost (recovery replays)."""


@dataclass(frozen=True)
class BatchDone:
    result: BatchResult
    stage_ms: dict[str, float]  # compute time per worker, by address
    busy_ms: dict[str, float]  # arrival → handed on, per non-last worker


@dataclass(frozen=True)
class BatchFailed:
    """A worker refused the batch whole (its caches unchanged): a bug or a desync."""

    batch_id: int
    code: str  # a gRPC status name, e.g. "INVALID_ARGUMENT"
    message: str
    worker: str


@dataclass(frozen=True)
class RingLost:
    why: str


RingEvent = BatchDone | BatchFailed | RingLost
Sink = Callable[[RingEvent], None]


class Ring(Protocol):
    @property
    def n_ctx(self) -> int: ...

    @property
    def n_seq(self) -> int: ...

    def connect(self, sink: Sink) -> None: ...

    def submit(self, batch: Batch) -> None:
        """Send a batch; raises WorkerLost at once when the ring is known lost."""
        ...

    def truncate_all(self, seqs: list[int], length: int = 0) -> None: ...

    def close(self) -> None: ...


class Rebuilder(Protocol):
    def rebuild(self, sink: Sink) -> Ring:
        """Bring lost workers back, reload and reconnect the ring, clear every cache.
        Raises ClusterError (WorkerLost among them) when it cannot."""
        ...
