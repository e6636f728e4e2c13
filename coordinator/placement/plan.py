"""From running workers to loaded stages: ask them what they have, plan, load."""

from __future__ import annotations

from pathlib import Path

from cluster.errors import SpecshardError
from cluster.messages import LoadSpec, NodeInfo
from cluster.planning.inventory import CPU_MARGIN_BYTES, has_gpus, node_specs
from cluster.planning.planner import DEFAULT_MARGIN, plan
from cluster.planning.plans import Plan


def plan_ring(model: Path, addresses: list[str], infos: list[NodeInfo], ctx: int,
              parallel: int = 1, draft: Path | None = None) -> Plan:
    """The planner's split for these workers, in ring order; refuses what cannot fit."""
    gpus = has_gpus(infos)
    result = plan(model, node_specs(addresses, infos), ctx, parallel,
                  draft=draft if gpus else None,  # without GPUs the draft stays in RAM
                  margin_bytes=DEFAULT_MARGIN if gpus else CPU_MARGIN_BYTES,
                  flash_attn=gpus)  # on a CPU it saves little and changes the arithmetic
    if not result.feasible:
        raise SpecshardError(result.reason or "the model does not fit on these workers")
    return result


def load_specs(ring_plan: Plan, model_ref: str, n_threads: int) -> list[LoadSpec]:
    return [LoadSpec(model_ref, s.begin, s.end, n_ctx=ring_plan.ctx,
                     n_seq_max=ring_plan.parallel, type_k=s.type_k.value,
                     type_v=s.type_v.value, flash_attn=s.flash_attn, n_threads=n_threads)
            for s in ring_plan.stages]
