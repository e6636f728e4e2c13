"""One builder of the ring for every command: in-process stages, or workers run by
someone (local processes, Ray actors, the user's machines) planned, loaded and watched."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cluster.messages import LoadSpec
from cluster.model_info import KvType, inspect_model
from cluster.planning.plans import Plan
from cluster.rope import RopeParams
from cluster.stage_cut import StageSpec, even_split
from coordinator.metrics import Metrics
from coordinator.ring.contract import Ring
from coordinator.ring.local_ring import LocalRing
from coordinator.ring.supervisor import RingSupervisor, WorkerSet


@dataclass
class BuiltRing:
    ring: Ring
    supervisor: RingSupervisor | None = None  # None for in-process stages
    workers: WorkerSet | None = None

    @property
    def plan(self) -> Plan | None:
        return self.supervisor.plan if self.supervisor else None

    @property
    def n_stages(self) -> int:
        if self.supervisor is not None:
            return len(self.supervisor.specs)
        assert isinstance(self.ring, LocalRing)
        return len(self.ring.stages)

    def close(self) -> None:
        try:
            if self.supervisor is not None:
                self.supervisor.close()
            else:
                self.ring.close()
        finally:
            if self.workers is not None:
                self.workers.stop()


def build_ring(model: Path, *, workers: WorkerSet | None = None, stages: int = 1,
               model_ref: str | None = None, ctx: int = 4096, parallel: int = 1,
               threads: int = 1, kv: KvType = KvType.F16, split: list[StageSpec] | None = None,
               draft: Path | None = None, metrics: Metrics | None = None,
               progress: bool = False, rope: RopeParams | None = None) -> BuiltRing:
    """The ring, loaded: `workers` if given (planned unless `split` fixes the layers),
    else `stages` in-process stages (`split`, or an even split)."""
    if workers is None:
        layers = split or even_split(inspect_model(model).n_layer, stages)
        return BuiltRing(LocalRing.load(model, layers, n_ctx=ctx, n_seq_max=parallel,
                                        n_threads=threads, kv=kv, progress=progress,
                                        rope=rope))
    specs = [LoadSpec(model_ref or str(model), s.begin, s.end, n_ctx=ctx, n_seq_max=parallel,
                      type_k=kv.value, type_v=kv.value, flash_attn=kv is not KvType.F16,
                      n_threads=threads, rope=rope) for s in split] if split else None
    supervisor = RingSupervisor(workers, model, model_ref or str(model), ctx, parallel,
                                threads, metrics, draft, specs, rope=rope)
    try:
        ring = supervisor.start(progress)
    except BaseException:
        supervisor.close()
        raise
    return BuiltRing(ring, supervisor, workers)
