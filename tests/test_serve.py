"""The served cluster end to end: Ray workers, the OpenAI API, a killed worker, load."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from coordinator.api import ServerState, create_app
from coordinator.server import ServerThread
from coordinator.service import RunningCluster, start_cluster
from coordinator.settings import ServeSettings

pytestmark = pytest.mark.slow
KEY = "test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def served(demo_target: Path) -> Iterator[tuple[str, RunningCluster]]:
    settings = ServeSettings(model=str(demo_target), local_workers=2, ctx=1024, parallel=4,
                             queue_size=16, threads=1)
    cluster = start_cluster(settings)
    try:
        state = ServerState(engine=cluster.engine, api_key=KEY, cluster_info=cluster.describe)
        with ServerThread(create_app(state)) as server:
            yield server.url, cluster
    finally:
        cluster.close()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, timeout=300, max_retries=0)


def chat(url: str, prompt: str, max_tokens: int) -> str:
    reply = client(url).chat.completions.create(
        model="", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
        temperature=0)
    return reply.choices[0].message.content or ""


def test_cluster_endpoint_shows_workers_and_plan(served):
    url, cluster = served
    info = httpx.get(url + "/v1/cluster", headers={"Authorization": f"Bearer {KEY}"},
                     timeout=30).json()
    assert [n["pid"] for n in info["nodes"]] == cluster.workers.pids()
    assert all(n["healthy"] for n in info["nodes"])
    layers = [n["layers"] for n in info["plan"]["nodes"]]
    assert layers[0][0] == 0 and layers[-1][1] == 28 and len(layers) == 2


def test_kill_9_of_a_worker_mid_stream_changes_nothing(served):
    url, cluster = served
    prompt = "Write a Python function that returns the n-th Fibonacci number."
    undisturbed = chat(url, prompt, 48)
    victim = cluster.workers.pids()[1]
    assert victim is not None
    stream = client(url).chat.completions.create(
        model="", messages=[{"role": "user", "content": prompt}], max_tokens=48,
        temperature=0, stream=True)
    text, killed = "", False
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
            if not killed and len(text) > 20:
                os.kill(victim, signal.SIGKILL)
                killed = True
    assert killed
    assert text == undisturbed
    assert cluster.workers.pids()[1] != victim  # Ray started a new worker process
    metrics = httpx.get(url + "/metrics", timeout=30).text
    restarts = [line for line in metrics.splitlines()
                if line.startswith("specshard_worker_restarts_total")]
    assert restarts and float(restarts[0].split()[-1]) >= 1


def test_sixteen_concurrent_requests_equal_their_solo_answers(served):
    url, _ = served
    prompts = [f"Write a one-line Python expression that computes {what}."
               for what in ("the sum of a list", "the maximum of a list", "a reversed string",
                            "the square of x", "the length of a dict", "a sorted copy",
                            "the first item", "the last item")] * 2
    solo = {p: chat(url, p, 24) for p in dict.fromkeys(prompts)}
    started = threading.Barrier(16, timeout=60)

    def together(prompt: str) -> str:
        started.wait()
        return chat(url, prompt, 24)

    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(together, prompts))
    assert time.monotonic() - t0 < 600
    different = [p for p, a in zip(prompts, answers, strict=True) if a != solo[p]]
    # Each request is its own sequence with its own KV stream and its own batches, so
    # sharing the ring does not change the arithmetic: every answer is its solo answer.
    assert different == []
