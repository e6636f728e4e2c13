"""Does pooling two boxes pool their compute? Four workloads on the demo target, three systems.

    python bench/throughput.py [--prompt-tokens 2048] [--sequences 8] [--tokens 128]
                               [--streams 4] [--skip rpc]

Systems, one box per worker emulated by pinning one core and one thread to each:
- `single`: one llama.cpp process on core 0, batching the sequences in one llama_decode
  per step, as llama-server does (bench/llama_baseline.py);
- `specshard`: 2 gRPC workers on cores 0 and 1, split as the planner decides, and the
  engine (this process) on core 0;
- `rpc`: llama.cpp's RPC mode, 2 rpc-servers on cores 0 and 1, the host on core 0.
Workloads:
(a) prefill of a 2,048-token prompt: time to first token;
(b) 8 concurrent sequences × 128 greedy tokens: aggregate tok/s, end to end (all
    prompts submitted at once → all done) and over the decode phase;
(c) one sequence: decode tok/s;
(d) inter-token latency of 4 running streams while a 2,048-token prompt arrives (from
    its arrival to its first token), p50/p99, against the same streams alone (specshard).
Prints JSON (also bench/results/throughput.json).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # as `specshard` sets it (cluster/cli.py)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import report  # noqa: E402
from bench.rpc_baseline import Batched, Decode, Prefill, run_llama, start_rpc_servers  # noqa: E402
from cluster import models  # noqa: E402
from coordinator.engine.frontend import Engine  # noqa: E402
from coordinator.engine.request import Finished, GenerationRequest, TextChunk  # noqa: E402
from coordinator.placement.local import LocalWorkers  # noqa: E402
from coordinator.ring.builder import build_ring  # noqa: E402
from coordinator.service import EngineOptions, start_engine  # noqa: E402
from coordinator.tokenizer import Tokenizer  # noqa: E402

TOPICS = ("a binary search", "an LRU cache", "a trie", "a JSON tokenizer", "a priority queue",
          "a rate limiter", "a ring buffer", "Dijkstra's algorithm", "a bloom filter",
          "a union-find")
TARGETS = {"a_prefill_vs_single": 1.7, "b_batched_vs_single": 1.7, "b_batched_vs_rpc": 2.0,
           "c_decode_vs_single": 0.95, "d_p99_over_alone_p50": 2.5}


def chat_prompts(tokenizer: Tokenizer, n: int) -> list[list[int]]:
    return [tokenizer.encode(tokenizer.chat_prompt(
        [{"role": "user", "content": f"Write {TOPICS[i % len(TOPICS)]} in Python."}]))
        for i in range(n)]


def long_prompt(tokenizer: Tokenizer, n: int) -> list[int]:
    text = "\n".join(f"def f{i}(x, y):\n    return (x * {i} + y) % {i + 7}" for i in range(n))
    tokens = tokenizer.encode(text)[:n]
    if len(tokens) < n:
        raise SystemExit(f"could not make a {n}-token prompt")
    return tokens


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


# --- specshard -----------------------------------------------------------------------


def batched(engine: Engine, prompts: list[list[int]], n_tokens: int) -> dict[str, Any]:
    """All prompts submitted at once; aggregate tok/s end to end and over decoding."""
    results: list[Any] = [None] * len(prompts)
    t0 = time.perf_counter()

    def one(i: int) -> None:
        results[i] = engine.generate(GenerationRequest(prompts[i], n_tokens, ignore_eos=True))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    last_first = max(r.stats.prefill_s for r in results)  # every sequence is decoding
    generated = sum(r.stats.n_tokens for r in results)
    after = sum(r.stats.n_tokens - 1 for r in results)
    return {"e2e_tok_s": generated / wall, "decode_tok_s": after / (wall - last_first)
            if wall > last_first else 0.0, "wall_s": wall,
            "tokens": [r.tokens for r in results]}


def streams_itl(engine: Engine, prompts: list[list[int]], n_tokens: int,
                intruder: list[int] | None) -> dict[str, Any]:
    """Inter-token latencies of streams once all of them decode: alone, until the first
    stream ends; with an intruder, from its arrival to its first token."""
    stamps: list[list[float]] = [[] for _ in prompts]
    ready = threading.Barrier(len(prompts) + 1)
    stop = threading.Event()
    ended: list[float] = []

    def stream(i: int) -> None:
        events = engine.run(GenerationRequest(prompts[i], n_tokens, ignore_eos=True))
        try:
            for event in events:
                if isinstance(event, TextChunk) and event.token_ids:
                    stamps[i].append(time.perf_counter())
                    if len(stamps[i]) == 8:
                        ready.wait()
                if stop.is_set() or isinstance(event, Finished):
                    break
        finally:
            ended.append(time.perf_counter())
            events.close()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    ready.wait()
    start, ttft = time.perf_counter(), 0.0
    if intruder is not None:
        first = engine.generate(GenerationRequest(intruder, 1, ignore_eos=True))
        ttft = first.stats.prefill_s
        stop.set()
    for t in threads:
        t.join()
    end = time.perf_counter() if intruder is not None and not ended else min(ended)
    if intruder is not None:
        end = start + ttft
    gaps = [1000 * (b - a) for s in stamps for a, b in zip(s, s[1:], strict=False)
            if start <= a and b <= end]
    return {"itl_ms_p50": percentile(gaps, 0.5), "itl_ms_p99": percentile(gaps, 0.99),
            "itl_samples": len(gaps), "intruder_ttft_s": ttft}


def specshard(model: Path, tokenizer: Tokenizer, args: argparse.Namespace,
              work: dict[str, Any]) -> dict[str, Any]:
    workers = LocalWorkers(2, pin=True, cores=[0, 1]).start()
    try:
        built = build_ring(model, workers=workers, ctx=args.prompt_tokens + 256,
                           parallel=args.sequences, threads=1)
    except BaseException:
        workers.stop()
        raise
    try:
        engine = start_engine(built, tokenizer, "bench", options=EngineOptions(
            max_batch_tokens=args.max_batch_tokens, max_stall=args.max_stall))
        try:
            engine.generate(GenerationRequest(work["decode"][0], 8))  # warm-up
            out: dict[str, Any] = {"split": [(s.begin, s.end) for s in built.plan.stages]
                                   if built.plan else None,
                                   "costs": engine.core.policy.costs.as_dict()}
            if "a" in args.workloads:
                first = engine.generate(GenerationRequest(work["prefill"], 1))
                out["prefill_ttft_s"] = first.stats.prefill_s
            if "b" in args.workloads:
                out["batched"] = batched(engine, work["batched"], args.tokens)
            if "c" in args.workloads:
                one = engine.generate(GenerationRequest(work["decode"][0], args.tokens,
                                                        ignore_eos=True))
                out["decode_tok_s"], out["decode_tokens"] = one.stats.tok_s, one.tokens
            if "d" in args.workloads:
                streams = work["batched"][:args.streams]
                # Alone before and after, so drift on a shared machine shows (and is
                # averaged) rather than deciding the ratio.
                before = streams_itl(engine, streams, 8 + args.alone_tokens, None)
                out["itl_with_prompt"] = streams_itl(engine, streams, args.stream_tokens,
                                                     work["prefill"])
                after = streams_itl(engine, streams, 8 + args.alone_tokens, None)
                out["itl_alone"] = {k: (before[k] + after[k]) / 2 for k in before}
                out["itl_alone_p50_before_after"] = [before["itl_ms_p50"],
                                                     after["itl_ms_p50"]]
            return out
        finally:
            engine.close()
    finally:
        built.close()


# --- llama.cpp -----------------------------------------------------------------------


def llama(model: Path, work: dict[str, Any], args: argparse.Namespace,
          endpoints: list[str]) -> dict[str, Any]:
    """The three llama.cpp workloads (a, b, c; (d) is specshard's own)."""
    runs = run_llama(model, [Decode(work["decode"][0], 8),  # warm-up
                             Prefill(work["prefill"]),
                             Batched(work["batched"], args.tokens),
                             Decode(work["decode"][0], args.tokens)],
                     endpoints=endpoints, threads=1, cpus=[0])["results"]
    _, prefill, group, one = runs
    return {"prefill_ttft_s": prefill["ttft_s"],
            "batched": {"e2e_tok_s": len(work["batched"]) * args.tokens
                        / (group["prefill_s"] + group["decode_s"]),
                        "decode_tok_s": group["decode_tok_s"], "tokens": group["tokens"]},
            "decode_tok_s": one["decode_tok_s"], "decode_tokens": one["tokens"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--stream-tokens", type=int, default=1024,
                        help="long enough to outlast the intruding prompt")
    parser.add_argument("--alone-tokens", type=int, default=96,
                        help="tokens per stream measured without the intruder")
    parser.add_argument("--max-batch-tokens", type=int, default=512)
    parser.add_argument("--max-stall", type=float, default=2.0)
    parser.add_argument("--skip", nargs="*", default=[], choices=["single", "rpc"])
    parser.add_argument("--tag", default="", help="results go to throughput-TAG.json")
    parser.add_argument("--workloads", nargs="+", default=["a", "b", "c", "d"],
                        choices=["a", "b", "c", "d"], help="a subset, for a quick look")
    args = parser.parse_args()
    os.sched_setaffinity(0, {0})  # the coordinator shares core 0, like the RPC host
    model = models.fetch(models.DEMO_TARGET, progress=False)
    tokenizer = Tokenizer(model)
    work = {"prefill": long_prompt(tokenizer, args.prompt_tokens),
            "batched": chat_prompts(tokenizer, args.sequences),
            "decode": chat_prompts(tokenizer, 1)}
    systems: dict[str, dict[str, Any]] = {}
    if "single" not in args.skip:
        systems["single"] = llama(model, work, args, [])
    systems["specshard"] = specshard(model, tokenizer, args, work)
    if "rpc" not in args.skip:
        with start_rpc_servers(2, threads=1, cpus=[0, 1]) as servers:
            systems["rpc"] = llama(model, work, args, servers.endpoints)
    report(f"throughput-{args.tag}" if args.tag else "throughput", summarize(args, systems))


def summarize(args: argparse.Namespace, systems: dict[str, dict[str, Any]]) -> dict[str, Any]:
    ours = systems["specshard"]
    ratios: dict[str, float] = {}
    for name in ("single", "rpc"):
        base = systems.get(name)
        if base is None:
            continue
        if "prefill_ttft_s" in ours:
            ratios[f"a_prefill_vs_{name}"] = base["prefill_ttft_s"] / ours["prefill_ttft_s"]
        if "batched" in ours:
            ratios[f"b_batched_vs_{name}"] = ours["batched"]["e2e_tok_s"] / \
                base["batched"]["e2e_tok_s"]
            ratios[f"b_batched_decode_vs_{name}"] = ours["batched"]["decode_tok_s"] / \
                base["batched"]["decode_tok_s"]
        if "decode_tok_s" in ours:
            ratios[f"c_decode_vs_{name}"] = ours["decode_tok_s"] / base["decode_tok_s"]
    if "itl_alone" in ours:
        ratios["d_p99_over_alone_p50"] = ours["itl_with_prompt"]["itl_ms_p99"] / \
            max(ours["itl_alone"]["itl_ms_p50"], 1e-9)
    same = {name: s.get("decode_tokens") == ours.get("decode_tokens")
            for name, s in systems.items() if "decode_tokens" in s}
    for s in systems.values():  # token lists are for the check above, not the report
        s.pop("decode_tokens", None)
        s.get("batched", {}).pop("tokens", None)
    return {
        "bench": "throughput", "prompt_tokens": args.prompt_tokens,
        "sequences": args.sequences, "tokens": args.tokens, "streams": args.streams,
        "max_batch_tokens": args.max_batch_tokens, "max_stall": args.max_stall,
        "systems": systems,
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "targets": TARGETS,
        "met": {k: ratios[k] <= t if k.startswith("d_") else ratios[k] >= t
                for k, t in TARGETS.items() if k in ratios},
        "single_decode_same_tokens": same,
    }


if __name__ == "__main__":
    main()
