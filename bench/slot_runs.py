"""What one decode step of several sequences costs by which slots they hold.

    python bench/slot_runs.py [--rounds 7] [--threads 1]

A context as every stage and the draft model make it (one KV stream per slot,
cluster/llama/context.py) of the demo target, 8 slots with 64 cached tokens each, on
core 1. Each case decodes one row for each of the given slots at once, `--rounds`
times (slot order alternating with the reference case, the median reported).
llama.cpp puts only consecutive slots in one ubatch, so slots 0, 2, 4, 6 are four
passes over the weights where 0, 1, 2, 3 are one: why the scheduler sends one lane of
consecutive slots per micro-batch (docs/scheduler.md, "Lanes"). Prints JSON (also
bench/results/slot_runs.json).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llama_cpp  # noqa: E402

from bench.machine import report  # noqa: E402
from cluster import models  # noqa: E402
from cluster.llama.backend import free  # noqa: E402
from cluster.llama.context import ContextConfig, open_context  # noqa: E402

CACHED = 64
CASES = {"one slot": [0], "slots 0-3": [0, 1, 2, 3], "slots 0, 1, 4, 5": [0, 1, 4, 5],
         "slots 0, 2, 4, 6": [0, 2, 4, 6], "slots 0-7": list(range(8))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})
    model = models.fetch(models.DEMO_TARGET, progress=False)
    lc = open_context(model, ContextConfig(n_ctx=256, n_seq_max=8, n_batch=256,
                                           n_threads=args.threads), "the demo target")
    batch = llama_cpp.llama_batch_init(256, 0, 1)

    def decode(rows: list[tuple[int, int]]) -> None:
        for k, (slot, pos) in enumerate(rows):
            batch.token[k], batch.pos[k], batch.n_seq_id[k] = 100 + k, pos, 1
            batch.seq_id[k][0], batch.logits[k] = slot, True
        batch.n_tokens = len(rows)
        if llama_cpp.llama_decode(lc.ctx, batch) != 0:
            raise SystemExit("llama_decode failed")

    try:
        for slot in range(8):
            decode([(slot, p) for p in range(CACHED)])
        times: dict[str, list[float]] = {name: [] for name in CASES}
        for _ in range(args.rounds):
            for name, slots in CASES.items():
                for slot in slots:
                    llama_cpp.llama_memory_seq_rm(lc.mem, slot, CACHED, -1)
                t0 = time.perf_counter()
                decode([(slot, CACHED) for slot in slots])
                times[name].append(time.perf_counter() - t0)
    finally:
        free(batch, lc.ctx, lc.model)
    ms = {name: round(1000 * statistics.median(t), 1) for name, t in times.items()}
    report("slot_runs", {
        "bench": "slot_runs", "model": model.name, "threads": args.threads,
        "rounds": args.rounds, "cached_tokens": CACHED, "step_ms": ms,
        "scattered_vs_consecutive": round(ms["slots 0, 2, 4, 6"] / ms["slots 0-3"], 2)})


if __name__ == "__main__":
    main()
