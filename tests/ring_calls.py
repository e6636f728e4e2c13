"""Batches sent straight to a ring, waiting for each outcome (what the engine does, one
batch at a time, for tests that look at logits)."""

from __future__ import annotations

import queue

from cluster.messages import Batch, BatchResult
from coordinator.ring.contract import BatchDone, Ring, RingEvent

WAIT_S = 300.0


class Caller:
    def __init__(self, ring: Ring) -> None:
        self.ring = ring
        self.events: queue.Queue[RingEvent] = queue.Queue()
        ring.connect(self.events.put)
        self._next = 1_000_000  # far from any engine's ids

    def send(self, batch: Batch) -> None:
        self.ring.submit(batch)

    def wait(self) -> BatchResult:
        event = self.events.get(timeout=WAIT_S)
        if not isinstance(event, BatchDone):
            raise AssertionError(f"the ring answered {event}")
        return event.result

    def call(self, *slices) -> BatchResult:  # type: ignore[no-untyped-def]
        self._next += 1
        self.send(Batch(self._next, list(slices)))
        return self.wait()
