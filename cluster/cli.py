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

from cluster.errors import ClusterError, SpecshardError

COMMAND_MODULES = (
    "cluster.model_commands",
    "cluster.planning.cli",
    "worker.commands",
    "coordinator.commands.generate",
    "coordinator.commands.serve",
    "coordinator.commands.bench",
)


LEVELS = ("debug", "info", "warning", "error")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("specshard")
    except PackageNotFoundError:
        return "dev"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specshard",
        description="Pool the GPUs of several machines to serve one model, fast.")
    parser.add_argument("--version", action="version", version=f"specshard {_version()}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-v info, -vv debug, llama.cpp's own included); "
                             "accepted anywhere on the line")
    parser.add_argument("--log-level", choices=LEVELS,
                        help="logging level, accepted anywhere on the line (default: "
                             "warning, or SPECSHARD_LOG_LEVEL)")
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


def _hoist_logging(argv: list[str]) -> list[str]:
    """Move -v/--verbose/--log-level to the front, wherever they were given (before a
    bare `--`), so `specshard serve ... --log-level info` works as the top level."""
    front, rest = [], []
    it = iter(argv)
    for arg in it:
        if arg == "--":
            rest += [arg, *it]
            break
        if arg == "--log-level":
            front += [arg, next(it, "")]
        elif arg.startswith("--log-level=") or arg == "--verbose" or (
                arg.startswith("-v") and set(arg[1:]) == {"v"}):
            front.append(arg)
        else:
            rest.append(arg)
    return front + rest


def log_level(args: argparse.Namespace) -> int:
    if args.log_level:
        return int(getattr(logging, args.log_level.upper()))
    if args.verbose:
        return logging.INFO if args.verbose == 1 else logging.DEBUG
    env = os.environ.get("SPECSHARD_LOG_LEVEL", "").lower()
    if env and env not in LEVELS:
        raise SpecshardError(f"SPECSHARD_LOG_LEVEL must be one of {', '.join(LEVELS)}")
    return int(getattr(logging, (env or "warning").upper()))


def main(argv: list[str] | None = None) -> int:
    # Before llama.cpp's OpenMP runtime starts: co-located llama.cpp processes (workers,
    # the draft) starve each other when idle threads spin (docs/build.md, "Idle threads").
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    parser = build_parser()
    args = parser.parse_args(_hoist_logging(sys.argv[1:] if argv is None else argv))
    try:
        logging.basicConfig(level=log_level(args),
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
        return int(args.handler(args) or 0)
    except (SpecshardError, ClusterError) as exc:  # the input's, or the cluster's
        print(f"specshard: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
