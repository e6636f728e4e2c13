"""The `specshard` command line.

Subcommands are registered by the module of the role that runs them (a worker command
lives in `worker/`, a coordinator command in `coordinator/`); this module knows them by
name only, so `cluster/` imports nothing from the other two packages.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from cluster.errors import SpecshardError

COMMAND_MODULES = (
    "cluster.model_commands",
    "cluster.planning.cli",
    "worker.commands",
    "coordinator.commands.generate",
    "coordinator.commands.serve",
    "coordinator.commands.bench",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specshard",
        description="Pool the GPUs of several machines to serve one model, fast.")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-vv: llama.cpp's own)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        register = getattr(module, "register", None) or module.add_plan_parser
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Before llama.cpp's OpenMP runtime starts: co-located llama.cpp processes (workers,
    # the draft) starve each other when idle threads spin (ANCHORS.md: 14 → 20 tok/s).
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    parser = build_parser()
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.verbose < 2:
        logging.getLogger("cluster.llama.stage").setLevel(max(level, logging.WARNING))
    try:
        return int(args.handler(args) or 0)
    except SpecshardError as exc:
        print(f"specshard: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
