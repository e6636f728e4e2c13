"""`specshard plan`: will the model fit on these nodes, and how (docs/planning.md)."""

from __future__ import annotations

import argparse
import json
import re
import sys

from cluster import models
from cluster.auth import read_token
from cluster.errors import SpecshardError
from cluster.gguf_file import read_header
from cluster.model_info import KvType, inspect_model, parse_layers
from cluster.planning.inventory import node_specs, query_node
from cluster.planning.planner import DEFAULT_MARGIN, plan
from cluster.planning.plans import GIB, HOST, NodeSpec, Plan, StagePlan
from cluster.rope import add_rope_arguments, context_warning, resolve_rope, rope_flags

_SIZE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(?:([KMGT])(i?)(B?)|B)?\s*$", re.IGNORECASE)
_NAME = re.compile(r"^[A-Za-z0-9_.:-]+$")  # ":" for names like pc1:gpu0 (one per GPU)
_NODE_HELP = "NAME=MEM[,bw=GB/s][,ram=MEM][,free=MEM][,coordinator]"


def add_plan_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("plan", help="place a model's layers and KV cache on nodes")
    p.add_argument("--model", required=True, help="target GGUF file, or 'demo'")
    p.add_argument("--draft", help="draft GGUF file, or 'demo'")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--node", action="append", metavar=_NODE_HELP,
                       help="a node by hand; MEM like 12GiB, 12G or 8000MiB (repeat)")
    where.add_argument("--worker", action="append", metavar="HOST:PORT",
                       help="ask a running worker for its memory (repeat)")
    p.add_argument("--token-file", help="file with the workers' token (with --worker)")
    p.add_argument("--ctx", type=int, required=True, help="tokens of context per sequence")
    p.add_argument("--parallel", type=int, default=1, help="sequences decoded at once")
    p.add_argument("--margin", default=f"{DEFAULT_MARGIN / GIB:g}GiB",
                   help="memory left free on every node (default: %(default)s)")
    p.add_argument("--layers", action="append", metavar="NAME=A:B",
                   help="force node NAME to hold layers A..B-1 (repeat)")
    p.add_argument("--no-flash-attn", action="store_true",
                   help="plan without flash attention (f16 KV only)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    add_rope_arguments(p)
    p.set_defaults(handler=run_plan)


def parse_size(text: str, what: str) -> int:
    """`12GiB`, `12G` (binary), `12GB` (decimal), `8000MiB`, `512` (bytes)."""
    match = _SIZE.match(text)
    if not match:
        raise SpecshardError(f"{what} '{text}' is not a size like 12GiB, 12G or 8000MiB")
    number, prefix, binary, byte = match.groups(default="")
    power = "KMGT".find(prefix.upper()) + 1 if prefix else 0
    base = 1000 if prefix and byte and not binary else 1024
    return int(float(number) * base ** power)


def parse_node(text: str) -> NodeSpec:
    name, _, rest = text.partition("=")
    if not _NAME.match(name) or not rest:
        raise SpecshardError(f"--node '{text}' is not of the form {_NODE_HELP}")
    memory, *options = rest.split(",")
    fields: dict[str, object] = {"memory_bytes": parse_size(memory, f"node {name}: memory")}
    for option in options:
        key, _, value = option.partition("=")
        if key == "coordinator" and not value:
            fields["coordinator"] = True
        elif key in ("ram", "free") and value:
            fields[f"{key}_bytes"] = parse_size(value, f"node {name}: {key}")
        elif key == "bw" and value:
            try:
                fields["bandwidth_gbs"] = float(value)
            except ValueError:
                raise SpecshardError(f"node {name}: bw '{value}' is not a number of GB/s")\
                    from None
        else:
            raise SpecshardError(f"--node '{text}': unknown option '{option}' (expected "
                                 "bw=GB/s, ram=MEM, free=MEM or coordinator)")
    return NodeSpec(name, **fields)  # type: ignore[arg-type]


def parse_overrides(texts: list[str], n_layer: int) -> dict[str, tuple[int, int]]:
    layers: dict[str, tuple[int, int]] = {}
    for text in texts:
        name, _, span = text.partition("=")
        if not name or not span:
            raise SpecshardError(f"--layers '{text}' is not of the form NAME=A:B")
        if name in layers:
            raise SpecshardError(f"--layers gives node '{name}' twice")
        layers[name] = parse_layers(span, n_layer)
    return layers


def nodes_from_workers(addresses: list[str], token_file: str | None) -> list[NodeSpec]:
    """Each worker's device memory (or RAM share, without a GPU), asked over gRPC."""
    token = read_token(token_file) if token_file else None
    return node_specs(addresses, [query_node(a, token) for a in addresses])


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def _spans(stages: tuple[StagePlan, ...], kv: KvType) -> str:
    """Layers of the stages with this KV type, adjacent ranges merged: `0:23, 46:64`."""
    spans: list[list[int]] = []
    for s in stages:
        if s.type_k is kv:
            if spans and spans[-1][1] == s.begin:
                spans[-1][1] = s.end
            else:
                spans.append([s.begin, s.end])
    return ", ".join(f"{a}:{b}" for a, b in spans)


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                      for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()
            for row in rows]


def render(result: Plan, model: str, draft: str | None) -> str:
    head = ["node", "layers", "KV", "weights", "KV cache", "compute", "draft", "total",
            "capacity", "free", "max ctx", "ms/token"]
    rows = [head] + [[
        s.name, f"{s.begin}:{s.end}", s.type_k.value + (" FA" if s.flash_attn else ""),
        _gib(s.weights_bytes), _gib(s.kv_bytes), _gib(s.compute_bytes), _gib(s.draft_bytes),
        _gib(s.total_bytes), _gib(s.capacity_bytes),
        _gib(s.capacity_bytes - result.margin_bytes - s.total_bytes), str(s.max_ctx),
        "-" if s.token_ms is None else f"{s.token_ms:.1f}",
    ] for s in result.stages]
    lines = [f"{model}: {result.n_layer} layers, {result.ctx} tokens x {result.parallel} "
             f"sequence(s), margin {_gib(result.margin_bytes)} GiB per node (sizes in GiB)",
             "", *_table(rows), ""]
    for kv in KvType:
        n = sum(s.end - s.begin for s in result.stages if s.type_k is kv)
        if n:
            lines.append(f"{kv.value:5s} KV on {n} of {result.n_layer} layers: "
                         f"{_spans(result.stages, kv)}")
    if result.draft is not None and draft is not None:
        d = result.draft
        where = "the coordinator's CPU (host RAM)" if d.node == HOST else f"node {d.node}"
        lines.append(f"draft {draft} on {where}: {d.kv.value} KV, weights "
                     f"{_gib(d.memory.weights)}, KV {_gib(d.memory.kv)}, compute "
                     f"{_gib(d.memory.compute)} GiB")
    verdict = "fits" if result.feasible else "does NOT fit"
    placed = " with this draft placement" if result.draft else ""
    lines.append(f"{verdict} at {result.ctx} tokens; up to {result.max_ctx}{placed} "
                 "and q8_0 KV where needed")
    return "\n".join(lines)


def run_plan(args: argparse.Namespace) -> int:
    nodes = nodes_from_workers(args.worker, args.token_file) if args.worker \
        else [parse_node(text) for text in args.node]
    target_path = models.resolve(args.model, "target")
    target = inspect_model(target_path)
    draft = inspect_model(models.resolve(args.draft, "draft")) if args.draft else None
    rope = resolve_rope(read_header(target_path), rope_flags(args))
    warning = context_warning(args.ctx, target.n_ctx_train, rope)
    if warning:
        print(f"specshard: warning: {warning}", file=sys.stderr)
    result = plan(target, nodes, args.ctx, args.parallel, draft,
                  parse_size(args.margin, "--margin"),
                  parse_overrides(args.layers or [], target.n_layer),
                  flash_attn=not args.no_flash_attn, rope=rope)
    if args.json:
        print(json.dumps({**result.to_json(), "rope": rope.as_dict()}))
    else:
        print(render(result, target.name, draft.name if draft else None))
        print(rope.describe())
    if not result.feasible:
        raise SpecshardError(str(result.reason))
    return 0
