"""All stages in this process: the reference the distributed pipeline must match."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from cluster.messages import StepRequest, StepResult
from cluster.model_info import KvType
from cluster.stage_cut import StageSpec, cut_stage
from worker.judge import judge, logit_rows
from worker.stage import Stage, StageConfig


class LocalPipeline:
    """Stages run one after the other in one process, hidden states passed in memory."""

    def __init__(self, stages: list[Stage]) -> None:
        self.stages = stages
        self._lock = threading.Lock()  # one llama.cpp call at a time, whoever calls

    @classmethod
    def load(cls, model: Path, specs: list[StageSpec], n_ctx: int = 4096,
             n_seq_max: int = 1, n_threads: int = 2, kv: KvType = KvType.F16,
             progress: bool = False) -> LocalPipeline:
        stages = []
        for spec in specs:
            path = cut_stage(model, spec.begin, spec.end, progress=progress)
            stages.append(Stage(StageConfig(
                stage_path=path, model_path=model if spec.is_first else None, n_ctx=n_ctx,
                n_seq_max=n_seq_max, n_threads=n_threads, type_k=kv, type_v=kv,
                flash_attn=kv is not KvType.F16)))
        return cls(stages)

    @property
    def n_ctx(self) -> int:
        return min(s.n_ctx_seq for s in self.stages)

    def logits(self, request: StepRequest) -> np.ndarray:
        hidden = np.asarray(request.tokens)
        rows = logit_rows(request)
        for i, stage in enumerate(self.stages):
            if i == 0:
                hidden = stage.forward(request.seq, request.start, tokens=hidden,
                                       logit_rows=rows)
            else:
                hidden = stage.forward(request.seq, request.start, hidden=hidden,
                                       logit_rows=rows)
        return hidden

    def step(self, request: StepRequest) -> StepResult:
        with self._lock:
            return judge(request, self.logits(request))

    def reset(self, seq: int) -> None:
        with self._lock:
            for stage in self.stages:
                stage.truncate(seq, 0)

    def close(self) -> None:
        for stage in self.stages:
            stage.close()
