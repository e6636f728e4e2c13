"""All stages in this process: the reference the distributed ring must match.

The same interface as `GrpcRing` (connect a sink, submit batches, outcomes at the sink),
computed at once in the caller's thread, hidden states passed in memory.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from cluster.errors import InvalidForward
from cluster.judge import judge_all
from cluster.llama.stage import Stage, StageConfig
from cluster.messages import Batch, BatchResult
from cluster.model_info import KvType
from cluster.rope import RopeParams
from cluster.stage_cut import StageSpec, cut_stage
from coordinator.ring.contract import BatchDone, BatchFailed, Sink


class LocalRing:
    """Stages run one after the other in one process."""

    def __init__(self, stages: list[Stage]) -> None:
        self.stages = stages
        self.addresses = [f"local:{s.begin}-{s.end}" for s in stages]
        self._sink: Sink = lambda _event: None

    @classmethod
    def load(cls, model: Path, specs: list[StageSpec], n_ctx: int = 4096,
             n_seq_max: int = 1, n_threads: int = 2, kv: KvType = KvType.F16,
             progress: bool = False, rope: RopeParams | None = None) -> LocalRing:
        stages: list[Stage] = []
        try:
            for spec in specs:
                path = cut_stage(model, spec.begin, spec.end, progress=progress)
                stages.append(Stage(StageConfig(
                    stage_path=path, model_path=model if spec.is_first else None,
                    n_ctx=n_ctx, n_seq_max=n_seq_max, n_threads=n_threads, type_k=kv,
                    type_v=kv, flash_attn=kv is not KvType.F16, rope=rope)))
        except BaseException:
            for stage in stages:
                stage.close()
            raise
        return cls(stages)

    @property
    def n_ctx(self) -> int:
        return min(s.n_ctx_seq for s in self.stages)

    @property
    def n_seq(self) -> int:
        return min(s.config.n_seq_max for s in self.stages)

    def connect(self, sink: Sink) -> None:
        self._sink = sink

    def logits(self, batch: Batch) -> tuple[list[np.ndarray], dict[str, float]]:
        """Every slice's judged rows' logits, and each stage's time."""
        hidden: np.ndarray | None = None
        times = {}
        for i, (stage, address) in enumerate(zip(self.stages, self.addresses, strict=True)):
            t0 = time.perf_counter()
            try:
                out = stage.forward(batch.slices, hidden)
            except BaseException:
                for done in self.stages[:i]:  # the stages before this one computed it
                    for s in batch.slices:
                        done.truncate(s.seq, s.start)
                raise
            times[address] = 1000 * (time.perf_counter() - t0)
            if isinstance(out, list):
                return out, times
            hidden = out
        raise AssertionError("the last stage returns logits")

    def submit(self, batch: Batch) -> None:
        try:
            rows, times = self.logits(batch)
        except InvalidForward as exc:
            self._sink(BatchFailed(batch.batch_id, "INVALID_ARGUMENT", str(exc),
                                   self.addresses[0]))
            return
        verdicts = judge_all(batch.slices, rows, self.stages[-1].tokens)
        self._sink(BatchDone(BatchResult(batch.batch_id, verdicts), times, {}))

    def truncate_all(self, seqs: list[int], length: int = 0) -> None:
        for stage in self.stages:
            for seq in seqs or range(stage.config.n_seq_max):
                stage.truncate(seq, min(length, stage.length(seq)))

    def close(self) -> None:
        for stage in self.stages:
            stage.close()
