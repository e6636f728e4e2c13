"""`specshard generate`: one completion, through the same engine `serve` runs."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from contextlib import ExitStack
from pathlib import Path

from cluster import models
from cluster.auth import read_token, tls_from_args
from cluster.errors import SpecshardError
from cluster.model_info import KvType
from cluster.sampling import SamplingParams
from coordinator.engine.frontend import Generation
from coordinator.engine.request import GenerationRequest
from coordinator.placement.local import LocalWorkers
from coordinator.ring.builder import BuiltRing, build_ring
from coordinator.ring.supervisor import StaticWorkers, WorkerSet
from coordinator.service import (
    EngineOptions,
    check_threads,
    gamma_config,
    open_drafter,
    start_engine,
)
from coordinator.speculation.gamma import FREE_DRAFT, SPEC_DEPTH_HELP
from coordinator.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("generate", help="generate a completion with a staged model")
    p.add_argument("--model", default="demo", help="target GGUF, or 'demo' (default)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--raw", action="store_true", help="send the prompt as is, no chat template")
    p.add_argument("--stages", type=int, default=1, help="in-process stages (default 1)")
    p.add_argument("--workers", type=int, default=0,
                   help="start N gRPC worker processes on loopback, one stage each")
    p.add_argument("--worker", action="append", default=[], metavar="HOST:PORT",
                   help="use a running worker (repeat, in ring order)")
    p.add_argument("--token-file", help="cluster token for --worker")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--tls-ca")
    p.add_argument("--pin", action="store_true",
                   help="each local worker on its own CPU core (one box per worker)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ctx", type=int, default=4096, help="context per sequence")
    p.add_argument("--kv", choices=[t.value for t in KvType], default=KvType.F16.value)
    p.add_argument("--threads", type=int, default=None,
                   help="llama.cpp threads per stage (default: all cores; 1 with --pin)")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per chunk")
    add_draft_arguments(p)
    p.add_argument("--json", action="store_true", help="print tokens, text and stats as JSON")
    p.set_defaults(handler=run_generate)


def add_draft_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--draft", help="draft GGUF for speculative decoding, or 'demo'")
    p.add_argument("--draft-mode", choices=["model", "ngram", "none"],
                   help="model (default with --draft), ngram (prompt lookup: no draft "
                        "model, good for edits of given text) or none")
    p.add_argument("--gamma", type=int, help="a fixed draft length (default: adaptive)")
    p.add_argument("--gamma-max", type=int, default=16, help="adaptive γ's upper bound")
    p.add_argument("--spec-depth", type=int, help=SPEC_DEPTH_HELP)


def sampling_from(args: argparse.Namespace) -> SamplingParams:
    """The sampling flags; SamplingParams refuses values out of range."""
    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          seed=args.seed)


def prompt_tokens(tokenizer: Tokenizer, prompt: str, raw: bool) -> list[int]:
    text = prompt if raw else tokenizer.chat_prompt([{"role": "user", "content": prompt}])
    return tokenizer.encode(text)


def threads(args: argparse.Namespace) -> int:
    if args.threads is not None:
        return check_threads(int(args.threads))
    return 1 if args.pin else os.cpu_count() or 1


def open_ring(args: argparse.Namespace, model: Path, stack: ExitStack) -> BuiltRing:
    """In-process stages, local worker processes, or running workers, as asked."""
    if args.workers and args.worker:
        raise SpecshardError("give --workers N or --worker HOST:PORT, not both")
    progress = sys.stderr.isatty()
    workers: WorkerSet | None = None
    model_ref = str(model)
    if args.workers:
        workers = LocalWorkers(args.workers, pin=args.pin).start()
    elif args.worker:
        token = read_token(args.token_file) if args.token_file else None
        workers = StaticWorkers(args.worker, token,
                                tls_from_args(args.tls_cert, args.tls_key, args.tls_ca))
        model_ref = args.model  # a path on the workers' disks, or "demo"
    if not workers and args.stages < 1:
        raise SpecshardError("--stages must be at least 1")
    try:
        built = build_ring(model, workers=workers, stages=args.stages, model_ref=model_ref,
                           ctx=args.ctx, threads=threads(args), kv=KvType(args.kv),
                           progress=progress)
    except BaseException:
        if workers is not None:
            workers.stop()
        raise
    stack.callback(built.close)
    if built.plan is not None:
        log.info("plan: %s", ", ".join(f"{s.name} {s.begin}:{s.end} {s.type_k.value}"
                                       for s in built.plan.stages))
    return built


def run_generate(args: argparse.Namespace) -> int:
    model = models.resolve(args.model)
    tokenizer = Tokenizer(model)
    tokens = prompt_tokens(tokenizer, args.prompt, args.raw)
    sampling, gamma = sampling_from(args), gamma_config(args.gamma, args.gamma_max,
                                                            args.spec_depth)
    with ExitStack() as stack:
        # Beside local workers the draft gets one thread: more only fight the workers for
        # cores (measured: 2 threads ≈ 3× slower per step than 1 next to 2 workers).
        drafter = open_drafter(args.draft_mode or "auto", args.draft, model, args.ctx, 1,
                               1 if args.workers else threads(args))
        if drafter is not None:
            stack.callback(drafter.close)
        built = open_ring(args, model, stack)
        # One sequence: only an adaptive γ or depth needs the ring's costs (nothing to
        # chunk beside).
        adaptive = gamma.fixed is None or gamma.depth is None
        costs = None if drafter is not None and adaptive else FREE_DRAFT
        engine = start_engine(built, tokenizer, model.stem, drafter,
                              EngineOptions(prefill_chunk=args.prefill_chunk, gamma=gamma),
                              costs=costs)
        stack.callback(engine.close)
        echo = None if args.json else _echo
        done = engine.generate(GenerationRequest(tokens, args.max_tokens, sampling), echo)
    report(done, args.json)
    return 0


def _echo(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def report(done: Generation, as_json: bool) -> None:
    stats = done.stats.as_dict()
    if as_json:
        print(json.dumps({"tokens": done.tokens, "text": done.text,
                          "finish_reason": done.finish_reason, "stats": stats}))
        return
    spec = f", {stats['tokens_per_step']} tokens/step" if stats.get("gamma_mean") else ""
    print(f"\n\n[{stats['n_tokens']} tokens, {stats['tok_s']} tok/s decode, "
          f"{stats['prompt_tok_s']} tok/s prompt, {stats['n_prompt_tokens']} prompt "
          f"tokens{spec}]", file=sys.stderr)
