"""The bench helpers: the latency proxy is a faithful slow wire; the RPC baseline is exact."""

from __future__ import annotations

import os
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from bench.latency_proxy import LatencyProxy
from bench.rpc_baseline import layer_weights, rpc_decode_tok_s, start_rpc_servers
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
