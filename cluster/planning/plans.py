"""What a plan says: the nodes it was made for, each node's share, the draft's place.

The planner (cluster/planning/planner.py) makes these; the CLI, the placement and the
ring read them.
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.model_info import KvType
from cluster.planning.memory import StageMemory

GIB = 1 << 30
HOST = "host"  # the draft in the coordinator's RAM, run on its CPU


@dataclass(frozen=True)
class NodeSpec:
    name: str
    memory_bytes: int
    free_bytes: int | None = None
    ram_bytes: int | None = None
    bandwidth_gbs: float | None = None
    coordinator: bool = False

    @property
    def capacity_bytes(self) -> int:
        return self.memory_bytes if self.free_bytes is None else self.free_bytes


@dataclass(frozen=True)
class DraftPlan:
    node: str  # a node's name, or HOST
    kv: KvType
    memory: StageMemory


@dataclass(frozen=True)
class StagePlan:
    """One node's share: layers [begin, end) and what it holds on its device."""

    name: str
    begin: int
    end: int
    type_k: KvType
    type_v: KvType
    flash_attn: bool
    weights_bytes: int
    kv_bytes: int
    compute_bytes: int
    draft_bytes: int
    capacity_bytes: int
    max_ctx: int  # the largest context this node's share allows
    read_bytes: int  # per generated token at full context
    token_ms: float | None  # read_bytes ÷ bandwidth, when the bandwidth is known

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.compute_bytes + self.draft_bytes

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name, "layers": [self.begin, self.end],
            "type_k": self.type_k.value, "type_v": self.type_v.value,
            "flash_attn": self.flash_attn, "weights_bytes": self.weights_bytes,
            "kv_bytes": self.kv_bytes, "compute_bytes": self.compute_bytes,
            "draft_bytes": self.draft_bytes, "total_bytes": self.total_bytes,
            "capacity_bytes": self.capacity_bytes, "max_ctx": self.max_ctx,
            "read_bytes": self.read_bytes, "token_ms": self.token_ms,
        }


@dataclass(frozen=True)
class Plan:
    feasible: bool
    reason: str | None
    ctx: int
    parallel: int
    margin_bytes: int
    n_layer: int
    max_ctx: int  # the largest context these nodes reach (q8_0 KV where needed)
    stages: tuple[StagePlan, ...]
    draft: DraftPlan | None

    @property
    def f16_layers(self) -> int:
        return sum(s.end - s.begin for s in self.stages if s.type_k is KvType.F16)

    def to_json(self) -> dict[str, object]:
        draft = None if self.draft is None else {
            "node": self.draft.node, "type_k": self.draft.kv.value,
            "type_v": self.draft.kv.value, "weights_bytes": self.draft.memory.weights,
            "kv_bytes": self.draft.memory.kv, "compute_bytes": self.draft.memory.compute,
            "total_bytes": self.draft.memory.total}
        return {
            "feasible": self.feasible, "ctx": self.ctx, "reason": self.reason,
            "nodes": [s.to_json() for s in self.stages], "parallel": self.parallel,
            "margin_bytes": self.margin_bytes, "max_ctx": self.max_ctx,
            "f16_layers": self.f16_layers, "draft": draft,
        }


def gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def ctx_label(ctx: int) -> str:
    return f"{ctx // 1024}k" if ctx % 1024 == 0 else str(ctx)
