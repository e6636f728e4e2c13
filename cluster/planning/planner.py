"""The memory planner: layer ranges, KV types and context per node (docs/planning.md).

Objective, in order: reach the requested context; put the draft on a GPU; keep f16 KV on
as many layers as fit; make the slowest stage (bytes read per token ÷ bandwidth) as fast
as possible. Nodes keep the order given: it is the ring order of the pipeline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import numpy as np

from cluster.errors import SpecshardError
from cluster.model_info import KvType, ModelInfo
from cluster.planning.memory import (
    ModelShape,
    StageMemory,
    model_shape,
    read_bytes_per_token,
    stage_memory,
)
from cluster.planning.plans import HOST, DraftPlan, NodeSpec, Plan, StagePlan, ctx_label, gib
from cluster.rope import RopeParams

DEFAULT_MARGIN = 1 << 30  # CUDA context + cuBLAS workspace + llama.cpp's pool: 0.3–0.6 GiB
CTX_STEP = 256  # llama.cpp pads contexts to 256 cells anyway


def _validate(shape: ModelShape, nodes: list[NodeSpec], ctx: int, parallel: int,
              margin_bytes: int) -> None:
    if not nodes:
        raise SpecshardError("give at least one node")
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        raise SpecshardError(f"node names must be unique, got {', '.join(names)}")
    for n in nodes:
        for what, value in (("memory", n.memory_bytes), ("free memory", n.free_bytes),
                            ("RAM", n.ram_bytes), ("bandwidth", n.bandwidth_gbs)):
            if value is not None and value <= 0:
                raise SpecshardError(f"node {n.name}: {what} must be positive, got {value}")
    if len(nodes) > shape.info.n_layer:
        raise SpecshardError(f"{len(nodes)} nodes for {shape.info.n_layer} layers: "
                             "every node needs at least one layer")
    if ctx < 1:
        raise SpecshardError(f"the context must be at least 1 token, got {ctx}")
    # Past the trained context (without RoPE scaling that covers it) llama.cpp runs but
    # the output degrades: `cluster.rope.context_warning` says so; it is not refused.
    if parallel < 1:
        raise SpecshardError(f"parallel sequences must be at least 1, got {parallel}")
    if margin_bytes < 0:
        raise SpecshardError(f"the margin must not be negative, got {margin_bytes}")


def _forced(nodes: list[NodeSpec], layers: dict[str, tuple[int, int]],
            n_layer: int) -> dict[int, tuple[int, int]]:
    """Layer ranges the user fixed, by node index; they must leave a contiguous split."""
    index = {n.name: i for i, n in enumerate(nodes)}
    for name in layers:
        if name not in index:
            raise SpecshardError(f"--layers names node '{name}', which is not among the "
                                 f"nodes ({', '.join(index)})")
    forced = {index[name]: r for name, r in layers.items()}
    bounds = [(-1, (0, 0)), *sorted(forced.items()), (len(nodes), (n_layer, n_layer))]
    for (i, (_, end)), (j, (begin, _)) in pairwise(bounds):
        between, gap = j - i - 1, begin - end
        if not (gap == between == 0 or gap >= between >= 1):
            raise SpecshardError("--layers: the ranges must follow the node order, tile "
                                 f"0:{n_layer} and leave every other node at least one layer")
    return forced


def _bandwidths(nodes: list[NodeSpec]) -> tuple[float, ...]:
    known = sorted(n.bandwidth_gbs for n in nodes if n.bandwidth_gbs is not None)
    default = known[len(known) // 2] if known else 1.0  # unknown: like the others
    return tuple(n.bandwidth_gbs or default for n in nodes)


Choice = tuple[int, int, KvType]  # layers [begin, end) and the KV type of one node
Placement = tuple[str, KvType]  # where the draft goes (a node's name, or HOST), its KV type


@dataclass(frozen=True)
class _Problem:
    """One search: each node's room (capacity − margin − draft) and every stage's bytes."""

    rooms: tuple[int, ...]
    memory: dict[KvType, dict[tuple[int, int], StageMemory]]
    bandwidths: tuple[float, ...]
    parallel: int
    forced: dict[int, tuple[int, int]]
    n_layer: int

    def ends(self, i: int, begin: int) -> range:
        """Where node i's layers may end when they begin at `begin`."""
        n, last = len(self.rooms), self.n_layer
        if i in self.forced:
            a, b = self.forced[i]
            return range(b, b + 1) if a == begin else range(0)
        if i == n - 1:
            return range(last, last + 1)
        return range(begin + 1, last - (n - 1 - i) + 1)


def _best(p: _Problem) -> tuple[list[Choice], float] | None:
    """Most f16 layers, then the fastest slowest stage: a DP over (node, boundary) keeping,
    per count of f16 layers so far, the least bottleneck time."""
    n, last = len(p.rooms), p.n_layer
    prev = np.full((last + 1, last + 1), np.inf)
    prev[0, 0] = 0.0
    kv_types = list(p.memory)
    back = []
    for i in range(n):
        cur = np.full_like(prev, np.inf)
        from_a = np.full(prev.shape, -1)
        from_kv = np.zeros(prev.shape, dtype=int)
        for a in map(int, np.flatnonzero(np.isfinite(prev).any(axis=1))):
            for k, kv in enumerate(kv_types):
                for b in p.ends(i, a):
                    memory = p.memory[kv][a, b]
                    if memory.total > p.rooms[i]:
                        break  # bytes only grow with b
                    f = b - a if kv is KvType.F16 else 0
                    t = read_bytes_per_token(memory, p.parallel) / p.bandwidths[i]
                    cand = np.maximum(prev[a, :last + 1 - f], t)
                    better = cand < cur[b, f:]
                    cur[b, f:][better] = cand[better]
                    from_a[b, f:][better] = a
                    from_kv[b, f:][better] = k
        back.append((from_a, from_kv))
        prev = cur
    reached = np.flatnonzero(np.isfinite(prev[last]))
    if not reached.size:
        return None
    f, b = int(reached.max()), last
    time = float(prev[last, f])
    choices: list[Choice] = []
    for from_a, from_kv in reversed(back):
        begin, kv = int(from_a[b, f]), kv_types[int(from_kv[b, f])]
        choices.append((begin, b, kv))
        f -= b - begin if kv is KvType.F16 else 0
        b = begin
    return choices[::-1], time


def _min_shortfall(p: _Problem) -> tuple[int, list[Choice]]:
    """The split whose worst node is least short of room (≤ 0: everything fits)."""
    kv = list(p.memory)[-1]
    prev: dict[int, tuple[int, list[Choice]]] = {0: (-(1 << 62), [])}
    for i in range(len(p.rooms)):
        cur: dict[int, tuple[int, list[Choice]]] = {}
        for a, (worst, path) in prev.items():
            for b in p.ends(i, a):
                short = max(worst, p.memory[kv][a, b].total - p.rooms[i])
                if b not in cur or short < cur[b][0]:
                    cur[b] = (short, [*path, (a, b, kv)])
        prev = cur
    return prev[p.n_layer]


def _largest(fits: Callable[[int], bool], limit: int) -> int:
    """The largest context ≤ limit that fits, in steps of CTX_STEP (0: none)."""
    if fits(limit):
        return limit
    lo, hi = 0, (limit - 1) // CTX_STEP  # in steps; lo fits (vacuously), hi + 1 does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid * CTX_STEP) else (lo, mid - 1)
    return lo * CTX_STEP


@dataclass
class _Request:
    shape: ModelShape
    draft: ModelShape | None
    nodes: list[NodeSpec]
    parallel: int
    margin: int
    flash_attn: bool
    forced: dict[int, tuple[int, int]]
    target_ctx: int  # what the target's RoPE covers: trained context × scaling
    _tables: dict[tuple[int, KvType], dict[tuple[int, int], StageMemory]] = field(
        default_factory=dict)

    @property
    def kv_types(self) -> tuple[KvType, ...]:
        # A quantized V cache needs flash attention (llama.cpp refuses it otherwise).
        return (KvType.F16, KvType.Q8_0) if self.flash_attn else (KvType.F16,)

    @property
    def ctx_limit(self) -> int:
        return min([self.target_ctx] + ([self.draft.info.n_ctx_train] if self.draft else []))

    def stage(self, a: int, b: int, kv: KvType, ctx: int) -> StageMemory:
        return stage_memory(self.shape, a, b, kv, ctx, self.parallel, self.flash_attn)

    def draft_memory(self, kv: KvType, ctx: int) -> StageMemory:
        assert self.draft is not None
        return stage_memory(self.draft, 0, self.draft.info.n_layer, kv, ctx, self.parallel,
                            self.flash_attn)

    def draft_bytes(self, node: NodeSpec, placement: Placement | None, ctx: int) -> int:
        if placement is None or placement[0] != node.name:
            return 0
        return self.draft_memory(placement[1], ctx).total

    def table(self, ctx: int, kv: KvType) -> dict[tuple[int, int], StageMemory]:
        if (ctx, kv) not in self._tables:
            n = self.shape.info.n_layer
            self._tables[ctx, kv] = {(a, b): self.stage(a, b, kv, ctx)
                                     for a in range(n) for b in range(a + 1, n + 1)}
        return self._tables[ctx, kv]

    def problem(self, ctx: int, placement: Placement | None, compact: bool = False,
                extra: NodeSpec | None = None) -> _Problem:
        nodes = self.nodes + ([extra] if extra else [])
        rooms = tuple(n.capacity_bytes - self.margin - self.draft_bytes(n, placement, ctx)
                      for n in nodes)
        kv_types = self.kv_types[-1:] if compact else self.kv_types
        return _Problem(rooms=rooms, memory={kv: self.table(ctx, kv) for kv in kv_types},
                        bandwidths=_bandwidths(nodes), parallel=self.parallel,
                        forced=self.forced, n_layer=self.shape.info.n_layer)

    def fits(self, ctx: int, placement: Placement | None, extra: NodeSpec | None = None
             ) -> bool:
        return _min_shortfall(self.problem(ctx, placement, True, extra))[0] <= 0

    def placements(self, ctx: int) -> list[Placement] | list[None]:
        if self.draft is None:
            return [None]
        coordinator = [n.name for n in self.nodes if n.coordinator]
        ram = next((n.ram_bytes for n in self.nodes if n.coordinator), None)
        on_gpu = [(name, kv) for name in coordinator or [n.name for n in self.nodes]
                  for kv in self.kv_types]
        return on_gpu + [(HOST, kv) for kv in self.kv_types
                         if ram is None or self.draft_memory(kv, ctx).total <= ram]


def _stages(req: _Request, ctx: int, placement: Placement | None,
            choices: list[Choice]) -> tuple[StagePlan, ...]:
    stages = []
    for node, (a, b, kv) in zip(req.nodes, choices, strict=True):
        memory = req.stage(a, b, kv, ctx)
        read = read_bytes_per_token(memory, req.parallel)
        bw = node.bandwidth_gbs
        stages.append(StagePlan(
            name=node.name, begin=a, end=b, type_k=kv, type_v=kv,
            flash_attn=req.flash_attn, weights_bytes=memory.weights, kv_bytes=memory.kv,
            compute_bytes=memory.compute, draft_bytes=req.draft_bytes(node, placement, ctx),
            capacity_bytes=node.capacity_bytes,
            max_ctx=_node_max_ctx(req, node, (a, b, kv), placement),
            read_bytes=read, token_ms=read / bw / 1e6 if bw else None))
    return tuple(stages)


def _node_max_ctx(req: _Request, node: NodeSpec, choice: Choice,
                  placement: Placement | None) -> int:
    a, b, kv = choice

    def fits(ctx: int) -> bool:
        return req.stage(a, b, kv, ctx).total + req.draft_bytes(node, placement, ctx) \
            <= node.capacity_bytes - req.margin

    return _largest(fits, req.ctx_limit)


def _extra_node(req: _Request, ctx: int) -> int | None:
    """The least memory a node appended to the ring needs to make the plan fit."""
    if len(req.nodes) >= req.shape.info.n_layer:
        return None
    step = 1 << 28

    def fits(k: int) -> bool:
        return req.fits(ctx, None, NodeSpec("extra", k * step + req.margin))

    lo, hi = 0, -(-req.shape.info.total_bytes // step) + 8
    if not fits(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
    return hi * step + req.margin


def _shortfall_reason(req: _Request, ctx: int, stages: tuple[StagePlan, ...],
                      max_ctx: int) -> str:
    shorts = {s.name: s.total_bytes - s.capacity_bytes + req.margin for s in stages
              if s.total_bytes > s.capacity_bytes - req.margin}
    who = " and ".join(f"node {name} is {gib(short)} short" for name, short in shorts.items())
    if len(shorts) > 2:
        who = (f"{len(shorts)} nodes are {gib(min(shorts.values()))[:-4]} to "
               f"{gib(max(shorts.values()))} short")
    reason = f"{who} at {ctx_label(ctx)} with {stages[0].type_k.value} KV"
    if max_ctx:
        reason += f"; fits at {ctx_label(max_ctx)}"
    else:
        weights = sum(s.weights_bytes for s in stages)
        rooms = sum(n.capacity_bytes - req.margin for n in req.nodes)
        reason += (f"; no context fits: the weights alone need {gib(weights)}, the nodes "
                   f"have {gib(rooms)} after the margin")
    extra = _extra_node(req, ctx)
    if extra is not None:
        reason += f"{', or' if max_ctx else ';'} add a node with at least {gib(extra)}"
    return reason


def _infeasible(req: _Request, ctx: int) -> Plan:
    """The split that misses by least, and what would make it fit."""
    short, choices = _min_shortfall(req.problem(ctx, None, compact=True))
    stages = _stages(req, ctx, None, choices)
    max_ctx = _largest(lambda c: req.fits(c, None), ctx)
    if short <= 0:  # the target fits: the draft is what fits nowhere
        kv = choices[0][2]
        reason = (f"the draft needs {gib(req.draft_memory(kv, ctx).total)} at "
                  f"{ctx_label(ctx)} with {kv.value} KV and fits on no node nor in the "
                  "coordinator's RAM")
    else:
        reason = _shortfall_reason(req, ctx, stages, max_ctx)
    return Plan(feasible=False, reason=reason, ctx=ctx, parallel=req.parallel,
                margin_bytes=req.margin, n_layer=req.shape.info.n_layer, max_ctx=max_ctx,
                stages=stages, draft=None)


def _rank(req: _Request, ctx: int, placement: Placement | None, choices: list[Choice],
          time: float) -> tuple[bool, int, bool, float, int]:
    """Draft on a GPU, f16 layers, f16 draft KV, fastest bottleneck, room left by the draft."""
    f16 = sum(b - a for a, b, kv in choices if kv is KvType.F16)
    if placement is None or placement[0] == HOST:
        return (False, f16, placement is not None and placement[1] is KvType.F16, -time, 0)
    index = [n.name for n in req.nodes].index(placement[0])
    a, b, kv = choices[index]
    room = req.nodes[index].capacity_bytes - req.stage(a, b, kv, ctx).total \
        - req.draft_bytes(req.nodes[index], placement, ctx)
    return (True, f16, placement[1] is KvType.F16, -time, room)


def _shape(model: ModelInfo | Path | str) -> ModelShape:
    return model_shape(model if isinstance(model, ModelInfo) else Path(model))


def plan(target: ModelInfo | Path | str, nodes: list[NodeSpec], ctx: int, parallel: int = 1,
         draft: ModelInfo | Path | str | None = None, margin_bytes: int = DEFAULT_MARGIN,
         layers: dict[str, tuple[int, int]] | None = None, flash_attn: bool = True,
         rope: RopeParams | None = None) -> Plan:
    """Place `target` (and `draft`) on `nodes` for `parallel` sequences of `ctx` tokens;
    `layers` forces some nodes' ranges, by node name; `rope`: the target's RoPE values
    (scaling raises the largest context the plan reports)."""
    shape = _shape(target)
    draft_shape = None if draft is None else _shape(draft)
    _validate(shape, nodes, ctx, parallel, margin_bytes)
    if draft_shape is not None and ctx > draft_shape.info.n_ctx_train:
        raise SpecshardError(f"context {ctx} is beyond the {draft_shape.info.n_ctx_train} "
                             f"tokens the draft {draft_shape.info.name} was trained for")
    covered = rope.max_ctx(shape.info.n_ctx_train) if rope else shape.info.n_ctx_train
    req = _Request(shape, draft_shape, list(nodes), parallel, margin_bytes, flash_attn,
                   _forced(nodes, layers or {}, shape.info.n_layer), max(covered, ctx))
    found = []
    for placement in req.placements(ctx):
        best = _best(req.problem(ctx, placement))
        if best is not None:
            found.append((_rank(req, ctx, placement, *best), placement, best[0]))
    if not found:
        return _infeasible(req, ctx)
    _, placement, choices = max(found, key=lambda item: item[0])
    draft_plan = None if placement is None else DraftPlan(
        placement[0], placement[1], req.draft_memory(placement[1], ctx))
    return Plan(feasible=True, reason=None, ctx=ctx, parallel=parallel,
                margin_bytes=margin_bytes, n_layer=shape.info.n_layer,
                max_ctx=_largest(lambda c: req.fits(c, placement), req.ctx_limit),
                stages=_stages(req, ctx, placement, choices), draft=draft_plan)
