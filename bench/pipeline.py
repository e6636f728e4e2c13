"""The demo target as 1 process, as N gRPC workers, and as llama.cpp RPC with N servers.

    python bench/pipeline.py [--workers 2] [--tokens 64] [--rounds 3] [--latency-ms 0.5]

One box per worker is emulated by pinning: the single process gets one core; each
worker and each rpc-server gets its own core and one thread; the coordinator (and
llama.cpp's RPC host process) sit on core 0. Both systems get the same OpenMP spin
policy and the same even layer split. With --latency-ms, a TCP proxy in front of every
worker / rpc-server adds that one-way delay to every hop (this kernel has no netem).
Rounds alternate the systems so drift on a shared machine hits all alike; medians are
reported. Prints JSON (also written to bench/results/pipeline.json).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.latency_proxy import LatencyProxy  # noqa: E402
from bench.machine import report  # noqa: E402
from bench.rpc_baseline import rpc_decode_tok_s, start_rpc_servers  # noqa: E402
from cluster import models  # noqa: E402
from cluster.auth import split_address  # noqa: E402
from cluster.messages import LoadSpec, StepRequest, StepResult  # noqa: E402
from cluster.sampling import SamplingParams  # noqa: E402
from cluster.stage_cut import even_split  # noqa: E402
from coordinator.generate import generate  # noqa: E402
from coordinator.grpc_pipeline import GrpcPipeline  # noqa: E402
from coordinator.launcher import LocalWorkers  # noqa: E402
from coordinator.tokenizer import Tokenizer  # noqa: E402

PROMPT = "Write a Python class for an LRU cache with get and put, with docstrings."


class TimedRing:
    """The ring, with each step's wall time kept to derive time spent between stages."""

    def __init__(self, ring: GrpcPipeline) -> None:
        self.ring = ring
        self.step_ms: list[float] = []

    @property
    def n_ctx(self) -> int:
        return self.ring.n_ctx

    def step(self, request: StepRequest) -> StepResult:
        t0 = time.perf_counter()
        result = self.ring.step(request)
        self.step_ms.append(1000 * (time.perf_counter() - t0))
        return result

    def reset(self, seq: int) -> None:
        self.ring.reset(seq)

    def hop_ms(self) -> list[float]:
        """Per step: (wall − compute in every worker) ÷ hops (coordinator → … → coordinator).

        Skips the prefill step, whose compute dwarfs the hops."""
        per_worker = list(self.ring.times.stage_ms.values())
        n = min(len(self.step_ms), *(len(s) for s in per_worker))
        hops = len(per_worker) + 1
        return [(self.step_ms[-n + i] - sum(s[-n + i] for s in per_worker)) / hops
                for i in range(1, n)]


def proxied(stack: ExitStack, addresses: list[str], latency_ms: float) -> list[str]:
    if latency_ms <= 0:
        return addresses
    return [stack.enter_context(LatencyProxy(split_address(a), one_way_ms=latency_ms)).address
            for a in addresses]


def ring_rate(model: Path, workers: LocalWorkers, prompt: list[int], n_tokens: int,
              latency_ms: float) -> tuple[float, list[float], list[int]]:
    with ExitStack() as stack:
        addresses = proxied(stack, workers.addresses, latency_ms)
        ring = GrpcPipeline(addresses, token=workers.token)
        stack.callback(ring.close)
        ring.load([LoadSpec(str(model), s.begin, s.end, n_ctx=1024, n_threads=1)
                   for s in even_split(28, len(addresses))])
        timed = TimedRing(ring)
        out = generate(timed, prompt, n_tokens, SamplingParams(), lambda _t: False)
        return out.stats.tok_s, timed.hop_ms(), out.tokens


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
    tokens: dict[str, list[int]] = {}
    with LocalWorkers(args.workers, pin=True, cores=cores) as workers, \
            start_rpc_servers(args.workers, threads=1, cpus=cores) as servers:
        for _ in range(args.rounds):
            single = rpc_decode_tok_s(model, [], prompt, args.tokens, cpus=[0])
            rates.setdefault("single", []).append(float(single["rpc_tok_s"]))
            tokens["single"] = list(single["tokens"])
            for latency in latencies:
                tag = "" if latency == 0 else "_latency"
                rate, hop, tokens["pipeline" + tag] = ring_rate(
                    model, workers, prompt, args.tokens, latency)
                rates.setdefault("pipeline" + tag, []).append(rate)
                if latency == 0:
                    hops += hop
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
