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
from coordinator.engine.frontend import Engine  # noqa: E402
from coordinator.engine.request import GenerationRequest  # noqa: E402
from coordinator.ring.builder import build_ring  # noqa: E402
from coordinator.service import start_engine  # noqa: E402
from coordinator.speculation.gamma import FREE_DRAFT  # noqa: E402
from coordinator.tokenizer import Tokenizer  # noqa: E402

PROMPT = "Write a Python function that parses an ISO 8601 date string without libraries."


def decode_rate(engine: Engine, prompt: list[int], n_tokens: int) -> float:
    result = engine.generate(GenerationRequest(prompt, n_tokens, ignore_eos=True))
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
    rings = {n: build_ring(model, stages=n, ctx=1024, threads=args.threads) for n in (1, 2)}
    engines = {n: start_engine(ring, tokenizer, "bench", costs=FREE_DRAFT)
               for n, ring in rings.items()}
    rates: dict[int, list[float]] = {1: [], 2: []}
    for n in (1, 2):  # warm-up: first decode pays page faults and repacking
        decode_rate(engines[n], prompt, 8)
    for _ in range(args.rounds):
        for n in (1, 2):
            rates[n].append(decode_rate(engines[n], prompt, args.tokens))
    for n in (1, 2):
        engines[n].close()
        rings[n].close()
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
