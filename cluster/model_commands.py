"""`specshard models fetch`, `specshard inspect`, `specshard stage cut`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cluster import models
from cluster.model_info import KvType, inspect_model, parse_layers
from cluster.stage_cut import cut_stage

GIB = 1 << 30
MIB = 1 << 20


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    fetch = sub.add_parser("models", help="the demo model pair").add_subparsers(
        dest="models_command", required=True, metavar="ACTION")
    p = fetch.add_parser("fetch", help="download, assemble and verify the demo pair")
    p.add_argument("--json", action="store_true", help="print the paths as JSON")
    p.set_defaults(handler=fetch_models)

    p = sub.add_parser("inspect", help="shape and bytes of a GGUF model (header only)")
    p.add_argument("model", help="GGUF file, or 'demo'")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=inspect)

    stage = sub.add_parser("stage", help="pipeline stage files").add_subparsers(
        dest="stage_command", required=True, metavar="ACTION")
    p = stage.add_parser("cut", help="write the stage GGUF for a layer range")
    p.add_argument("model", help="GGUF file, or 'demo'")
    p.add_argument("--layers", required=True, metavar="A:B", help="layers A..B-1")
    p.add_argument("--out", type=Path, help="output path (default: the stage cache)")
    p.set_defaults(handler=cut)


def fetch_models(args: argparse.Namespace) -> int:
    progress = sys.stderr.isatty()
    paths = {role: str(models.fetch(model, progress=progress))
             for role, model in models.DEMO.items()}
    if args.json:
        print(json.dumps(paths))
    else:
        for role, path in paths.items():
            print(f"{role:7s} {path}")
    return 0


def inspect(args: argparse.Namespace) -> int:
    info = inspect_model(models.resolve(args.model))
    layers = info.layer_bytes
    kv = {t.value: info.kv_bytes_per_token(t) for t in KvType}
    if args.json:
        print(json.dumps({
            "path": str(info.path), "name": info.name, "arch": info.arch,
            "n_layer": info.n_layer, "n_embd": info.n_embd, "n_head": info.n_head,
            "n_head_kv": info.n_head_kv, "head_dim": info.head_dim,
            "n_vocab": info.n_vocab, "n_ctx_train": info.n_ctx_train,
            "layer_bytes": list(layers), "layer_bytes_min": min(layers),
            "layer_bytes_max": max(layers), "layer_bytes_total": sum(layers),
            "token_embd_bytes": info.token_embd_bytes, "output_bytes": info.output_bytes,
            "tied_output": info.tied_output, "total_bytes": info.total_bytes,
            "kv_bytes_per_token": kv,
        }))
        return 0
    print(f"{info.name}  ({info.path})")
    print(f"  architecture   {info.arch}")
    print(f"  layers         {info.n_layer}")
    print(f"  n_embd         {info.n_embd}")
    print(f"  heads / KV     {info.n_head} / {info.n_head_kv} (head_dim {info.head_dim})")
    print(f"  vocabulary     {info.n_vocab}")
    print(f"  trained ctx    {info.n_ctx_train}")
    print(f"  token_embd     {info.token_embd_bytes / MIB:10.1f} MiB")
    if info.tied_output:
        print("  output         tied to token_embd")
    else:
        print(f"  output         {info.output_bytes / MIB:10.1f} MiB")
    print(f"  layers total   {sum(layers) / MIB:10.1f} MiB  (min {min(layers) / MIB:.1f}, "
          f"max {max(layers) / MIB:.1f} MiB per layer)")
    print(f"  model total    {info.total_bytes / GIB:10.2f} GiB")
    for t, per_token in kv.items():
        print(f"  KV {t:5s}       {per_token / 1024:10.1f} KiB/token "
              f"({per_token * 16384 / GIB:.2f} GiB at 16k)")
    print("  per layer (MiB):")
    for start in range(0, len(layers), 8):
        row = "  ".join(f"{i:3d}:{layers[i] / MIB:6.1f}"
                        for i in range(start, min(start + 8, len(layers))))
        print(f"    {row}")
    return 0


def cut(args: argparse.Namespace) -> int:
    model = models.resolve(args.model)
    info = inspect_model(model)
    begin, end = parse_layers(args.layers, info.n_layer)
    print(cut_stage(model, begin, end, out=args.out, progress=sys.stderr.isatty()))
    return 0
