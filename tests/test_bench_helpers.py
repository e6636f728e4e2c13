"""The bench helpers: the latency proxy is a faithful slow wire; the llama.cpp baselines
(one process, batched, RPC) are exact; the gRPC floor measures and cleans up."""

from __future__ import annotations

import math
import os
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from bench.grpc_echo import EchoServer, echo_floor_ms
from bench.latency_proxy import LatencyProxy
from bench.rpc_baseline import (
    Batched,
    Decode,
    Prefill,
    Workload,
    first_difference,
    layer_weights,
    rpc_decode_tok_s,
    run_llama,
    start_rpc_servers,
)
from cluster.stage_cut import even_split
from coordinator.tokenizer import Tokenizer


def _echo(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(1 << 16):
            conn.sendall(data)


@pytest.fixture()
def echo_port() -> Iterator[int]:
    server = socket.create_server(("127.0.0.1", 0))

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return  # closed at teardown
            threading.Thread(target=_echo, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1]
    server.close()


def connect(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def round_trips_ms(address: str, n: int) -> list[float]:
    with connect(address) as sock:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            sock.sendall(b"x")
            assert sock.recv(1) == b"x"
            times.append((time.perf_counter() - t0) * 1e3)
        return times


@pytest.mark.parametrize("one_way_ms", [0.5, 5.0])
def test_proxy_adds_the_latency_both_ways(echo_port: int, one_way_ms: float) -> None:
    with LatencyProxy(("127.0.0.1", echo_port), one_way_ms=one_way_ms) as proxy:
        times = round_trips_ms(proxy.address, 50)
    assert min(times) >= 2 * one_way_ms
    # Python forwarding adds ~0.3 ms a round trip here; a shared machine adds jitter.
    assert statistics.median(times) < 2 * one_way_ms + 3


def test_proxy_keeps_every_byte_in_order_and_passes_eof(echo_port: int) -> None:
    payload = np.random.default_rng(0).bytes(4 << 20)
    received = bytearray()
    with (LatencyProxy(("127.0.0.1", echo_port), one_way_ms=0.5) as proxy,
          connect(proxy.address) as sock):
        reader = threading.Thread(target=lambda: _read_all(sock, received))
        reader.start()
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)  # the echo server sees EOF, closes, we see EOF
        reader.join(timeout=30)
    assert not reader.is_alive()
    assert bytes(received) == payload


def _read_all(sock: socket.socket, into: bytearray) -> None:
    while data := sock.recv(1 << 16):
        into += data


def test_proxy_does_not_serialise_connections(echo_port: int) -> None:
    one_way_ms, n = 50.0, 8
    with LatencyProxy(("127.0.0.1", echo_port), one_way_ms=one_way_ms) as proxy:
        socks = [connect(proxy.address) for _ in range(n)]
        t0 = time.perf_counter()
        for sock in socks:
            sock.sendall(b"x")
        assert all(sock.recv(1) == b"x" for sock in socks)
        elapsed_ms = (time.perf_counter() - t0) * 1e3
        for sock in socks:
            sock.close()
    assert 2 * one_way_ms <= elapsed_ms < 2 * 2 * one_way_ms  # serialised: n × 100 ms


def test_proxy_carries_grpc() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with (LatencyProxy(("127.0.0.1", port), one_way_ms=5.0) as proxy,
              grpc.insecure_channel(proxy.address) as channel):
            stub = health_pb2_grpc.HealthStub(channel)
            stub.Check(health_pb2.HealthCheckRequest(), timeout=10)  # connects
            t0 = time.perf_counter()
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            elapsed_ms = (time.perf_counter() - t0) * 1e3
    finally:
        server.stop(None)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert elapsed_ms >= 10.0


def _llama_cpp_device(weights: list[float], n_layer: int, slot: int) -> int:
    """llama-model.cpp's choice for layer slot `slot`, in float32 as there."""
    splits = np.cumsum(np.asarray(weights, dtype=np.float32))
    splits /= splits[-1]
    return int(np.searchsorted(splits, np.float32(slot) / np.float32(n_layer + 1), "right"))


@pytest.mark.parametrize("n_devices", [1, 2, 3, 4])
def test_layer_weights_reproduce_our_even_split(n_devices: int) -> None:
    n_layer = 28
    weights = layer_weights(n_layer, n_devices)
    placed = [_llama_cpp_device(weights, n_layer, il) for il in range(n_layer + 1)]
    for device, spec in enumerate(even_split(n_layer, n_devices)):
        assert placed[spec.begin:spec.end] == [device] * (spec.end - spec.begin)
    assert placed[n_layer] == n_devices - 1  # the output head goes with the last stage


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_rpc_servers_are_gone_after_an_exception() -> None:
    with pytest.raises(RuntimeError, match="boom"), start_rpc_servers(2) as servers:
        pids = [proc.pid for proc in servers.procs]
        assert all(_alive(pid) for pid in pids)
        raise RuntimeError("boom")
    assert not any(_alive(pid) for pid in pids)


@pytest.mark.slow
def test_rpc_baseline_decodes_like_one_llama_cpp_process(demo_target: Path) -> None:
    tokenizer = Tokenizer(demo_target)
    prompt = tokenizer.encode(tokenizer.chat_prompt(
        [{"role": "user", "content": "Write a Python function that merges two sorted lists."}]))
    plain = rpc_decode_tok_s(demo_target, [], prompt, 8, cpus=[0])
    with start_rpc_servers(2, threads=1, cpus=[0, 1]) as servers:
        pids = [proc.pid for proc in servers.procs]
        result = rpc_decode_tok_s(demo_target, servers.endpoints, prompt, 8, cpus=[0])
    assert not any(_alive(pid) for pid in pids)
    assert result["tokens"] == plain["tokens"]
    assert len(result["tokens"]) == 8 and result["rpc_tok_s"] > 0
    # llama.cpp's own report: one weight buffer on each server, only token_embd at home.
    remote = {name for name in result["model_buffers_mib"] if name.startswith("RPC")}
    assert {name.split("[")[1].rstrip("]") for name in remote} == set(servers.endpoints)
    home = sum(mib for name, mib in result["model_buffers_mib"].items() if name not in remote)
    assert home < min(result["model_buffers_mib"][name] for name in remote)


# The tiny model's logits are small: its top-2 gaps run 1e-4..0.5, and a change of batch
# shape moved them by ≤ 5e-5 when measured; so a flipped token counts as a near tie only
# below 1e-3 here (the demo target's rule, gap < 0.5, would excuse anything).
TINY_NEAR_TIE = 1e-3
PROMPTS = [[1, 5, 9, 20, 33, 7, 2, 80], [3, 4, 50, 61, 10, 11], [90, 12, 12, 40, 6, 77, 8]]


def _same_or_near_tie(reference: dict[str, Any], tokens: list[int]) -> None:
    """`tokens` equal the reference run's, or first leave them at a near tie."""
    diff = first_difference(reference["tokens"], tokens, reference["margins"])
    assert diff is None or diff["gap"] < TINY_NEAR_TIE, diff


@pytest.mark.slow
@pytest.mark.parametrize("kv_unified", [True, False])
def test_batched_decode_gives_each_sequence_its_solo_tokens(tiny_model: Path,
                                                            kv_unified: bool) -> None:
    n_tokens = 12
    solo = [Decode(p, n_tokens, margins=True) for p in PROMPTS]
    out = run_llama(tiny_model, [*solo, Batched(PROMPTS, n_tokens, kv_unified=kv_unified)],
                    cpus=[0])
    *alone, batched = out["results"]
    assert batched["workload"] == "batched" and batched["n_seq"] == len(PROMPTS)
    assert batched["kv_unified"] is kv_unified
    assert [len(t) for t in batched["tokens"]] == [n_tokens] * len(PROMPTS)
    for reference, tokens in zip(alone, batched["tokens"], strict=True):
        _same_or_near_tie(reference, tokens)
    assert batched["n_ctx"] >= sum(len(p) + n_tokens for p in PROMPTS)
    assert batched["prefill_s"] > 0 and batched["decode_s"] > 0
    assert batched["decode_tok_s"] == pytest.approx(
        len(PROMPTS) * (n_tokens - 1) / batched["decode_s"])


@pytest.mark.slow
def test_prefill_in_chunks_computes_what_a_plain_decode_does(tiny_model: Path) -> None:
    prompt = [t % 96 for t in range(7, 7 + 5 * 40, 5)]  # 40 tokens: chunks of 16, 16, 8
    plain = run_llama(tiny_model, [Decode(prompt, 2, margins=True)], cpus=[0])["results"][0]
    assert plain["n_batch"] == 512  # the whole prompt in one llama_decode
    # The prompt, and the prompt + the decoded first token (fed back by a decode step
    # there): a prefill must compute both next tokens from its own last row.
    out = run_llama(tiny_model, [Prefill(prompt, n_batch=16, n_ubatch=16),
                                 Prefill(prompt + plain["tokens"][:1], n_batch=16,
                                         n_ubatch=16)], cpus=[0])
    first, second = out["results"]
    assert (first["workload"], first["n_batch"], first["n_ubatch"]) == ("prefill", 16, 16)
    _same_or_near_tie(plain, [first["first_token"], second["first_token"]])
    assert first["n_prompt"] == len(prompt) and first["ttft_s"] > 0
    assert first["prompt_tok_s"] == pytest.approx(len(prompt) / first["ttft_s"])


@pytest.mark.slow
def test_rpc_runs_every_workload_like_one_process(tiny_model: Path) -> None:
    work: list[Workload] = [Prefill(PROMPTS[0], n_batch=4), Decode(PROMPTS[1], 8),
                            Batched(PROMPTS[:2], 8)]
    single = run_llama(tiny_model, work, cpus=[0])
    with start_rpc_servers(2, threads=1) as servers:
        pids = [proc.pid for proc in servers.procs]
        rpc = run_llama(tiny_model, work, servers.endpoints, cpus=[0])
    assert not any(_alive(pid) for pid in pids)
    remote = {name.split("[")[1].rstrip("]") for name in rpc["model_buffers_mib"]
              if name.startswith("RPC")}
    assert remote == set(servers.endpoints)  # the weights really went to the servers
    for a, b in zip(single["results"], rpc["results"], strict=True):
        key = "first_token" if a["workload"] == "prefill" else "tokens"
        assert a[key] == b[key], a["workload"]


def _echo_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True)
            if "bench.grpc_echo" in " ".join(p.cmdline())]


@pytest.mark.slow
@pytest.mark.parametrize(("payload", "n"), [(64, 200), (5 << 20, 10)])  # 5 MiB > gRPC's 4
def test_echo_floor_is_finite_and_ordered(payload: int, n: int) -> None:
    floor = echo_floor_ms(payload, n)
    assert (floor["payload_bytes"], floor["n"]) == (payload, n)
    assert all(math.isfinite(floor[k]) for k in ("p50_ms", "p99_ms", "min_ms"))
    assert 0 < floor["min_ms"] <= floor["p50_ms"] <= floor["p99_ms"]
    assert floor["one_way_p50_ms"] == floor["p50_ms"] / 2
    assert not _echo_children()


@pytest.mark.slow
def test_a_paced_echo_idles_between_messages() -> None:
    """The paced floor (bench/overhead.py) sleeps `gap_ms` before every message."""
    t0 = time.monotonic()
    floor = echo_floor_ms(64, 40, warmup=10, gap_ms=20.0)
    assert time.monotonic() - t0 >= 50 * 0.020
    assert floor["gap_ms"] == 20.0 and 0 < floor["min_ms"] <= floor["p50_ms"] < 20.0
    assert not _echo_children()


@pytest.mark.slow
def test_echo_server_is_gone_after_an_exception() -> None:
    core = min(os.sched_getaffinity(0))
    with pytest.raises(RuntimeError, match="boom"), EchoServer(64, core) as server:
        pid = server.proc.pid
        assert _alive(pid)
        raise RuntimeError("boom")
    assert not _alive(pid)
