"""Failures by cause, and a failure that stays with its request (docs/architecture.md):
a lost worker with no replacement is 503 with Retry-After, and the cluster comes back
with the worker; SIGTERM drains every stream to a clean end; a decode slower than the
health check is not a lost worker."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cluster.auth import write_token
from cluster.stage_cut import split_at
from coordinator.api.app import ServerState, create_app
from coordinator.api.server import ServerThread
from coordinator.engine.request import GenerationRequest
from coordinator.placement.local import LocalWorkers, worker_env
from coordinator.ring.builder import build_ring
from coordinator.ring.supervisor import StaticWorkers
from coordinator.service import EngineOptions, RunningCluster, start_cluster, start_engine
from coordinator.settings import ServeSettings
from coordinator.speculation.gamma import FREE_DRAFT
from coordinator.tokenizer import Tokenizer

WAIT = 120.0
# SIGTERM to exit, past the drain timeout: ending the streams, the HTTP server and the
# ring took 2.1-3.2 s over three runs on 2 cores; the rest is room for a slower machine.
EXIT_MARGIN_S = 8.0
CHAT = {"model": "", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
        "temperature": 0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None
                 ) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    pytest.fail(f"{url} not healthy within {timeout_s:.0f} s")


@pytest.fixture()
def static_served(tiny_chat_model: Path, tmp_path: Path
                  ) -> Iterator[tuple[str, RunningCluster, LocalWorkers]]:
    """serve over workers it does not run (`--worker`): a lost one is waited for (1 s a
    try here), never replaced."""
    with LocalWorkers(2) as workers:
        token = write_token(tmp_path / "token", workers.token)
        cluster = start_cluster(ServeSettings(
            model=str(tiny_chat_model), worker=workers.addresses, token_file=str(token),
            ctx=512, parallel=2, draft_mode="none", worker_wait=1.0))
        try:
            with ServerThread(create_app(ServerState(engine=cluster.engine))) as server:
                yield server.url, cluster, workers
        finally:
            cluster.close()


def test_a_lost_worker_with_no_replacement_is_503_until_it_comes_back(static_served):
    url, cluster, workers = static_served
    assert httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=WAIT).status_code == 200
    port = workers.addresses[1].rpartition(":")[2]
    workers.procs[1].kill()
    workers.procs[1].wait()
    # Admitted while the ring is rebuilt, it waits; the rebuilds fail: 503, retry later.
    reply = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=WAIT)
    assert reply.status_code == 503, reply.text
    assert reply.headers["Retry-After"] and reply.json()["error"]["type"] == "server_error"
    t0 = time.monotonic()
    down = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=WAIT)
    assert down.status_code == 503 and down.headers["Retry-After"]
    assert time.monotonic() - t0 < 2  # the ring is known down: no waiting
    health = httpx.get(url + "/health", timeout=10)
    assert health.status_code == 503 and health.json() == {"status": "down"}
    metrics = httpx.get(url + "/metrics", timeout=10).text
    assert 'specshard_ring_state{state="down"} 1.0' in metrics
    assert 'specshard_engine_failures_total{cause="cluster"}' in metrics
    # The worker comes back where it was: the ring is rebuilt and serves again.
    back = subprocess.Popen([sys.executable, "-m", "cluster.cli", "worker", "--listen",
                             f"127.0.0.1:{port}", "--token-file", str(workers.token_file),
                             "--parent-pid", str(os.getpid())], env=worker_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(url, 60)
        assert httpx.post(url + "/v1/chat/completions", json=CHAT,
                          timeout=WAIT).status_code == 200
        assert cluster.engine.core.state.value == "running"
    finally:
        back.terminate()
        back.wait(timeout=30)


def read_stream(response: httpx.Response, events: list[object], started: threading.Event
                ) -> None:
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
        if len(events) >= 3:
            started.set()


def test_sigterm_drains_every_stream_and_stops_the_workers(tiny_chat_model: Path,
                                                           tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    drain_s = 3.0
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed below
    serve = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "serve", "--model", str(tiny_chat_model),
         "--local-workers", "2", "--ctx", "4096", "--parallel", "2", "--draft-mode", "none",
         "--port", str(port), "--drain-timeout", str(drain_s), "--log-level", "info"],
        stdout=log, stderr=subprocess.STDOUT, env=worker_env())
    try:
        wait_healthy(url, 240, serve)
        pids = [n["pid"] for n in httpx.get(url + "/v1/cluster", timeout=30).json()["nodes"]]
        assert len(pids) == 2 and all(pids)
        # Past any end token and as long as the context allows: neither stream can end by
        # itself within the drain timeout, so only the drain ends them ("abort").
        body = {**CHAT, "max_tokens": 4000, "ignore_eos": True, "stream": True}
        streams: list[list[object]] = [[], []]
        started = [threading.Event(), threading.Event()]
        with httpx.Client(timeout=WAIT) as http:
            responses = [http.stream("POST", url + "/v1/chat/completions", json=body)
                         for _ in streams]
            readers = []
            for response, events, go in zip(responses, streams, started, strict=True):
                opened = response.__enter__()
                assert opened.status_code == 200
                readers.append(threading.Thread(target=read_stream,
                                                args=(opened, events, go)))
                readers[-1].start()
            for go in started:
                assert go.wait(WAIT)
            t0 = time.monotonic()
            serve.send_signal(signal.SIGTERM)
            time.sleep(0.5)  # draining: new requests are turned away
            refused = http.post(url + "/v1/chat/completions", json=CHAT)
            assert refused.status_code == 503 and refused.headers["Retry-After"]
            for reader in readers:
                reader.join(max(t0 + drain_s + EXIT_MARGIN_S - time.monotonic(), 0.1))
            for response in responses:
                response.__exit__(None, None, None)
        for events in streams:
            assert events[-1] == "[DONE]", events[-3:]
            last = events[-2]
            assert isinstance(last, dict)
            assert last["choices"][0]["finish_reason"] == "abort", last
        code = serve.wait(timeout=max(t0 + drain_s + EXIT_MARGIN_S - time.monotonic(), 0.1))
        took = time.monotonic() - t0
        print(f"exited {took:.1f} s after SIGTERM")
        assert code == 0
        # Not before the drain timeout: the streams ran until the drain ended them.
        assert drain_s <= took <= drain_s + EXIT_MARGIN_S
        deadline = time.monotonic() + 15
        while alive := [p for p in pids if Path(f"/proc/{p}").exists()
                        and "zombie" not in Path(f"/proc/{p}/status").read_text().lower()]:
            assert time.monotonic() < deadline, f"workers outlived serve: {alive}"
            time.sleep(0.2)
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
        log.close()


def test_a_decode_slower_than_the_health_check_is_not_a_lost_worker(demo_target: Path
                                                                     ) -> None:
    """Batches of 16 rows take the demo target's stages well over 0.2 s on one thread;
    health checks with a 0.2 s timeout still pass: the stage computes off the worker's
    event loop, which answers them."""
    tokenizer = Tokenizer(demo_target)
    with LocalWorkers(2) as workers:
        built = build_ring(demo_target, workers=StaticWorkers(workers.addresses,
                                                              workers.token, None),
                           ctx=512, threads=1, split=split_at(28, [14]))
        assert built.supervisor is not None
        built.supervisor.health_timeout_s = 0.2
        engine = start_engine(built, tokenizer, "test", costs=FREE_DRAFT,
                              options=EngineOptions(prefill_chunk=16))
        try:
            prompt = tokenizer.encode("def fibonacci(n):\n" * 30)  # ~200 tokens
            t0 = time.monotonic()
            done = engine.generate(GenerationRequest(prompt, 8))
            took = time.monotonic() - t0
            slowest = max(max(t.stage_ms.values()) for t in engine.core.timings)
        finally:
            engine.close()
            built.close()
    assert slowest > 200, slowest  # a batch took longer than the health check's timeout
    assert took > 3  # the watcher (every second) checked while it ran
    assert done.finish_reason in ("stop", "length")
    assert engine.core.epoch == 0 and built.supervisor.restarts == 0
