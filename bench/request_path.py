"""How much of specshard one request goes through: project functions and thread hand-offs
to the first token and per later token, counted on a real request.

    python bench/request_path.py [--tokens 16] [--root DIR]

Everything runs in this process so one profiler sees it all: two gRPC workers on their
own event-loop threads (the demo target's two halves, over loopback), the engine, the
HTTP API, and an httpx client streaming one greedy completion. Every call of a Python
function defined under `cluster/`, `coordinator/` or `worker/` (generated protobuf code
left out) is recorded with its thread; a "hand-off" is a change of thread between two
consecutive recorded calls. The first window runs from sending the request to its first
streamed chunk; each later window from one chunk to the next. `--root` counts another
checkout (e.g. a `git worktree` of an earlier commit) with this same script.
Prints JSON (also written to bench/results/request_path.json).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

HERE = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--root", type=Path, default=HERE, help="the checkout to count")
    args = parser.parse_args()
    root = args.root.resolve()
    sys.path.insert(0, str(root))
    if root != HERE:
        sys.path.insert(1, str(HERE))  # bench.machine, for the report
    from bench.machine import report

    counts = count(root, args.tokens)
    report("request_path" if root == HERE else "request_path_other",
           {"root": str(root), "tokens": args.tokens, **counts})


def count(root: Path, n_tokens: int) -> dict[str, Any]:
    import httpx

    from cluster import models
    from coordinator.api.app import ServerState, create_app
    from coordinator.api.server import ServerThread
    from coordinator.ring.builder import build_ring
    from coordinator.ring.supervisor import StaticWorkers
    from coordinator.service import start_engine
    from coordinator.speculation.gamma import FREE_DRAFT
    from coordinator.tokenizer import Tokenizer
    from worker.options import WorkerOptions
    from worker.server import start_worker

    model = models.demo_path(models.DEMO_TARGET)
    packages = tuple(str(root / p) + "/" for p in ("cluster", "coordinator", "worker"))
    generated = str(root / "cluster" / "wire") + "/"
    calls: list[tuple[int, int, str]] = []
    recording = threading.Event()

    def profile(frame: FrameType, event: str, _arg: object) -> None:
        if event != "call" or not recording.is_set():
            return
        file = frame.f_code.co_filename
        if file.startswith(packages) and not file.startswith(generated):
            calls.append((time.perf_counter_ns(), threading.get_ident(),
                          f"{file[len(str(root)) + 1:]}:{frame.f_code.co_qualname}"))

    threading.setprofile(profile)  # every thread started from here on
    sys.setprofile(profile)

    loops = []

    def serve_worker(ready: list[Any]) -> None:
        loop = asyncio.new_event_loop()
        loops.append(loop)
        running = loop.run_until_complete(start_worker(WorkerOptions()))
        ready.append(running)
        loop.run_forever()

    workers = []
    for _ in range(2):
        ready: list[Any] = []
        threading.Thread(target=serve_worker, args=(ready,), daemon=True).start()
        while not ready:
            time.sleep(0.01)
        workers.append(ready[0])
    from cluster.stage_cut import split_at

    built = build_ring(model, workers=StaticWorkers(
        [f"127.0.0.1:{w.port}" for w in workers], None, None), ctx=512, threads=2,
        split=split_at(28, [14]))
    tokenizer = Tokenizer(model)
    engine = start_engine(built, tokenizer, "demo", costs=FREE_DRAFT)
    marks: list[int] = []
    try:
        with ServerThread(create_app(ServerState(engine=engine))) as server:
            body = {"model": "", "prompt": "def fibonacci(n):", "max_tokens": n_tokens,
                    "temperature": 0, "stream": True}
            for record in (False, True):  # a warm-up request, then the counted one
                recording.set() if record else recording.clear()
                marks.clear()
                marks.append(time.perf_counter_ns())
                with httpx.stream("POST", server.url + "/v1/completions", json=body,
                                  timeout=300) as reply:
                    for line in reply.iter_lines():
                        if line.startswith("data: {"):
                            marks.append(time.perf_counter_ns())
            recording.clear()
    finally:
        sys.setprofile(None)
        threading.setprofile(None)  # type: ignore[arg-type]
        engine.close()
        built.close()
        for w, loop in zip(workers, loops, strict=True):
            asyncio.run_coroutine_threadsafe(w.stop(0), loop).result(30)
            loop.call_soon_threadsafe(loop.stop)

    windows = [[c for c in calls if lo <= c[0] < hi]
               for lo, hi in zip(marks, marks[1:], strict=False)]
    first, later = windows[0], windows[1:-1]  # the last chunk is the finish, not a token

    def handoffs(window: list[tuple[int, int, str]]) -> int:
        return sum(1 for a, b in zip(window, window[1:], strict=False) if a[1] != b[1])

    return {
        "first_token": {"functions": len({c[2] for c in first}), "calls": len(first),
                        "thread_handoffs": handoffs(first)},
        "later_token_median": {
            "functions": statistics.median(len({c[2] for c in w}) for w in later),
            "calls": statistics.median(len(w) for w in later),
            "thread_handoffs": statistics.median(handoffs(w) for w in later)},
        "windows": len(windows),
    }


if __name__ == "__main__":
    main()
