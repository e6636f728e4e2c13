"""Speculative decoding on the demo pair: tokens per target step, acceptance, tok/s.

    python bench/spec.py [--inprocess] [--tokens 128] [--gammas 4 8] [--profile 2x4070]

Greedy, fixed code prompts, 2 local gRPC workers by default. The measuring lives in
`coordinator/commands/spec_bench.py` (also `specshard bench spec`). Prints JSON (also written to
bench/results/spec.json).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Before llama.cpp's OpenMP runtime starts, as `specshard` does (cluster/cli.py).
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import report  # noqa: E402
from cluster.errors import SpecshardError  # noqa: E402
from coordinator.commands.spec_bench import add_arguments, config_from_args, run_bench  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args()
    try:
        result = run_bench(config_from_args(args))
    except SpecshardError as exc:
        sys.exit(f"bench/spec.py: {exc}")
    report("spec", result.as_dict())


if __name__ == "__main__":
    main()
