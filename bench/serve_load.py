"""Chat clients arriving as they do: does a pool of two boxes serve them faster than one?

    python bench/serve_load.py [--clients 1 4 8 16] [--tokens 128] [--spread 1.0]
                               [--max-stall X] [--skip llama]

specshard: `serve`'s engine and HTTP API in this process (on core 0), 2 gRPC workers
pinned to cores 0 and 1 (one box per worker), the demo target, `--parallel` = clients.
N chat clients, each the real `openai` client streaming one greedy answer of --tokens
tokens (`ignore_eos`), start at moments spread evenly over the first --spread seconds.
Baselines in the same run, the same prompts and token counts:
- `one_process_2_cores` / `one_process_1_core`: one llama.cpp process doing the same
  requests end to end as llama-server does on one box (prompts prefilled together, then
  the sequences decoded in batched steps), on both cores or on core 0;
- `engine_at_once`: specshard's engine fed every prompt in the same instant.
Reported: aggregate tok/s (completion tokens over first send → last token), decode rows
per micro-batch and the passes over a stage's weights they took (from /metrics), time
to first token and inter-token latency p50/p99.
Targets at 8 clients: ≥ 1.0× one process on one core, ≥ 0.8× on both, ≥ 0.9× the engine
fed at once. Prints JSON (also bench/results/serve_load.json).
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

import httpx  # noqa: E402
import openai  # noqa: E402

from bench.clients import spread_clients  # noqa: E402
from bench.machine import report  # noqa: E402
from bench.rpc_baseline import Batched, run_llama  # noqa: E402
from bench.throughput import TOPICS, percentile  # noqa: E402
from cluster import models  # noqa: E402
from coordinator.api.app import ServerState, create_app  # noqa: E402
from coordinator.api.server import ServerThread  # noqa: E402
from coordinator.engine.frontend import Engine  # noqa: E402
from coordinator.engine.request import GenerationRequest  # noqa: E402
from coordinator.placement.local import LocalWorkers  # noqa: E402
from coordinator.ring.builder import build_ring  # noqa: E402
from coordinator.service import EngineOptions, start_engine  # noqa: E402
from coordinator.tokenizer import Tokenizer  # noqa: E402

TARGETS = {"vs_one_process_1_core": 1.0, "vs_one_process_2_cores": 0.8,
           "vs_engine_at_once": 0.9}


def questions(n: int) -> list[str]:
    return [f"Write {TOPICS[i % len(TOPICS)]} in Python, briefly; call it solution_{i}."
            for i in range(n)]


def histogram_mean(url: str, name: str) -> tuple[float, float]:
    """(sum, count) of a Prometheus histogram from /metrics."""
    total = count = 0.0
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + "_sum "):
            total = float(line.split()[-1])
        elif line.startswith(name + "_count "):
            count = float(line.split()[-1])
    return total, count


def clients(url: str, asks: list[str], n_tokens: int, spread: float) -> dict[str, Any]:
    """Every client streams its answer; arrivals spread over `spread` seconds."""
    n = len(asks)
    stamps: list[list[float]] = [[] for _ in range(n)]
    sent = [0.0] * n

    def one(client: openai.OpenAI, i: int) -> None:
        sent[i] = time.perf_counter()
        stream = client.chat.completions.create(
            model="", messages=[{"role": "user", "content": asks[i]}], stream=True,
            max_tokens=n_tokens, temperature=0,
            # Each run starts cold: the same prompts went through before.
            extra_body={"ignore_eos": True, "cache_prompt": False})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                stamps[i].append(time.perf_counter())

    rows0 = histogram_mean(url, "specshard_batch_decode_rows")
    passes0 = histogram_mean(url, "specshard_batch_decode_passes")
    spread_clients(url, n, spread, one)
    rows1 = histogram_mean(url, "specshard_batch_decode_rows")
    passes1 = histogram_mean(url, "specshard_batch_decode_passes")
    end = max(s[-1] for s in stamps)
    ttft = [s[0] - t for s, t in zip(stamps, sent, strict=True)]
    gaps = [1000 * (b - a) for s in stamps for a, b in zip(s, s[1:], strict=False)]
    batches = rows1[1] - rows0[1]
    return {"tok_s": round(n * n_tokens / (end - min(sent)), 3),
            "decode_rows_per_batch": round((rows1[0] - rows0[0]) / batches, 3)
            if batches else 0.0,
            # passes over a stage's weights for those rows (runs of consecutive slots)
            "decode_passes_per_batch": round((passes1[0] - passes0[0])
                                             / (passes1[1] - passes0[1]), 3)
            if passes1[1] > passes0[1] else 0.0,
            "ttft_s_p50": round(percentile(ttft, 0.5), 3),
            "ttft_s_p99": round(percentile(ttft, 0.99), 3),
            "itl_ms_p50": round(percentile(gaps, 0.5), 1),
            "itl_ms_p99": round(percentile(gaps, 0.99), 1)}


def at_once(engine: Engine, url: str, prompts: list[list[int]], n_tokens: int
            ) -> tuple[float, float]:
    """The engine fed every prompt in the same instant: aggregate tok/s end to end, and
    the passes over a stage's weights a batch's decode rows took."""
    passes0 = histogram_mean(url, "specshard_batch_decode_passes")
    t0 = time.perf_counter()
    threads = [threading.Thread(target=engine.generate, args=(GenerationRequest(
        p, n_tokens, ignore_eos=True, cache_prompt=False),)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tok_s = round(len(prompts) * n_tokens / (time.perf_counter() - t0), 3)
    passes1 = histogram_mean(url, "specshard_batch_decode_passes")
    return tok_s, round((passes1[0] - passes0[0]) / max(passes1[1] - passes0[1], 1), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--spread", type=float, default=1.0)
    parser.add_argument("--skip", nargs="*", default=[], choices=["llama"])
    parser.add_argument("--max-stall", type=float, default=EngineOptions.max_stall,
                        help="serve's --max-stall (default: serve's)")
    args = parser.parse_args()
    model = models.fetch(models.DEMO_TARGET, progress=False)
    tokenizer = Tokenizer(model)
    most = max(args.clients)
    asks = questions(most)
    prompts = [tokenizer.encode(tokenizer.chat_prompt([{"role": "user", "content": a}]))
               for a in asks]
    runs: dict[str, dict[str, Any]] = {str(n): {} for n in args.clients}
    if "llama" not in args.skip:
        for cores in ([0, 1], [0]):
            name = f"one_process_{len(cores)}_core{'s' if len(cores) > 1 else ''}"
            results = run_llama(model, [Batched(prompts[:n], args.tokens)
                                        for n in args.clients],
                                threads=len(cores), cpus=cores)["results"]
            for n, r in zip(args.clients, results, strict=True):
                runs[str(n)][name] = round(n * args.tokens / (r["prefill_s"] + r["decode_s"]),
                                           3)
    workers = LocalWorkers(2, pin=True, cores=[0, 1]).start()
    os.sched_setaffinity(0, {0})  # the coordinator shares core 0 with worker 0
    try:
        built = build_ring(model, workers=workers, ctx=1024, parallel=most, threads=1)
        engine = start_engine(built, tokenizer, "demo",
                              options=EngineOptions(max_stall=args.max_stall))
        try:
            with ServerThread(create_app(ServerState(engine=engine))) as server:
                for n in args.clients:
                    runs[str(n)]["specshard"] = clients(server.url, asks[:n], args.tokens,
                                                        args.spread)
                    runs[str(n)]["engine_at_once"], runs[str(n)]["at_once_passes"] = \
                        at_once(engine, server.url, prompts[:n], args.tokens)
        finally:
            engine.close()
            built.close()
    finally:
        workers.stop()
    ratios = {}
    for n, run in runs.items():
        ours = run["specshard"]["tok_s"]
        ratios[n] = {f"vs_{k}": round(ours / v, 3) for k, v in run.items()
                     if k not in ("specshard", "at_once_passes") and isinstance(v, float)
                     and v > 0}
    eight = ratios.get("8", {})
    report("serve_load", {"clients": args.clients, "tokens": args.tokens,
                          "spread_s": args.spread, "max_stall": args.max_stall,
                          "runs": runs, "ratios": ratios,
                          "targets_at_8": TARGETS,
                          "met_at_8": {k: eight[k] >= t for k, t in TARGETS.items()
                                       if k in eight}})


if __name__ == "__main__":
    main()
