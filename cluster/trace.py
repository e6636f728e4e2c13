"""Timestamps along a batch's path through the ring: where per-token overhead goes.

Off unless `SPECSHARD_TRACE` names a file prefix (`bench/overhead.py --parts hops` sets
it for its ring). Each process then keeps (point, batch id, time) in memory and writes
them to `<prefix>.<pid>.json` when it exits. Times are `time.perf_counter()`, which is
CLOCK_MONOTONIC on Linux: one clock for every process of a box, so one batch's points
in the coordinator and in each worker can be subtracted. Off, a point costs a call and a
test (~0.1 µs); on, an append more. A process keeps its last MAX_MARKS points (~100 MB),
so a traced server that runs for days does not grow without bound.

The points, in a batch's order: coordinator `submit` → `write`, worker `in` → `compute`
→ `computed` (→ `judged` on the last stage) → `send` → `sent`, coordinator `read` →
`verdict`.
"""

from __future__ import annotations

import atexit
import json
import os
import time
from collections import deque
from pathlib import Path

ENV = "SPECSHARD_TRACE"
_prefix = os.environ.get(ENV) or None
MAX_MARKS = 1_000_000
_marks: deque[tuple[str, int, float]] = deque(maxlen=MAX_MARKS)


def mark(point: str, batch_id: int) -> None:
    if _prefix is not None:
        _marks.append((point, batch_id, time.perf_counter()))


def start(prefix: str) -> None:
    """Trace this process from now on (`stop()` returns its points) and every process
    started after with this environment (they write `<prefix>.<pid>.json` at exit)."""
    global _prefix
    os.environ[ENV] = _prefix = prefix
    _marks.clear()


def stop() -> list[tuple[str, int, float]]:
    """Stop tracing this process (and its later children); its points so far."""
    global _prefix
    os.environ.pop(ENV, None)
    _prefix = None
    taken = list(_marks)
    _marks.clear()
    return taken


def _write() -> None:
    Path(f"{_prefix}.{os.getpid()}.json").write_text(json.dumps(list(_marks)))


if _prefix is not None:
    atexit.register(_write)
