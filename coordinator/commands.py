"""`specshard generate`: run the model as a pipeline and print a completion."""

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
from cluster.model_info import KvType, inspect_model
from cluster.sampling import SamplingParams
from cluster.stage_cut import even_split
from coordinator.draft import DraftConfig, ModelDrafter, check_vocab
from coordinator.gamma import GammaConfig, GammaController
from coordinator.generate import Drafter, Generation, Pipeline, generate_stream
from coordinator.grpc_pipeline import GrpcPipeline
from coordinator.launcher import LocalWorkers
from coordinator.local_pipeline import LocalPipeline
from coordinator.ngram import NgramDrafter
from coordinator.placement import load_specs, plan_ring
from coordinator.tokenizer import TextStream, Tokenizer

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


def sampling_from(args: argparse.Namespace) -> SamplingParams:
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise SpecshardError("need temperature ≥ 0, 0 < top-p ≤ 1, top-k ≥ 0")
    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          seed=args.seed)


def prompt_tokens(tokenizer: Tokenizer, prompt: str, raw: bool) -> list[int]:
    text = prompt if raw else tokenizer.chat_prompt([{"role": "user", "content": prompt}])
    return tokenizer.encode(text)


def open_drafter(args: argparse.Namespace, model: Path, stack: ExitStack) -> Drafter | None:
    mode = args.draft_mode or ("model" if args.draft else "none")
    if args.gamma is not None and not 1 <= args.gamma <= 16:
        raise SpecshardError("--gamma must be in 1..16")
    if not 1 <= args.gamma_max <= 16:
        raise SpecshardError("--gamma-max must be in 1..16")
    gamma = GammaController(GammaConfig(fixed=args.gamma, gamma_max=args.gamma_max))
    if mode == "none":
        return None
    if mode == "ngram":
        return NgramDrafter(gamma=gamma)
    if not args.draft:
        raise SpecshardError("--draft-mode model needs --draft MODEL (or 'demo')")
    draft = models.resolve(args.draft, "draft")
    check_vocab(model, draft)
    # Beside local workers the draft gets one thread: more only fight the workers for
    # cores (measured: 2 threads ≈ 3× slower per step than 1 next to 2 workers).
    n_threads = 1 if args.workers else threads(args)
    drafter = ModelDrafter(DraftConfig(draft, n_ctx=args.ctx, n_threads=n_threads), gamma)
    stack.callback(drafter.close)
    return drafter


def run_pipeline(pipeline: Pipeline, tokenizer: Tokenizer, tokens: list[int],
                 args: argparse.Namespace, echo: bool, drafter: Drafter | None = None
                 ) -> Generation:
    stream = generate_stream(pipeline, tokens, args.max_tokens, sampling_from(args),
                             tokenizer.is_end, drafter=drafter)
    text = TextStream(tokenizer)
    out, gaps = [], []
    while True:
        try:
            token, gap = next(stream)
        except StopIteration as done:
            stats = done.value
            break
        out.append(token)
        gaps.append(gap)
        if echo and not tokenizer.is_end(token):
            sys.stdout.write(text.push(token))
            sys.stdout.flush()
    finish = "stop" if out and tokenizer.is_end(out[-1]) else "length"
    return Generation(tokens=out, stats=stats, finish_reason=finish, top2_gaps=gaps)


def report(generation: Generation, tokenizer: Tokenizer, as_json: bool) -> None:
    visible = [t for t in generation.tokens if not tokenizer.is_end(t)]
    if as_json:
        print(json.dumps({"tokens": generation.tokens, "text": tokenizer.decode(visible),
                          "finish_reason": generation.finish_reason,
                          "stats": generation.stats.as_dict()}))
    else:
        s = generation.stats
        spec = f", {s.tokens_per_step:.2f} tokens/step" if s.proposed else ""
        print(f"\n\n[{s.n_tokens} tokens, {s.tok_s:.1f} tok/s decode, "
              f"{s.prompt_tok_s:.1f} tok/s prompt, {s.n_prompt_tokens} prompt tokens{spec}]",
              file=sys.stderr)


def threads(args: argparse.Namespace) -> int:
    if args.threads is not None:
        if args.threads < 1:
            raise SpecshardError("--threads must be at least 1")
        return int(args.threads)
    return 1 if args.pin else os.cpu_count() or 1


def open_pipeline(args: argparse.Namespace, model: Path, stack: ExitStack) -> Pipeline:
    """In-process stages, local worker processes, or running workers, as asked."""
    info = inspect_model(model)
    kv = KvType(args.kv)
    progress = sys.stderr.isatty()
    if args.workers and args.worker:
        raise SpecshardError("give --workers N or --worker HOST:PORT, not both")
    if not args.workers and not args.worker:
        local = LocalPipeline.load(model, even_split(info.n_layer, args.stages),
                                   n_ctx=args.ctx, n_threads=threads(args), kv=kv,
                                   progress=progress)
        stack.callback(local.close)
        return local
    token: str | None
    if args.workers:
        workers = stack.enter_context(LocalWorkers(args.workers, pin=args.pin))
        addresses, token, tls = workers.addresses, workers.token, None
        model_ref = str(model)
    else:
        addresses = args.worker
        token = read_token(args.token_file) if args.token_file else None
        tls = tls_from_args(args.tls_cert, args.tls_key, args.tls_ca)
        model_ref = args.model  # a path on the workers' disks, or "demo"
    pipeline = GrpcPipeline(addresses, token=token, tls=tls)
    stack.callback(pipeline.close)
    ring_plan = plan_ring(model, addresses, pipeline.node_infos(), args.ctx)
    log.info("plan: %s", ", ".join(f"{s.name} {s.begin}:{s.end} {s.type_k.value}"
                                   for s in ring_plan.stages))
    specs = load_specs(ring_plan, model_ref, threads(args))
    pipeline.load(specs, progress=progress)
    return pipeline


def run_generate(args: argparse.Namespace) -> int:
    model = models.resolve(args.model)
    tokenizer = Tokenizer(model)
    tokens = prompt_tokens(tokenizer, args.prompt, args.raw)
    with ExitStack() as stack:
        drafter = open_drafter(args, model, stack)  # a bad draft is refused before loading
        pipeline = open_pipeline(args, model, stack)
        generation = run_pipeline(pipeline, tokenizer, tokens, args, echo=not args.json,
                                  drafter=drafter)
    report(generation, tokenizer, args.json)
    return 0


