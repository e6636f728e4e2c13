"""`specshard bench …`: measurements a user can run on their own cluster."""

from __future__ import annotations

import argparse
import json

from coordinator.commands.spec_bench import add_arguments, config_from_args, run_bench


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    benches = sub.add_parser("bench", help="measure what the cluster does").add_subparsers(
        dest="bench", required=True, metavar="BENCH")
    spec = benches.add_parser(
        "spec", help="speculative decoding: tokens per step, acceptance, tok/s, projection")
    add_arguments(spec)
    spec.add_argument("--json", action="store_true", help="print the result as JSON")
    spec.set_defaults(handler=run_spec)


def run_spec(args: argparse.Namespace) -> int:
    result = run_bench(config_from_args(args))
    print(json.dumps(result.as_dict(), indent=2) if args.json else result.table())
    return 0
