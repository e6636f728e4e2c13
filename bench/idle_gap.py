"""A stage's compute when it idles between tokens, as every pipelined stage does.

    python bench/idle_gap.py [--tokens 40] [--gap-ms 0 90]

In a pipeline of two, each worker idles while the other computes (~90 ms a token on
the demo target here). This runs the demo target's two stages, each in a fresh process
pinned to its own core like bench/pipeline.py's workers, and times `Stage.forward` with
no pause and with a pause of each --gap-ms before every token, interleaved pair by pair
so drift hits all alike. On a VM an idle vCPU is halted and handed back cold; the
difference is what that costs a stage's compute. Prints JSON (also written to
bench/results/idle_gap.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import report  # noqa: E402

STAGES = {"first": (0, 14), "last": (14, 28)}


def run_stage(which: str, core: int, n_tokens: int, gaps_ms: list[float]) -> dict[str, float]:
    """In this (fresh, pinned) process: median forward ms per token for every gap."""
    os.sched_setaffinity(0, {core})
    import numpy as np

    from cluster import models
    from cluster.llama.stage import Stage, StageConfig
    from cluster.messages import Slice
    from cluster.stage_cut import cut_stage

    model = models.fetch(models.DEMO_TARGET, progress=False)
    lo, hi = STAGES[which]
    stage = Stage(StageConfig(cut_stage(model, lo, hi), model_path=model if lo == 0 else None,
                              n_ctx=1024, n_threads=1))
    hidden = None if lo == 0 else np.zeros((1, stage.n_embd), np.float32)
    times: dict[float, list[float]] = {g: [] for g in gaps_ms}
    for i in range(n_tokens * len(gaps_ms)):
        gap = gaps_ms[(i // 2) % len(gaps_ms)]  # two tokens per gap in turn
        time.sleep(gap / 1000)
        t0 = time.perf_counter()
        stage.forward([Slice(0, i, [151644])], hidden)
        times[gap].append(1000 * (time.perf_counter() - t0))
    stage.close()
    return {str(g): round(statistics.median(v[2:]), 2) for g, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=40, help="tokens per gap and stage")
    ap.add_argument("--gap-ms", type=float, nargs="+", default=[0.0, 90.0])
    ap.add_argument("--child", nargs=2, metavar=("STAGE", "CORE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_stage(args.child[0], int(args.child[1]), args.tokens,
                                   args.gap_ms)))
        return
    result: dict[str, object] = {"bench": "idle_gap", "tokens": args.tokens,
                                 "gaps_ms": args.gap_ms}
    for core, which in enumerate(STAGES):
        out = subprocess.run([sys.executable, __file__, "--child", which, str(core),
                              "--tokens", str(args.tokens), "--gap-ms",
                              *map(str, args.gap_ms)],
                             capture_output=True, text=True, timeout=1800, check=True)
        ms = json.loads(out.stdout.strip().splitlines()[-1])
        base = ms[str(args.gap_ms[0])]
        result[f"{which}_stage_forward_ms_p50"] = ms
        result[f"{which}_stage_slowdown"] = {g: round(v / base, 3) for g, v in ms.items()}
    report("idle_gap", result)


if __name__ == "__main__":
    main()
