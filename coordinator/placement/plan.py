"""From running workers to loaded stages: ask them what they have, plan, load."""

from __future__ import annotations

from pathlib import Path

from cluster.errors import SpecshardError
from cluster.messages import LoadSpec, NodeInfo
from cluster.planning.inventory import CPU_MARGIN_BYTES, has_gpus, node_specs
from cluster.planning.planner import DEFAULT_MARGIN, plan
from cluster.planning.plans import Plan
from cluster.rope import RopeParams, check_same_rope


def plan_ring(model: Path, addresses: list[str], infos: list[NodeInfo], ctx: int,
              parallel: int = 1, draft: Path | None = None,
              rope: RopeParams | None = None) -> Plan:
    """The planner's split for these workers, in ring order; refuses what cannot fit."""
    gpus = has_gpus(infos)
    result = plan(model, node_specs(addresses, infos), ctx, parallel,
                  draft=draft if gpus else None,  # without GPUs the draft stays in RAM
                  margin_bytes=DEFAULT_MARGIN if gpus else CPU_MARGIN_BYTES,
                  flash_attn=gpus,  # on a CPU it saves little and changes the arithmetic
                  rope=rope)
    if not result.feasible:
        raise SpecshardError(result.reason or "the model does not fit on these workers")
    return result


def load_specs(ring_plan: Plan, model_ref: str, n_threads: int,
               rope: RopeParams | None = None) -> list[LoadSpec]:
    """`rope`: the values every stage computes with (`cluster.rope.resolve_rope`)."""
    return [LoadSpec(model_ref, s.begin, s.end, n_ctx=ring_plan.ctx,
                     n_seq_max=ring_plan.parallel, type_k=s.type_k.value,
                     type_v=s.type_v.value, flash_attn=s.flash_attn, n_threads=n_threads,
                     rope=rope)
            for s in ring_plan.stages]


def check_loaded(specs: list[LoadSpec], infos: list[NodeInfo], addresses: list[str]) -> None:
    """After LoadStage: refuse a ring whose workers report another stage or other RoPE
    values than they were sent (a stage that computes positions otherwise would hand the
    next one hidden states it reads wrongly: garbage, not an error)."""
    for spec, info, address in zip(specs, infos, addresses, strict=True):
        got = info.stage
        if got is None or (got.begin, got.end) != (spec.begin, spec.end):
            raise SpecshardError(f"worker {address} did not load layers "
                                 f"{spec.begin}:{spec.end}")
        if spec.rope is not None:
            check_same_rope(spec.rope, got.rope, f"worker {address}")
