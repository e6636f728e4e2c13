"""A multi-turn chat as a chat client sends it: does the next turn wait only for its own
new tokens?

    python bench/turns.py [--turns 5] [--answer-tokens 48] [--system-repeats 42]

`serve`'s engine and HTTP API in this process, 2 gRPC workers pinned to cores 0 and 1
(one box per worker), the demo target; the real `openai` client streams each turn
greedily and resends the whole conversation (a ~1,600-token system prompt, the user
turns and the answers so far), as chat clients do. Per turn: time to first token, the
prompt tokens the ring computed and those found in a slot's caches (from `/metrics`).
Run twice: with prompt reuse (the default) and with `cache_prompt` off.
The reference for each warm turn is the time to first token of a cold request whose
prompt is only that turn's new tokens (its prefill plus one decode step).
Targets: from turn 2 on, time to first token ≤ 1.5× that reference and ≤ 0.15× turn 1's.
Prints JSON (also bench/results/turns.json).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # as `specshard` sets it (cluster/cli.py)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import openai  # noqa: E402

from bench.machine import report  # noqa: E402
from cluster import models  # noqa: E402
from coordinator.api.app import ServerState, create_app  # noqa: E402
from coordinator.api.server import ServerThread  # noqa: E402
from coordinator.engine.frontend import Engine  # noqa: E402
from coordinator.engine.request import GenerationRequest  # noqa: E402
from coordinator.placement.local import LocalWorkers  # noqa: E402
from coordinator.ring.builder import build_ring  # noqa: E402
from coordinator.service import EngineOptions, start_engine  # noqa: E402
from coordinator.tokenizer import Tokenizer  # noqa: E402

SYSTEM_LINE = ("You review pull requests for a Python service that schedules jobs on a "
               "cluster: point out bugs, races, missing tests and unclear names, briefly, "
               "with the smallest code change that fixes each. ")
QUESTIONS = ["What should I check first in a scheduler's retry loop?",
             "How do I test that a cancelled job frees its slot?",
             "Is a lock around the whole step too coarse?",
             "How would you name the function that picks the next job?",
             "What metrics would you export for it?",
             "Summarise your advice in three bullet points."]
TARGET_VS_NEW = 1.5
TARGET_VS_FIRST = 0.15


def counter(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def turn(client: openai.OpenAI, url: str, messages: list[dict[str, str]], max_tokens: int,
         cache: bool) -> tuple[dict[str, Any], str]:
    reused0 = counter(url, "specshard_prompt_tokens_reused_total")
    computed0 = counter(url, "specshard_prompt_tokens_computed_total")
    t0 = time.perf_counter()
    ttft, text = None, []
    stream = client.chat.completions.create(
        model="", messages=messages, max_tokens=max_tokens, temperature=0, stream=True,  # type: ignore[arg-type]
        extra_body={"cache_prompt": cache})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if ttft is None:
                ttft = time.perf_counter() - t0
            text.append(chunk.choices[0].delta.content)
    return {"ttft_s": round(ttft or 0.0, 3),
            "prompt_computed": int(counter(url, "specshard_prompt_tokens_computed_total")
                                   - computed0),
            "prompt_reused": int(counter(url, "specshard_prompt_tokens_reused_total")
                                 - reused0)}, "".join(text)


def new_tokens_ttft(engine: Engine, n: int) -> float:
    """First token of a cold request of `n` prompt tokens: a turn's prefill alone."""
    tokens = engine.tokenizer.encode(" ".join(["review"] * n), add_bos=False)[:n]
    t0 = time.perf_counter()
    for _event in engine.run(GenerationRequest(tokens, 1, cache_prompt=False)):
        break
    return time.perf_counter() - t0


def conversation(url: str, engine: Engine, system: str, turns: int, answer_tokens: int,
                 cache: bool) -> list[dict[str, Any]]:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=900, max_retries=0)
    messages = [{"role": "system", "content": system}]
    rows = []
    for k in range(turns):
        messages.append({"role": "user", "content": QUESTIONS[k % len(QUESTIONS)]})
        row, answer = turn(client, url, messages, answer_tokens, cache)
        row["turn"] = k + 1
        if cache and k > 0:
            row["new_tokens_ttft_s"] = round(new_tokens_ttft(engine, row["prompt_computed"]),
                                             3)
        rows.append(row)
        messages.append({"role": "assistant", "content": answer})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--answer-tokens", type=int, default=48)
    parser.add_argument("--system-repeats", type=int, default=42,
                        help="system prompt length, in repeats of a ~38-token paragraph")
    args = parser.parse_args()
    model = models.demo_path(models.DEMO_TARGET)
    tokenizer = Tokenizer(model)
    system = SYSTEM_LINE * args.system_repeats
    workers = LocalWorkers(2, pin=True, cores=[0, 1]).start()
    os.sched_setaffinity(0, {0})  # the coordinator shares core 0 with worker 0
    result: dict[str, Any] = {}
    try:
        built = build_ring(model, workers=workers, ctx=4096, parallel=2, threads=1)
        engine = start_engine(built, tokenizer, "demo", options=EngineOptions())
        try:
            with ServerThread(create_app(ServerState(engine=engine))) as server:
                result["system_prompt_tokens"] = len(tokenizer.encode(system))
                result["reuse"] = conversation(server.url, engine, system, args.turns,
                                               args.answer_tokens, cache=True)
                result["no_reuse"] = conversation(server.url, engine, system, args.turns,
                                                  args.answer_tokens, cache=False)
        finally:
            engine.close()
            built.close()
    finally:
        workers.stop()
    warm, first = result["reuse"][1:], result["reuse"][0]["ttft_s"]
    result["targets"] = {
        "ttft_vs_new_tokens_max": round(max(r["ttft_s"] / r["new_tokens_ttft_s"]
                                            for r in warm), 3),
        "ttft_vs_new_tokens_target": TARGET_VS_NEW,
        "ttft_vs_turn1_max": round(max(r["ttft_s"] for r in warm) / first, 3),
        "ttft_vs_turn1_target": TARGET_VS_FIRST}
    result["met"] = (result["targets"]["ttft_vs_new_tokens_max"] <= TARGET_VS_NEW
                     and result["targets"]["ttft_vs_turn1_max"] <= TARGET_VS_FIRST)
    report("turns", result)


if __name__ == "__main__":
    main()
