"""How much a batch's shape moves the target's logits: the noise under speculative output.

    python bench/batch_numerics.py [--tokens 64] [--batch 5]

Decodes greedily one token at a time on the demo target (one in-process stage, which is
bit-identical to the gRPC ring), keeping each position's logits; then feeds the same
tokens again in batches of `--batch` — the shape of a verify step with γ = batch − 1 — and
compares. Reports the largest logit change, how far the top-2 margin of the same
position moves, and where the argmax flips. Prints JSON (also bench/results/).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import report  # noqa: E402
from cluster import models  # noqa: E402
from cluster.messages import Slice  # noqa: E402
from cluster.stage_cut import even_split  # noqa: E402
from coordinator.ring.local_ring import LocalRing  # noqa: E402
from coordinator.tokenizer import Tokenizer  # noqa: E402

PROMPT = "Write a C function that parses a decimal integer from a string, with overflow checks."


def margin(row: np.ndarray) -> float:
    top = np.partition(row, -2)[-2:]
    return float(top[1] - top[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=5)
    args = parser.parse_args()
    model = models.fetch(models.DEMO_TARGET, progress=False)
    tokenizer = Tokenizer(model)
    prompt = tokenizer.encode(tokenizer.chat_prompt([{"role": "user", "content": PROMPT}]))
    stage = LocalRing.load(model, even_split(28, 1), n_ctx=1024, n_threads=2).stages[0]

    def logits(start: int, tokens: list[int], every_row: bool = False) -> list[np.ndarray]:
        piece = Slice(0, start, tokens, n_draft=len(tokens) - 1 if every_row else 0)
        out = stage.forward([piece])
        assert isinstance(out, list)
        return list(out[0])

    one_by_one, tokens = [], []
    row = logits(0, prompt)[-1]
    for i in range(args.tokens):  # logits after prompt + tokens[:i], one token at a time
        tokens.append(int(np.argmax(row)))
        one_by_one.append(row)
        row = logits(len(prompt) + i, tokens[-1:])[-1]
    # Verify-shaped batches: [last accepted, next batch−1 tokens], logits for every row.
    # The prompt's last token is fed again so row i predicts the same token as above.
    stage.truncate(0, len(prompt) - 1)
    batched: list[np.ndarray] = []
    feed, pos = [prompt[-1], *tokens], len(prompt) - 1
    while len(batched) < args.tokens:
        chunk = feed[len(batched):len(batched) + args.batch]
        batched.extend(logits(pos, chunk, every_row=True))
        pos += len(chunk)
    batched = batched[:args.tokens]
    pairs = list(zip(one_by_one, batched, strict=True))
    deltas = [float(np.max(np.abs(a - b))) for a, b in pairs]
    moves = [abs(margin(a) - margin(b)) for a, b in pairs]
    flips = [{"position": i, "margin_one_by_one": round(margin(a), 4)}
             for i, (a, b) in enumerate(pairs) if int(np.argmax(a)) != int(np.argmax(b))]
    result = {
        "bench": "batch_numerics", "model": model.name, "tokens": args.tokens,
        "batch": args.batch, "bit_identical_positions": sum(d == 0.0 for d in deltas),
        "max_abs_logit_delta": round(max(deltas), 4),
        "margin_move_max": round(max(moves), 4),
        "margin_move_median": round(float(np.median(moves)), 4),
        "argmax_flips": flips,
    }
    report("batch_numerics", result)


if __name__ == "__main__":
    main()
