"""A stage plus what the worker does with its output: pass hidden states on, or judge.

Runs in the worker's single compute thread; everything here is synchronous. The wire
messages are built here too, so the event loop only moves finished messages.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import llama_cpp
import numpy as np

from cluster import trace
from cluster.errors import InvalidForward, SpecshardError
from cluster.gguf_file import read_header
from cluster.judge import judge_all
from cluster.llama.stage import Stage, StageConfig
from cluster.messages import Activations, BatchResult, LoadSpec, SeqResult, Slice
from cluster.model_info import KvType, model_info
from cluster.rope import RopeParams, resolve_rope
from cluster.stage_cut import StageSpec, cut_stage
from cluster.wire import worker_pb2 as pb
from cluster.wire_convert import batch_to_wire, max_logit_rows, result_to_wire


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


def _config(model: Path, spec: LoadSpec, stage_path: Path) -> StageConfig:
    # Every RoPE value explicit: the coordinator's, or the whole model's own (its header),
    # so that what the stage reports is what it computes with.
    rope = spec.rope or resolve_rope(read_header(model))
    return StageConfig(
        stage_path=stage_path, model_path=model if spec.begin == 0 else None,
        n_ctx=spec.n_ctx, n_seq_max=spec.n_seq_max, type_k=_kv(spec.type_k),
        type_v=_kv(spec.type_v), flash_attn=spec.flash_attn, n_threads=spec.n_threads or 1,
        rope=rope)


@dataclass(frozen=True)
class Outcome:
    """What a batch turned into: messages for the next worker, or the reply to publish."""

    downstream: list[pb.ForwardMessage]
    reply: pb.ForwardReply | None
    stage_ms: float


class StageRunner:
    def __init__(self, stage: Stage, wire_f16: bool = False) -> None:
        self.stage = stage
        self.wire_f16 = wire_f16  # halve the bytes downstream, at the cost of exactness
        # The last stage: per sequence, the run-ahead chain a verdict of its own broke.
        # The windows of that chain still coming are stale (docs/scheduler.md, "Early
        # cancellation"): skipped, not computed.
        self.broken: dict[int, int] = {}

    @staticmethod
    def check(model: Path, spec: LoadSpec) -> None:
        """Raise SpecshardError unless `spec` fits `model`; reads only the header."""
        if spec.n_ctx < 1 or spec.n_seq_max < 1:
            raise SpecshardError("a stage needs n_ctx ≥ 1 and n_seq_max ≥ 1")
        StageSpec(spec.begin, spec.end, model_info(read_header(model)).n_layer)
        _config(model, spec, model)  # the stage file is not cut yet: any path checks

    @classmethod
    def open(cls, model: Path, spec: LoadSpec,
             on_bytes: Callable[[int, int], None] | None = None) -> StageRunner:
        cls.check(model, spec)
        path = cut_stage(model, spec.begin, spec.end, on_bytes=on_bytes)
        return cls(Stage(_config(model, spec, path)), spec.wire_f16)

    @property
    def rope(self) -> RopeParams | None:
        """The RoPE values the stage computes with (GetNodeInfo reports them)."""
        return self.stage.config.rope

    @property
    def capture(self) -> str:
        return self.stage.capture.kind if self.stage.capture is not None else ""

    def run(self, acts: Activations, arrived: float | None = None) -> Outcome:
        """Compute a batch: hidden states for downstream, or the last stage's verdicts.
        `arrived` (perf_counter) is when its last byte came in, for the timing report."""
        batch, stage = acts.batch, self.stage
        if stage.is_last:
            asked = sum(len(s.judged_rows) for s in batch.slices if s.return_logits)
            if asked > max_logit_rows(stage.n_vocab):
                raise InvalidForward(f"{asked} rows of logits asked for; a reply holds at "
                                     f"most {max_logit_rows(stage.n_vocab)}")
        slices, hidden = batch.slices, acts.hidden
        stale = self._stale(slices) if stage.is_last else set()
        if stale:
            slices, hidden = _without(slices, hidden, stale, stage.n_embd)
        t0 = time.perf_counter()
        trace.mark("compute", batch.batch_id)
        # Judged below, before anything decodes again: the logits need no copy.
        out = stage.forward(slices, hidden, borrow=True) if slices else []
        trace.mark("computed", batch.batch_id)
        stage_ms = 1000 * (time.perf_counter() - t0)
        if not stage.is_last:
            assert not isinstance(out, list)
            busy_ms = 1000 * (time.perf_counter() - (arrived or t0))
            times = [*acts.times, (stage_ms, busy_ms)]
            return Outcome(batch_to_wire(Activations(batch, out, times), f16=self.wire_f16),
                           None, stage_ms)
        assert isinstance(out, list)
        judged = iter(judge_all(slices, out, stage.tokens))
        verdicts = []
        for i, piece in enumerate(batch.slices):
            if i in stale:
                verdicts.append(SeqResult(piece.seq, [], -1, [], skipped=True))
            elif piece.judge and piece.tokens:
                verdict = next(judged)
                verdicts.append(verdict)
                if piece.chain >= 0 and verdict.breaks_chain:
                    self.broken[piece.seq] = piece.chain
        trace.mark("judged", batch.batch_id)
        return Outcome([], result_to_wire(BatchResult(batch.batch_id, verdicts, acts.times),
                                          stage_ms), stage_ms)

    def _stale(self, slices: list[Slice]) -> set[int]:
        """Indexes of the judged windows of chains this stage's verdicts broke. A slice
        of any other chain (or none) ends what is known of its sequence's: chains are
        never reused, and a chain's windows arrive in the order they were sent."""
        stale = set()
        for i, s in enumerate(slices):
            if s.chain >= 0 and s.chain == self.broken.get(s.seq) and s.judge and \
                    s.tokens and s.copy_from < 0:
                stale.add(i)
                continue
            self.broken.pop(s.seq, None)
        return stale

    def forget_chains(self) -> None:
        """A new upstream (another engine, or the ring rebuilt): chains start over."""
        self.broken.clear()

    def truncate(self, seqs: list[int], length: int) -> list[int]:
        targets = seqs or list(range(self.stage.config.n_seq_max))
        for seq in targets:  # every one known before any is cut: a refusal changes nothing
            self.stage.length(seq)
        for seq in targets:
            self.broken.pop(seq, None)
        for seq in targets:
            self.stage.truncate(seq, min(length, self.stage.length(seq)))  # tokens too
        return [self.stage.length(seq) for seq in targets]

    def close(self) -> None:
        self.stage.close()


def _without(slices: list[Slice], hidden: np.ndarray | None, drop: set[int], n_embd: int
             ) -> tuple[list[Slice], np.ndarray | None]:
    """The batch without the slices at `drop`, and their rows of hidden states."""
    kept = [s for i, s in enumerate(slices) if i not in drop]
    if hidden is None:
        return kept, None
    rows = np.ascontiguousarray(hidden, dtype=np.float32).reshape(-1, n_embd)
    offsets = np.cumsum([0, *(len(s.tokens) for s in slices)])
    parts = [rows[offsets[i]:offsets[i + 1]] for i in range(len(slices)) if i not in drop]
    return kept, np.concatenate(parts) if parts else rows[:0]
