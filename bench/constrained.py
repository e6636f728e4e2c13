"""Constrained decoding: what a mask costs, and tok/s with and without a schema.

    python bench/constrained.py [--tokens 64] [--gamma 4] [--skip-decode]

(1) The coordinator's mask per judged row (llguidance over the demo target's 151,936-token
vocabulary), walking real replies token by token: a nested JSON schema, a GBNF grammar,
a forced tool call; and the last worker's cost to apply one (−inf outside it) and its
bytes on the wire. Target: ≤ 0.2 ms a row. (2) Greedy decoding on the demo target over
2 local gRPC workers (pinned one core each where the machine allows), 4 prompts, without
and with a JSON schema, without and with the demo draft model (fixed γ): tok/s and
tokens per target step. Prints JSON (also written to bench/results/constrained.json).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

# Before llama.cpp's OpenMP runtime starts, as `specshard` does (cluster/cli.py).
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from bench.machine import report  # noqa: E402
from cluster import models  # noqa: E402
from cluster.constrain import masked  # noqa: E402
from cluster.sampling import SamplingParams  # noqa: E402
from cluster.stage_cut import split_at  # noqa: E402
from coordinator.constrain import (  # noqa: E402
    GrammarSpec,
    build_constraint,
    gbnf_grammar,
    json_schema_grammar,
    tool_call_grammar,
)
from coordinator.constrain.state import single_token  # noqa: E402
from coordinator.engine.request import GenerationRequest  # noqa: E402
from coordinator.placement.local import LocalWorkers  # noqa: E402
from coordinator.ring.builder import build_ring  # noqa: E402
from coordinator.service import EngineOptions, start_engine  # noqa: E402
from coordinator.speculation.draft import DraftConfig, DraftModel  # noqa: E402
from coordinator.speculation.gamma import FREE_DRAFT, GammaConfig  # noqa: E402
from coordinator.tokenizer import Tokenizer  # noqa: E402

SCHEMA = {
    "type": "object", "additionalProperties": False,
    "required": ["title", "parts", "price"],
    "properties": {
        "title": {"type": "string"},
        "parts": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["name", "color"],
            "properties": {"name": {"type": "string"},
                           "color": {"enum": ["red", "green", "blue"]}}}},
        "price": {"anyOf": [{"type": "integer"}, {"type": "null"}]}}}
REPLY = ('{"title": "Toy robot", "parts": [{"name": "arm", "color": "red"}, '
         '{"name": "wheel", "color": "blue"}, {"name": "head", "color": "green"}], '
         '"price": 42}')
GBNF = 'root ::= ("yes" | "no") ", " [a-z ]{2,40} "."'
GBNF_REPLY = "yes, because the sky scatters blue light."
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"]}}}
TOOL_REPLY = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", ' \
             '"unit": "celsius"}}\n</tool_call>'
PROMPTS = ("Describe a toy robot as JSON.", "Describe a bicycle as JSON.",
           "Describe a kite as JSON.", "Describe a lamp as JSON.")


def mask_costs(tokenizer: Tokenizer) -> dict[str, object]:
    t0 = time.perf_counter()
    build_constraint(json_schema_grammar({"type": "object"}), tokenizer)
    first_build_s = time.perf_counter() - t0
    cases: list[tuple[str, GrammarSpec, str]] = [
        ("json_schema", json_schema_grammar(SCHEMA), REPLY),
        ("gbnf", gbnf_grammar(GBNF), GBNF_REPLY),
        ("tool_call", tool_call_grammar([TOOL], None, False,
                                        single_token(tokenizer, "<tool_call>"),
                                        single_token(tokenizer, "</tool_call>")), TOOL_REPLY),
    ]
    out: dict[str, object] = {"vocab": tokenizer.n_vocab,
                              "llguidance_tokenizer_build_s": round(first_build_s, 3)}
    rng = np.random.default_rng(0)
    row = rng.normal(0, 3, tokenizer.n_vocab).astype(np.float32)
    for name, spec, reply in cases:
        t0 = time.perf_counter()
        constraint = build_constraint(spec, tokenizer)
        compile_ms = 1000 * (time.perf_counter() - t0)
        tokens = tokenizer.encode(reply, add_bos=False)
        times, apply, n_bytes = [], [], 0
        for token in tokens:
            t0 = time.perf_counter()
            mask = constraint.matcher.compute_bitmask()
            times.append(1000 * (time.perf_counter() - t0))
            n_bytes = len(mask)
            t0 = time.perf_counter()
            masked(row, mask)
            apply.append(1000 * (time.perf_counter() - t0))
            constraint.advance([token])
        out[name] = {"compile_ms": round(compile_ms, 2), "rows": len(times),
                     "mask_ms_median": round(statistics.median(times), 4),
                     "mask_ms_p90": round(float(np.percentile(times, 90)), 4),
                     "mask_ms_max": round(max(times), 4),
                     "apply_ms_median": round(statistics.median(apply), 4),
                     "bytes_per_row": n_bytes}
    return out


def decode(tokenizer: Tokenizer, n_tokens: int, gamma: int, draft_path: Path) -> dict[str, object]:
    target = models.demo_path(models.DEMO_TARGET)
    workers = LocalWorkers(2).start()
    built = build_ring(target, workers=workers, ctx=1024, threads=1,
                       split=split_at(28, [14]))
    drafter = DraftModel(DraftConfig(draft_path, n_ctx=1024, n_threads=1))
    prompts = [tokenizer.encode(tokenizer.chat_prompt([{"role": "user", "content": p}]))
               for p in PROMPTS]
    rows = []
    try:
        for draft in (False, True):
            engine = start_engine(built, tokenizer, "bench", drafter if draft else None,
                                  EngineOptions(gamma=GammaConfig(fixed=gamma)),
                                  costs=FREE_DRAFT)
            try:
                for schema in (False, True):
                    runs = []
                    for prompt in prompts:
                        constraint = build_constraint(json_schema_grammar(SCHEMA), tokenizer) \
                            if schema else None
                        g = engine.generate(GenerationRequest(
                            prompt, n_tokens, SamplingParams(), constraint=constraint))
                        runs.append(g)
                    n = sum(g.stats.n_tokens - 1 for g in runs)
                    rows.append({
                        "draft": f"model γ={gamma}" if draft else "none",
                        "schema": schema,
                        "tokens": sum(g.stats.n_tokens for g in runs),
                        "tok_s": round(n / sum(g.stats.decode_s for g in runs), 2),
                        "tokens_per_step": round(statistics.mean(
                            g.stats.tokens_per_step for g in runs), 3),
                        "finish": [g.finish_reason for g in runs]})
                    print(rows[-1], flush=True)
            finally:
                engine.close()
    finally:
        drafter.close()
        built.close()
    return {"prompts": list(PROMPTS), "max_tokens": n_tokens, "runs": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--skip-decode", action="store_true")
    args = parser.parse_args()
    tokenizer = Tokenizer(models.demo_path(models.DEMO_TARGET))
    result: dict[str, object] = {"mask": mask_costs(tokenizer)}
    print(result, flush=True)
    if not args.skip_decode:
        result["decode"] = decode(tokenizer, args.tokens, args.gamma,
                                  models.demo_path(models.DEMO_DRAFT))
    report("constrained", result)


if __name__ == "__main__":
    main()
