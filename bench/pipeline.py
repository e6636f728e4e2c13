"""The demo target as 1 process, as N gRPC workers, and as llama.cpp RPC with N servers.

    python bench/pipeline.py [--workers 2] [--tokens 64] [--rounds 3] [--latency-ms 0.5]

One box per worker is emulated by pinning: the single process gets one core; each
worker and each rpc-server gets its own core and one thread; the coordinator (and
llama.cpp's RPC host process) sit on core 0. Both systems get the same OpenMP spin
policy and the same even layer split. With --latency-ms, a TCP proxy in front of every
worker / rpc-server adds that one-way delay to every hop (this kernel has no netem).
Rounds alternate the systems so drift on a shared machine hits all alike; medians are
reported, and means for the breakdown of a pipelined token (token, step, each worker's
compute). Prints JSON (also written to bench/results/pipeline.json).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from bench.latency_proxy import LatencyProxy  # noqa: E402
from bench.machine import report  # noqa: E402
from bench.rpc_baseline import rpc_decode_tok_s, start_rpc_servers  # noqa: E402
from cluster import models  # noqa: E402
from cluster.auth import split_address  # noqa: E402
from cluster.stage_cut import even_split  # noqa: E402
from coordinator.engine.request import GenerationRequest  # noqa: E402
from coordinator.placement.local import LocalWorkers  # noqa: E402
from coordinator.ring.builder import build_ring  # noqa: E402
from coordinator.ring.supervisor import StaticWorkers  # noqa: E402
from coordinator.service import start_engine  # noqa: E402
from coordinator.speculation.gamma import FREE_DRAFT  # noqa: E402
from coordinator.tokenizer import Tokenizer  # noqa: E402

PROMPT = "Write a Python class for an LRU cache with get and put, with docstrings."


def hop_ms(timings: list, n_workers: int) -> list[float]:  # type: ignore[type-arg]
    """Per decode step: (wall − compute in every worker) ÷ hops (coordinator → … →
    coordinator). Skips the prompt's batch, whose compute dwarfs the hops."""
    hops = n_workers + 1
    return [(t.wall_ms - sum(t.stage_ms.values())) / hops for t in timings[1:]
            if len(t.stage_ms) == n_workers]


def proxied(stack: ExitStack, addresses: list[str], latency_ms: float) -> list[str]:
    if latency_ms <= 0:
        return addresses
    return [stack.enter_context(LatencyProxy(split_address(a), one_way_ms=latency_ms)).address
            for a in addresses]


def ring_rate(model: Path, tokenizer: Tokenizer, workers: LocalWorkers, prompt: list[int],
              n_tokens: int, latency_ms: float
              ) -> tuple[float, list[float], list[int], list[tuple[float, list[float]]]]:
    """One greedy generation through the engine (the scheduler with one sequence): its
    tok/s, hop times, tokens, and each decode step's wall time and compute per worker
    (ms)."""
    with ExitStack() as stack:
        addresses = proxied(stack, workers.addresses, latency_ms)
        built = build_ring(model, workers=StaticWorkers(addresses, workers.token, None),
                           ctx=1024, threads=1, split=even_split(28, len(addresses)))
        stack.callback(built.close)
        engine = start_engine(built, tokenizer, "bench", costs=FREE_DRAFT)
        stack.callback(engine.close)
        out = engine.generate(GenerationRequest(prompt, n_tokens, ignore_eos=True))
        timings = list(engine.core.timings)
        steps = [(t.wall_ms, list(t.stage_ms.values())) for t in timings[1:]
                 if len(t.stage_ms) == len(addresses)]
        return out.stats.tok_s, hop_ms(timings, len(addresses)), out.tokens, steps


def rpc_rate(model: Path, endpoints: list[str], prompt: list[int], n_tokens: int,
             latency_ms: float) -> tuple[float, list[int]]:
    with ExitStack() as stack:
        result = rpc_decode_tok_s(model, proxied(stack, endpoints, latency_ms), prompt,
                                  n_tokens, threads_main=1, cpus=[0])
        return float(result["rpc_tok_s"]), list(result["tokens"])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=0.5,
                        help="one-way latency per hop for the simulated-LAN runs (0: skip)")
    args = parser.parse_args()
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    os.sched_setaffinity(0, {0})  # the coordinator shares core 0, like the RPC host
    model = models.fetch(models.DEMO_TARGET, progress=False)
    tokenizer = Tokenizer(model)
    prompt = tokenizer.encode(tokenizer.chat_prompt([{"role": "user", "content": PROMPT}]))
    cores = list(range(args.workers))
    latencies = [0.0] + ([args.latency_ms] if args.latency_ms > 0 else [])
    rates: dict[str, list[float]] = {}
    hops: list[float] = []
    steps: list[tuple[float, list[float]]] = []
    tokens: dict[str, list[int]] = {}
    with LocalWorkers(args.workers, pin=True, cores=cores) as workers, \
            start_rpc_servers(args.workers, threads=1, cpus=cores) as servers:
        for _ in range(args.rounds):
            single = rpc_decode_tok_s(model, [], prompt, args.tokens, cpus=[0])
            rates.setdefault("single", []).append(float(single["rpc_tok_s"]))
            tokens["single"] = list(single["tokens"])
            for latency in latencies:
                tag = "" if latency == 0 else "_latency"
                rate, hop, tokens["pipeline" + tag], timed = ring_rate(
                    model, tokenizer, workers, prompt, args.tokens, latency)
                rates.setdefault("pipeline" + tag, []).append(rate)
                if latency == 0:
                    hops += hop
                    steps += timed
                rate, tokens["rpc" + tag] = rpc_rate(model, servers.endpoints, prompt,
                                                     args.tokens, latency)
                rates.setdefault("rpc" + tag, []).append(rate)
    med = {k: statistics.median(v) for k, v in rates.items()}
    result: dict[str, object] = {
        "bench": "pipeline", "model": model.name, "workers": args.workers,
        "tokens": args.tokens, "rounds": args.rounds,
        "single_tok_s": round(med["single"], 2),
        "pipeline_tok_s": round(med["pipeline"], 2), "rpc_tok_s": round(med["rpc"], 2),
        "ratio_vs_single": round(med["pipeline"] / med["single"], 3),
        "ratio_vs_rpc": round(med["pipeline"] / med["rpc"], 3),
        # Where a pipelined token goes, as means over every round (means add up): a
        # token's time, the step's wall time (submit to verdict) inside it, and each
        # worker's compute inside that; the single process's token beside it.
        "single_ms_per_token_mean": round(statistics.mean(1000 / r for r in rates["single"]),
                                          2),
        "pipeline_ms_per_token_mean": round(
            statistics.mean(1000 / r for r in rates["pipeline"]), 2),
        "pipeline_step_wall_ms_mean": round(statistics.mean(w for w, _ in steps), 2),
        "stage_compute_ms_mean": [round(statistics.mean(s), 2)
                                  for s in zip(*(c for _, c in steps), strict=True)],
        "hop_ms_p50": round(percentile(hops, 0.5), 3),
        "hop_ms_p99": round(percentile(hops, 0.99), 3),
        "same_tokens_as_single": {k: v == tokens["single"] for k, v in tokens.items()},
        "samples": {k: [round(x, 2) for x in v] for k, v in rates.items()},
    }
    if "pipeline_latency" in med:
        result.update({
            "latency_one_way_ms": args.latency_ms,
            "pipeline_tok_s_latency": round(med["pipeline_latency"], 2),
            "rpc_tok_s_latency": round(med["rpc_latency"], 2),
            "ratio_vs_rpc_latency": round(med["pipeline_latency"] / med["rpc_latency"], 3),
        })
    report("pipeline", result)


if __name__ == "__main__":
    main()
