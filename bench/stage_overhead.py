"""Tokens/s of the demo target as 1 in-process stage vs 2: what cutting costs.

    python bench/stage_overhead.py [--tokens 64] [--rounds 3] [--threads 2]

Rounds alternate 1 and 2 stages so drift on a shared machine hits both alike; the
median of each is reported. Prints JSON (also written to bench/results/).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import report  # noqa: E402
from cluster import models  # noqa: E402
from cluster.sampling import SamplingParams  # noqa: E402
from cluster.stage_cut import even_split  # noqa: E402
from coordinator.generate import generate  # noqa: E402
from coordinator.local_pipeline import LocalPipeline  # noqa: E402
from coordinator.tokenizer import Tokenizer  # noqa: E402

PROMPT = "Write a Python function that parses an ISO 8601 date string without libraries."


def decode_rate(pipeline: LocalPipeline, prompt: list[int], n_tokens: int) -> float:
    never_end = lambda _token: False  # noqa: E731 — fixed length for a fair rate
    result = generate(pipeline, prompt, n_tokens, SamplingParams(), never_end)
    pipeline.reset(0)
    return result.stats.tok_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model = models.fetch(models.DEMO_TARGET, progress=False)
    tokenizer = Tokenizer(model)
    prompt = tokenizer.encode(tokenizer.chat_prompt([{"role": "user", "content": PROMPT}]))
    pipelines = {n: LocalPipeline.load(model, even_split(28, n), n_ctx=1024,
                                       n_threads=args.threads) for n in (1, 2)}
    rates: dict[int, list[float]] = {1: [], 2: []}
    for n in (1, 2):  # warm-up: first decode pays page faults and repacking
        decode_rate(pipelines[n], prompt, 8)
    for _ in range(args.rounds):
        for n in (1, 2):
            rates[n].append(decode_rate(pipelines[n], prompt, args.tokens))
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    result = {
        "bench": "stage_overhead", "model": model.name, "tokens": args.tokens,
        "threads": args.threads, "rounds": args.rounds,
        "one_stage_tok_s": round(one, 2), "two_stage_tok_s": round(two, 2),
        "ratio": round(two / one, 3), "samples": rates,
    }
    report("stage_overhead", result)


if __name__ == "__main__":
    main()
