"""A pipeline that survives losing a worker: rebuild the ring, replay, carry on.

Every sequence's steps are recorded as they were sent — the prompt, then each verify
step with its guesses. After the ring is rebuilt (all KV caches cleared), a sequence
replays its own steps, with the same batch boundaries, before its next step: the KV it
rebuilds is bit-identical, so no answer changes and no request fails.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import replace

from cluster.errors import SpecshardError
from cluster.messages import StepRequest, StepResult
from coordinator.grpc_pipeline import WorkerLost
from coordinator.ring import Ring

log = logging.getLogger(__name__)
MAX_RECOVERIES = 5  # per step: a ring that keeps failing is reported, not retried forever


class ResilientPipeline:
    def __init__(self, ring: Ring) -> None:
        if ring.pipeline is None:
            raise SpecshardError("start the ring first")
        self.ring = ring
        self._history: dict[int, list[StepRequest]] = {}
        self._synced: dict[int, int] = {}  # sequence → epoch its KV was rebuilt for
        self._epoch = 0
        self._lock = threading.Lock()

    @property
    def n_ctx(self) -> int:
        return min(s.n_ctx for s in self.ring.specs)

    def step(self, request: StepRequest) -> StepResult:
        seq = request.seq
        for _ in range(MAX_RECOVERIES):
            epoch, pipeline = self._epoch, self.ring.pipeline
            if pipeline is None:  # a rebuild is under way: wait for it, then go on
                self.recover(epoch)
                continue
            try:
                if self._synced.get(seq, 0) != epoch:
                    self._replay(seq)
                    self._synced[seq] = epoch
                result = pipeline.step(request)
            except WorkerLost as exc:
                log.warning("step %d of sequence %d lost (%s): recovering", request.step_id,
                            seq, exc)
                self.recover(epoch)
                continue
            self._history.setdefault(seq, []).append(replace(request, return_logits=False))
            return result
        raise WorkerLost(f"the ring failed {MAX_RECOVERIES} times in a row; giving up")

    def _replay(self, seq: int) -> None:
        pipeline = self.ring.pipeline
        assert pipeline is not None
        steps = self._history.get(seq, [])
        log.info("replaying %d steps of sequence %d", len(steps), seq)
        for past in steps:
            pipeline.step(past)

    def recover(self, seen_epoch: int) -> None:
        """Rebuild the ring once per loss, however many sequences noticed it."""
        with self._lock:
            if self._epoch != seen_epoch:
                return  # someone else already rebuilt it
            self.ring.rebuild()
            self._epoch += 1

    def recover_now(self) -> None:
        self.recover(self._epoch)

    def reset(self, seq: int) -> None:
        self._history.pop(seq, None)
        self._synced[seq] = self._epoch  # an empty sequence is in sync with any ring
        pipeline = self.ring.pipeline
        if pipeline is not None:
            with contextlib.suppress(WorkerLost):  # a rebuild clears it anyway
                pipeline.reset(seq)
