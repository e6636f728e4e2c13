"""Run-ahead speculation: one stream over two boxes against one box.

    python bench/runahead.py [--tokens 240] [--rounds 1] [--workloads e e-adaptive f g]
                             [--tag T] [--core 0|1]

One greedy stream of `--tokens` tokens, three ways, with the same drafter:
- `single`: one process on one core (the whole model in-process, the coordinator's own
  core), speculating synchronously; `single_plain` beside it without a drafter;
- `sync`: two workers, each pinned to its own core (one box each; the coordinator on
  core 0 with the first stage, or `--core 1` with the last), the planner's layer
  split, speculating synchronously (`--spec-depth 1`);
- `ahead`: the same workers, run-ahead windows (`--spec-depth` chosen by the costs).
Workloads: (e) an edit whose answer copies the prompt's code, n-gram drafting at γ 4
(and `e-adaptive`, adaptive γ); (f) free code generation, n-gram, adaptive γ; (g) the
demo draft model at γ 4. Reports tok/s, tokens per target step, windows sent, run
ahead, stale (wasted) and skipped (early cancellation: the compute it saved). Prints
JSON (also bench/results/runahead.json, or runahead-T.json with --tag T). Rounds run
every mode in turn; the median is reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import report  # noqa: E402
from cluster import models  # noqa: E402
from coordinator.engine.request import GenerationRequest, Stats  # noqa: E402
from coordinator.placement.local import LocalWorkers  # noqa: E402
from coordinator.ring.builder import BuiltRing, build_ring  # noqa: E402
from coordinator.ring.supervisor import StaticWorkers  # noqa: E402
from coordinator.service import EngineOptions, open_drafter, start_engine  # noqa: E402
from coordinator.speculation.drafting import Drafter  # noqa: E402
from coordinator.speculation.gamma import FREE_DRAFT, GammaConfig  # noqa: E402
from coordinator.speculation.ngram import NgramDrafter  # noqa: E402
from coordinator.tokenizer import Tokenizer  # noqa: E402

EDIT = """Rename the function `area` to `rect_area` in this code and print the whole \
file again, changing nothing else:

```python
import math


def area(width: float, height: float) -> float:
    \"\"\"Area of a rectangle.\"\"\"
    if width < 0 or height < 0:
        raise ValueError("negative side")
    return width * height


def perimeter(width: float, height: float) -> float:
    return 2 * (width + height)


def circle(radius: float) -> float:
    return math.pi * radius * radius


def describe(width: float, height: float) -> str:
    a = area(width, height)
    p = perimeter(width, height)
    return f"{width}x{height}: area {a}, perimeter {p}"


if __name__ == "__main__":
    for w, h in [(1, 2), (3, 4), (5, 6)]:
        print(describe(w, h), circle(w))
```"""
FREE = "Write a Python class for an LRU cache with get and put, with docstrings and tests."


@dataclass(frozen=True)
class Workload:
    name: str
    prompt: str
    draft: str  # "ngram" or "model"
    gamma: int | None  # fixed γ; None: adaptive (costs measured at start)


WORKLOADS = {
    "e": Workload("e: edit, n-gram, γ 4", EDIT, "ngram", 4),
    "e-adaptive": Workload("e: edit, n-gram, adaptive γ", EDIT, "ngram", None),
    "f": Workload("f: free code, n-gram, adaptive γ", FREE, "ngram", None),
    "g": Workload("g: free code, draft model, γ 4", FREE, "model", 4),
}


@dataclass
class Run:
    stats: Stats
    tokens: list[int]
    compute_ms: list[float]  # mean llama_decode time of a decode window, per worker


def generate(built: BuiltRing, tokenizer: Tokenizer, drafter: Drafter | None,
             gamma: GammaConfig, prompt: list[int], n_tokens: int) -> Run:
    # A fixed γ and depth (or no drafter) need no costs; adaptive ones are measured first.
    fixed = gamma.fixed is not None and gamma.depth is not None
    costs = FREE_DRAFT if drafter is None or fixed else None
    if drafter is not None:
        # Every mode starts cold: the draft model shared by the modes would otherwise
        # reuse its cache of the same prompt from the mode before, whose numbers (other
        # batch shapes) can move its guesses at a near tie (4.43 against 4.27 tokens a
        # step on (g), by which mode ran before).
        drafter.release(0)
    engine = start_engine(built, tokenizer, "bench", drafter, EngineOptions(gamma=gamma),
                          costs=costs)
    try:
        done = engine.generate(GenerationRequest(prompt, n_tokens, ignore_eos=True))
        # Decode windows only (the prompt's chunks are far bigger).
        decode = [t for t in engine.core.timings
                  if t.stage_ms and t.rows <= 17 and not t.skipped_rows]
        per_worker = [list(t.stage_ms.values()) for t in decode]
        compute = [statistics.mean(w) for w in zip(*per_worker, strict=True)] \
            if per_worker else []
        return Run(done.stats, done.tokens, compute)
    finally:
        engine.close()


def summary(runs: list[Run]) -> dict[str, object]:
    med = statistics.median(r.stats.tok_s for r in runs)
    last, compute = runs[-1].stats, runs[-1].compute_ms
    # Early cancellation: a stale window costs every stage a window's compute, but the
    # last worker skips it when its own verdict broke the chain. What that saves, in
    # stage-ms (estimated at the workers' mean decode-window time) and as a share of the
    # stale windows' compute.
    stale_ms = last.stale_windows * sum(compute)
    saved_ms = last.skipped_windows * compute[-1] if compute else 0.0
    return {"tok_s": round(med, 3), "samples": [round(r.stats.tok_s, 3) for r in runs],
            "tokens_per_step": round(last.tokens_per_step, 3),
            "windows": last.steps + last.stale_windows, "ahead_windows": last.ahead_windows,
            "stale_windows": last.stale_windows, "skipped_windows": last.skipped_windows,
            "stale_compute_ms": round(stale_ms, 1),
            "cancel_saved_ms": round(saved_ms, 1),
            "cancel_saved_share": round(saved_ms / stale_ms, 3) if stale_ms else 0.0,
            # Each worker's compute for a decode window (the skipped ones not counted):
            # grows when both stages compute at once on cores that slow each other.
            "window_compute_ms": [round(x, 1) for x in compute]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=240)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS),
                        choices=list(WORKLOADS))
    parser.add_argument("--tag", default="", help="write bench/results/runahead-TAG.json")
    parser.add_argument("--core", type=int, default=0, choices=[0, 1],
                        help="the coordinator's core (and the single process's): beside "
                             "the first stage (0) or the last (1)")
    args = parser.parse_args()
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    os.sched_setaffinity(0, {args.core})  # the coordinator (and the single process)
    model = models.fetch(models.DEMO_TARGET, progress=False)
    tokenizer = Tokenizer(model)
    results: dict[str, dict[str, object]] = {}
    with ExitStack() as stack:
        workers = stack.enter_context(LocalWorkers(2, pin=True, cores=[0, 1]))
        # The planner's split, as serve uses: it balances a decode step's compute (the
        # last stage's output head weighs as much as several layers), and a pipeline of
        # windows runs at its slowest stage.
        pair = build_ring(model, workers=StaticWorkers(workers.addresses, workers.token, None),
                          ctx=2048, threads=1)
        stack.callback(pair.close)
        single = build_ring(model, stages=1, ctx=2048, threads=1)
        stack.callback(single.close)
        model_drafter = open_drafter("model", "demo", model, 2048, 1, 1)
        assert model_drafter is not None
        stack.callback(model_drafter.close)
        for key in args.workloads:
            w = WORKLOADS[key]
            prompt = tokenizer.encode(tokenizer.chat_prompt([{"role": "user",
                                                              "content": w.prompt}]))
            runs: dict[str, list[Run]] = {}
            tokens: dict[str, list[int]] = {}
            for _ in range(args.rounds):
                modes = (("single_plain", single, None, None),
                         ("single", single, w.draft, 1), ("sync", pair, w.draft, 1),
                         ("ahead", pair, w.draft, None))
                for mode, built, draft, depth in modes:
                    drafter: Drafter | None = None if draft is None else (
                        NgramDrafter() if draft == "ngram" else model_drafter)
                    gamma = GammaConfig(fixed=w.gamma, depth=depth)
                    run = generate(built, tokenizer, drafter, gamma, prompt, args.tokens)
                    st, tokens[mode] = run.stats, run.tokens
                    runs.setdefault(mode, []).append(run)
                    print(f"{key} {mode}: {st.tok_s:.2f} tok/s, {st.tokens_per_step:.2f} "
                          f"tokens/step, {st.ahead_windows} ahead, {st.stale_windows} stale, "
                          f"{st.skipped_windows} skipped", file=sys.stderr, flush=True)
            out = {mode: summary(r) for mode, r in runs.items()}
            rate = {mode: float(v["tok_s"]) for mode, v in out.items()}  # type: ignore[arg-type]
            results[key] = {
                "workload": w.name, "prompt_tokens": len(prompt), **out,
                "ahead_vs_sync": round(rate["ahead"] / rate["sync"], 3),
                "ahead_vs_single": round(rate["ahead"] / rate["single"], 3),
                "sync_vs_single": round(rate["sync"] / rate["single"], 3),
                "single_vs_plain": round(rate["single"] / rate["single_plain"], 3),
                "same_tokens": {m: t == tokens["single_plain"] for m, t in tokens.items()},
            }
    name = f"runahead-{args.tag}" if args.tag else "runahead"
    report(name, {"bench": "runahead", "model": model.name, "tokens": args.tokens,
                  "rounds": args.rounds, "coordinator_core": args.core,
                  "early_cancellation": "the last worker skips a stale window when its own "
                                        "verdict broke the window's chain; the stages "
                                        "before it compute every window",
                  "workloads": results})


if __name__ == "__main__":
    main()
