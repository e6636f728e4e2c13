"""Chat clients arriving spread over a window, each on a thread of its own."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import openai


def spread_clients(url: str, n: int, spread: float,
                   chat: Callable[[openai.OpenAI, int], None]) -> float:
    """Run `chat(client, i)` for i = 0 … n-1, each with its own `openai` client to `url`,
    client i starting spread·i/n seconds after an origin half a second from now; return
    the origin (time.perf_counter). A client that fails makes the run invalid: SystemExit.
    """
    origin = time.perf_counter() + 0.5
    errors: list[BaseException] = []

    def one(i: int) -> None:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=1800,
                               max_retries=0)
        time.sleep(max(origin + spread * i / n - time.perf_counter(), 0.0))
        try:
            chat(client, i)
        except BaseException as exc:  # reported, not swallowed: the run is invalid
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"{len(errors)} client(s) failed: {errors[0]!r}")
    return origin
