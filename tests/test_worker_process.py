"""`specshard worker` as a process: secure defaults, health, reflection, TLS, shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cluster.auth import call_metadata, new_token, write_token

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cluster.cli", "worker", *args]


class Worker:
    def __init__(self, tmp: Path, *args: str) -> None:
        self.port_file = tmp / "port"
        self.proc = subprocess.Popen(cli("--port-file", str(self.port_file), *args),
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not self.port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"worker did not start: {self.proc.stderr.read()}")
            time.sleep(0.05)
        self.address = f"127.0.0.1:{self.port_file.read_text()}"

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


@pytest.fixture()
def token_file(tmp_path: Path) -> Path:
    return write_token(tmp_path / "token", new_token())


@pytest.fixture()
def worker(tmp_path: Path, token_file: Path) -> Iterator[Worker]:
    running = Worker(tmp_path, "--listen", "127.0.0.1:0", "--token-file", str(token_file))
    yield running
    running.stop()


def health(channel: grpc.Channel, token: str, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), metadata=call_metadata(token),
        timeout=10).status


def test_beyond_loopback_needs_a_token():
    result = subprocess.run(cli("--listen", "0.0.0.0:0"), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "specshard: error: listening on 0.0.0.0:0 (not loopback) needs a token: "
        "pass --token-file"]


def test_a_token_file_others_can_read_is_refused(tmp_path: Path, token_file: Path):
    token_file.chmod(0o644)
    result = subprocess.run(cli("--token-file", str(token_file)), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert "chmod 600" in result.stderr


def test_health_reflection_and_graceful_stop(worker: Worker, token_file: Path):
    token = token_file.read_text().strip()
    with grpc.insecure_channel(worker.address) as channel:
        assert health(channel, token) == SERVING
        assert health(channel, token, "specshard.v1.Worker") == NOT_SERVING  # no stage yet
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
            metadata=call_metadata(token))
        names = {s.name for s in next(iter(replies)).list_services_response.service}
    assert {"specshard.v1.Worker", "grpc.health.v1.Health"} <= names
    assert worker.stop() == 0


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for localhost, and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.pem", "-days", "2", "-subj", "/CN=specshard-test-ca", cwd=d)
    (d / "san.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile",
                 "san.cnf", cwd=d)
    return d


def test_mutual_tls(tmp_path: Path, token_file: Path, pki: Path):
    token = token_file.read_text().strip()
    running = Worker(tmp_path, "--listen", "127.0.0.1:0", "--token-file", str(token_file),
                     "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
                     "--tls-ca", str(pki / "ca.pem"))
    try:
        ca = (pki / "ca.pem").read_bytes()
        with_cert = grpc.ssl_channel_credentials(
            ca, (pki / "client.key").read_bytes(), (pki / "client.pem").read_bytes())
        with grpc.secure_channel(running.address, with_cert) as channel:
            assert health(channel, token) == SERVING
        without_cert = grpc.ssl_channel_credentials(ca)
        with grpc.secure_channel(running.address, without_cert) as channel, \
                pytest.raises(grpc.RpcError) as err:
            health(channel, token)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # handshake refused
        with grpc.insecure_channel(running.address) as channel, \
                pytest.raises(grpc.RpcError):
            health(channel, token)
    finally:
        running.stop()


def test_pin_keeps_the_worker_on_one_core(tmp_path: Path, token_file: Path):
    running = Worker(tmp_path, "--token-file", str(token_file), "--listen", "127.0.0.1:0",
                     "--pin", "0")
    try:
        assert os.sched_getaffinity(running.proc.pid) == {0}
    finally:
        running.stop()


LAUNCHER = """
import sys, time
from coordinator.placement.local import LocalWorkers
workers = LocalWorkers(1).start()
print(workers.pids()[0], flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:  # a zombie has exited: state Z
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_local_worker_ends_with_the_process_that_started_it():
    """LocalWorkers' children go when their launcher is killed (no cleanup code runs),
    and the launcher — a process that already uses gRPC — spawns them without fork."""
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdout=subprocess.PIPE,
                                text=True)
    pid = None
    try:
        line = launcher.stdout.readline() if launcher.stdout else ""
        assert line.strip().isdigit(), f"the launcher printed {line!r}"
        pid = int(line)
        assert _alive(pid)
        launcher.kill()
        launcher.wait(timeout=10)
        deadline = time.monotonic() + 15
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid), "the worker outlived its launcher"
    finally:
        launcher.kill()
        launcher.wait()
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGKILL)


SPAWNER = """
import subprocess
import coordinator.ring.grpc_ring  # the package, before grpc: the fork policy
import grpc
from concurrent import futures
server = grpc.server(futures.ThreadPoolExecutor(2))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
channel = grpc.insecure_channel(f"127.0.0.1:{port}")
grpc.channel_ready_future(channel).result(timeout=10)
codes = [subprocess.run(["true"], preexec_fn=lambda: None).returncode for _ in range(400)]
print(sum(code != 0 for code in codes))
"""


def test_a_process_using_grpc_spawns_children_that_reach_their_exec():
    """Ray starts its processes with a preexec_fn (a fork): with gRPC's fork handlers on,
    about 1 child in 100 died before its exec here (cluster/__init__.py)."""
    out = subprocess.run([sys.executable, "-c", SPAWNER], capture_output=True, text=True,
                         timeout=120, env={k: v for k, v in os.environ.items()
                                           if k != "GRPC_ENABLE_FORK_SUPPORT"})
    assert out.returncode == 0, out.stderr[-500:]
    assert out.stdout.strip() == "0", out.stderr[-500:]
