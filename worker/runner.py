"""A stage plus what the worker does with its output: pass hidden states on, or judge.

Runs in the worker's single compute thread; everything here is synchronous.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from pathlib import Path

import grpc
import llama_cpp
import numpy as np

from cluster.errors import InvalidForward, SpecshardError
from cluster.messages import Hop, LoadSpec, StepResult
from cluster.model_info import KvType
from cluster.stage_cut import cut_stage
from worker.judge import judge, logit_rows
from worker.stage import Stage, StageConfig


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("specshard")
    except PackageNotFoundError:
        ours = "dev"
    return {"specshard": ours, "llama_cpp_python": llama_cpp.__version__,
            "grpcio": grpc.__version__, "python": platform.python_version(),
            "protocol": "specshard.v1"}


def _kv(name: str) -> KvType:
    try:
        return KvType(name)
    except ValueError:
        raise SpecshardError(f"unknown KV type {name!r}: use f16 or q8_0") from None


class StageRunner:
    def __init__(self, stage: Stage) -> None:
        self.stage = stage

    @classmethod
    def open(cls, model: Path, spec: LoadSpec,
             on_bytes: Callable[[int, int], None] | None = None) -> StageRunner:
        if spec.n_ctx < 1 or spec.n_seq_max < 1:
            raise SpecshardError("a stage needs n_ctx ≥ 1 and n_seq_max ≥ 1")
        path = cut_stage(model, spec.begin, spec.end, on_bytes=on_bytes)
        stage = Stage(StageConfig(
            stage_path=path, model_path=model if spec.begin == 0 else None, n_ctx=spec.n_ctx,
            n_seq_max=spec.n_seq_max, type_k=_kv(spec.type_k), type_v=_kv(spec.type_v),
            flash_attn=spec.flash_attn, n_threads=spec.n_threads or 1))
        return cls(stage)

    def run(self, hop: Hop) -> Hop | StepResult | None:
        """Hidden states for downstream (a Hop), the verdict (last stage), or a cancel."""
        r, stage = hop.request, self.stage
        if hop.cancel:
            stage.truncate(r.seq, min(r.start, stage.length(r.seq)))
            return None if stage.is_last else hop
        rows = logit_rows(r) if stage.is_last else None
        if stage.is_first:
            if hop.hidden is not None:
                raise InvalidForward("the first stage takes token ids, not hidden states")
            out = stage.forward(r.seq, r.start, tokens=np.asarray(r.tokens), logit_rows=rows)
        else:
            if hop.hidden is None:
                raise InvalidForward("this stage takes hidden states, none were sent")
            out = stage.forward(r.seq, r.start, hidden=hop.hidden, logit_rows=rows)
        if stage.is_last:
            return judge(r, out)
        return Hop(r, hidden=out)

    def truncate(self, seqs: list[int], length: int) -> list[int]:
        targets = seqs or list(range(self.stage.config.n_seq_max))
        for seq in targets:
            self.stage.truncate(seq, min(length, self.stage.length(seq)))
        return [self.stage.length(seq) for seq in targets]

    def close(self) -> None:
        self.stage.close()
