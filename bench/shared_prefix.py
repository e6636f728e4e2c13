"""Conversations that share a system prompt: copied between slots, or computed by each?

    python bench/shared_prefix.py [--clients 4] [--system-repeats 42] [--tokens 32]

(a) Served: `serve`'s engine and HTTP API in this process, 2 gRPC workers pinned to
cores 0 and 1 (one box per worker), the demo target, `--parallel` = clients. N chat
clients (the real `openai` client, greedy, streamed) with the same ~1,600-token system
prompt and a question each arrive spread over the first second, every slot cold; run
with prefix sharing (the default) and with `share_prefix` off. Reported: time to first
token p50/max, everything done, prompt tokens computed and copied (from `/metrics`).
(b) Where it pays: on one in-process stage holding the whole demo model, the cost of a
copy (llama.cpp copies a sequence's whole KV stream, whatever the prefix length) against
computing the prefix, by context size: the break-even prefix length.
Prints JSON (also bench/results/shared_prefix.json).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # as `specshard` sets it (cluster/cli.py)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import openai  # noqa: E402

from bench.clients import spread_clients  # noqa: E402
from bench.machine import report  # noqa: E402
from bench.turns import QUESTIONS, SYSTEM_LINE  # noqa: E402
from cluster import models  # noqa: E402
from cluster.gguf_file import read_header  # noqa: E402
from cluster.llama.stage import Stage, StageConfig  # noqa: E402
from cluster.messages import Slice  # noqa: E402
from cluster.model_info import model_info  # noqa: E402
from cluster.stage_cut import cut_stage  # noqa: E402
from coordinator.api.app import ServerState, create_app  # noqa: E402
from coordinator.api.server import ServerThread  # noqa: E402
from coordinator.placement.local import LocalWorkers  # noqa: E402
from coordinator.ring.builder import build_ring  # noqa: E402
from coordinator.service import EngineOptions, start_engine  # noqa: E402
from coordinator.tokenizer import Tokenizer  # noqa: E402


def counter(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def clients(url: str, system: str, n: int, n_tokens: int, spread: float) -> dict[str, Any]:
    ttft = [0.0] * n
    computed0 = counter(url, "specshard_prompt_tokens_computed_total")
    copied0 = counter(url, "specshard_prompt_tokens_copied_total")

    def one(client: openai.OpenAI, i: int) -> None:
        t0 = time.perf_counter()
        stream = client.chat.completions.create(
            model="", stream=True, max_tokens=n_tokens, temperature=0,
            messages=[{"role": "system", "content": system},
                      {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            extra_body={"ignore_eos": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and not ttft[i]:
                ttft[i] = time.perf_counter() - t0

    origin = spread_clients(url, n, spread, one)
    return {"ttft_s_p50": round(statistics.median(ttft), 3), "ttft_s_max": round(max(ttft), 3),
            "all_done_s": round(time.perf_counter() - origin, 3),
            "prompt_computed": int(counter(url, "specshard_prompt_tokens_computed_total")
                                   - computed0),
            "prompt_copied": int(counter(url, "specshard_prompt_tokens_copied_total")
                                 - copied0)}


def served(model: Path, tokenizer: Tokenizer, system: str, n: int, n_tokens: int,
           spread: float) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for share in (True, False):
        # Workers and a ring of their own per run: every slot starts cold.
        workers = LocalWorkers(2, pin=True, cores=[0, 1]).start()
        os.sched_setaffinity(0, {0})  # the coordinator shares core 0 with worker 0
        try:
            built = build_ring(model, workers=workers, ctx=4096, parallel=n, threads=1)
            engine = start_engine(built, tokenizer, "demo",
                                  options=EngineOptions(share_prefix=share))
            try:
                with ServerThread(create_app(ServerState(engine=engine))) as server:
                    result["share" if share else "no_share"] = clients(
                        server.url, system, n, n_tokens, spread)
            finally:
                engine.close()
                built.close()
        finally:
            workers.stop()
            os.sched_setaffinity(0, {0, 1})
    return result


def copy_cost(model: Path, tokenizer: Tokenizer, system: str, contexts: list[int]
              ) -> list[dict[str, Any]]:
    """One stage, both cores: a 1-row decode that first copies a prefix from another
    sequence, against the same decode alone, and the time to compute the prefix."""
    tokens = tokenizer.encode(system)
    rows = []
    path = cut_stage(model, 0, model_info(read_header(model)).n_layer)
    for n_ctx in contexts:
        stage = Stage(StageConfig(path, model_path=model, n_ctx=n_ctx, n_seq_max=2,
                                  n_threads=2))
        try:
            prefix = tokens[:min(len(tokens), n_ctx // 2)]
            t0 = time.perf_counter()
            stage.forward([Slice(0, 0, prefix)])
            prefill_s = time.perf_counter() - t0
            with_copy, alone = [], []
            for _ in range(5):
                t0 = time.perf_counter()
                stage.forward([Slice(1, len(prefix), prefix[-1:], copy_from=0)])
                with_copy.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                stage.forward([Slice(1, len(prefix) + 1, prefix[-1:])])
                alone.append(time.perf_counter() - t0)
            copy_ms = 1000 * (statistics.median(with_copy) - statistics.median(alone))
            per_token_ms = 1000 * prefill_s / len(prefix)
            rows.append({"n_ctx": n_ctx, "prefix_tokens": len(prefix),
                         "copy_ms": round(copy_ms, 2),
                         "prefill_ms_per_token": round(per_token_ms, 2),
                         "pays_from_tokens": max(1, round(copy_ms / per_token_ms))})
        finally:
            stage.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--system-repeats", type=int, default=42,
                        help="system prompt length, in repeats of a ~38-token paragraph")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--spread", type=float, default=1.0)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    args = parser.parse_args()
    model = models.demo_path(models.DEMO_TARGET)
    tokenizer = Tokenizer(model)
    system = SYSTEM_LINE * args.system_repeats
    result: dict[str, Any] = {
        "system_prompt_tokens": len(tokenizer.encode(system)), "clients": args.clients,
        "served": served(model, tokenizer, system, args.clients, args.tokens, args.spread),
        "copy_cost": copy_cost(model, tokenizer, system, args.contexts)}
    s = result["served"]
    result["speedup_all_done"] = round(s["no_share"]["all_done_s"] / s["share"]["all_done_s"],
                                       3)
    report("shared_prefix", result)


if __name__ == "__main__":
    main()
