"""Faults a code review found (issue 9), each with the test that keeps it fixed.

The ones that need the served cluster live next to it: a worker killed while several
requests decode (tests/test_soak.py), metrics that are set (tests/test_serve.py), a
drained request ending cleanly (tests/test_api.py), a big logits reply through the ring
(tests/test_grpc_ring.py).
"""

from __future__ import annotations

import ast
import os
import queue
import signal
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from cluster.hardware import GpuInfo, HostInfo
from cluster.messages import Batch, LoadSpec, NodeInfo, Slice
from cluster.stage_cut import split_at
from cluster.wire import worker_pb2 as pb
from cluster.wire import worker_pb2_grpc as pb_grpc
from coordinator.placement.local import LocalWorkers
from coordinator.placement.plan import plan_ring
from coordinator.ring import grpc_ring
from coordinator.ring.contract import RingEvent, RingLost, WorkerLost
from coordinator.ring.grpc_ring import GrpcRing
from coordinator.ring.supervisor import RingSupervisor, StaticWorkers
from coordinator.settings import ServeSettings
from tests.qwq_fixture import QWEN3_0_6B_Q8_0, QWQ_32B_Q4_K_H, write_shape_only

ROOT = Path(__file__).resolve().parent.parent
GiB = 1 << 30


# --- 3: Python 3.10 ----------------------------------------------------------------------

def test_no_bare_timeout_error_where_asyncio_times_out() -> None:
    """Before Python 3.11, asyncio.wait_for raises asyncio.TimeoutError, which `except
    TimeoutError` does not catch (pyproject allows 3.10; Ubuntu 22.04 ships it)."""
    offenders = []
    for package in ("cluster", "worker", "coordinator"):
        for file in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(file.read_text())
            uses_asyncio = any(isinstance(n, ast.Import | ast.ImportFrom) and "asyncio" in
                               ast.dump(n) for n in ast.walk(tree))
            if not uses_asyncio:
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.ExceptHandler) and node.type is not None:
                    names = node.type.elts if isinstance(node.type, ast.Tuple) else [node.type]
                    if any(isinstance(n, ast.Name) and n.id == "TimeoutError" for n in names):
                        offenders.append(f"{file.relative_to(ROOT)}:{node.lineno}")
    assert offenders == [], f"use asyncio.TimeoutError: {offenders}"


# --- 2: a lost hop fails what is in flight at once ---------------------------------------

@pytest.fixture()
def two_workers(tiny_model: Path) -> Iterator[tuple[LocalWorkers, GrpcRing]]:
    with LocalWorkers(2) as workers:
        ring = GrpcRing(workers.addresses, token=workers.token)
        try:
            ring.load([LoadSpec(str(tiny_model), s.begin, s.end, n_ctx=256, n_threads=1)
                       for s in split_at(4, [2])])
            yield workers, ring
        finally:
            ring.close()


def test_a_killed_worker_fails_the_batches_in_flight_at_once(two_workers):
    workers, ring = two_workers
    events: queue.Queue[RingEvent] = queue.Queue()
    ring.connect(events.put)
    ring.submit(Batch(1, [Slice(0, 0, [1, 2, 3])]))
    assert events.get(timeout=30).result.batch_id == 1  # type: ignore[union-attr]
    os.kill(workers.procs[1].pid, signal.SIGKILL)
    t0 = time.monotonic()
    event = events.get(timeout=10)  # not the 600 s a batch may take
    assert isinstance(event, RingLost) and time.monotonic() - t0 < 5
    with pytest.raises(WorkerLost):
        ring.submit(Batch(2, [Slice(0, 3, [4])]))


def test_worker_0_reports_its_broken_downstream_stream(two_workers):
    """The coordinator learns of a lost hop from the worker before it too, at once."""
    workers, _ = two_workers
    channel = grpc.insecure_channel(workers.addresses[0])
    metadata = (("authorization", f"Bearer {workers.token}"),)
    try:
        results = pb_grpc.WorkerStub(channel).Results(pb.ResultsRequest(), metadata=metadata,
                                                      timeout=30)
        next(results)  # subscribed
        os.kill(workers.procs[1].pid, signal.SIGKILL)
        t0 = time.monotonic()
        lost = next(results)
        assert lost.WhichOneof("outcome") == "error" and time.monotonic() - t0 < 5
        assert lost.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
        assert "stream to" in lost.error.message
    finally:
        channel.close()


# --- 8: a worker that never subscribes ---------------------------------------------------

class Silent(pb_grpc.WorkerServicer):
    """A peer that takes the Results call and never answers it."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def Results(self, request, context):  # noqa: N802 — the gRPC method's name
        self.release.wait(30)
        return iter(())


def test_a_worker_that_never_subscribes_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(grpc_ring, "SUBSCRIBE_TIMEOUT_S", 1.0)
    server = grpc.server(futures.ThreadPoolExecutor(2))
    silent = Silent()
    pb_grpc.add_WorkerServicer_to_server(silent, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    ring = GrpcRing([f"127.0.0.1:{port}"])
    try:
        with pytest.raises(WorkerLost, match="did not take the results subscription"):
            ring.connect(lambda _event: None)
    finally:
        silent.release.set()
        ring.close()
        server.stop(0)


class Quitter(pb_grpc.WorkerServicer):
    """A peer that subscribes, ends the Results call with status OK, and keeps taking
    Forward messages: only the ended Results call says its answers will not come."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def Results(self, request, context):  # noqa: N802 — the gRPC method's name
        yield pb.ForwardReply()

    def Forward(self, request_iterator, context):  # noqa: N802
        self.release.wait(30)
        return iter(())


def test_a_results_stream_that_ends_loses_the_ring_at_once():
    server = grpc.server(futures.ThreadPoolExecutor(4))
    quitter = Quitter()
    pb_grpc.add_WorkerServicer_to_server(quitter, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    ring = GrpcRing([f"127.0.0.1:{port}"])
    events: queue.Queue[RingEvent] = queue.Queue()
    try:
        try:  # the end may come while connect still waits for the other subscriptions
            ring.connect(events.put)
        except WorkerLost as exc:
            why = str(exc)
        else:
            event = events.get(timeout=10)  # not a batch timeout
            assert isinstance(event, RingLost)
            why = event.why
        assert "ended its results stream" in why
    finally:
        quitter.release.set()
        ring.close()
        server.stop(0)


# --- 4: /v1/cluster does not wait on the network ----------------------------------------

def test_describing_the_ring_asks_nobody(tiny_model: Path):
    """Health comes from the watcher's last check: a worker that hangs (SIGSTOP) cannot
    block the API's event loop (before: a 2 s health check per worker, on the loop)."""
    with LocalWorkers(2) as workers:
        supervisor = RingSupervisor(StaticWorkers(workers.addresses, workers.token, None),
                                    tiny_model, str(tiny_model), 256, 1, 1,
                                    specs=[LoadSpec(str(tiny_model), s.begin, s.end,
                                                    n_ctx=256, n_threads=1)
                                           for s in split_at(4, [2])],
                                    health_timeout_s=1.0)
        hung = workers.pids()[1]
        assert hung is not None
        try:
            supervisor.start()
            supervisor.watch(every_s=0.2)
            os.kill(hung, signal.SIGSTOP)
            deadline = time.monotonic() + 10
            while supervisor.health != [True, False]:
                t0 = time.monotonic()
                info = supervisor.describe()
                assert time.monotonic() - t0 < 0.2  # while a check waits on the hung one
                assert time.monotonic() < deadline, info
                time.sleep(0.1)
            assert [n["healthy"] for n in supervisor.describe()["nodes"]] == [True, False]  # type: ignore[index]
        finally:
            os.kill(hung, signal.SIGCONT)
            supervisor.close()


# --- 6: a failed start leaves nothing running --------------------------------------------

def test_a_failed_start_stops_the_ring_and_its_threads(tiny_chat_model: Path, monkeypatch,
                                                       tmp_path: Path):
    from cluster.auth import write_token
    from coordinator import service

    def fail(*_args, **_kwargs):  # the last step of a start: everything before it is real
        raise RuntimeError("engine failed to start")

    with LocalWorkers(2) as workers:
        token = write_token(tmp_path / "token", workers.token)
        monkeypatch.setattr(service, "start_engine", fail)
        before = {t.ident for t in threading.enumerate()}
        settings = ServeSettings(model=str(tiny_chat_model), worker=workers.addresses,
                                 token_file=str(token), ctx=256, parallel=2,
                                 draft_mode="ngram")
        with pytest.raises(RuntimeError, match="engine failed"):
            service.start_cluster(settings)
        deadline = time.monotonic() + 10
        while (left := [t.name for t in threading.enumerate() if t.ident not in before
                        and t.is_alive()]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert left == []


# --- 10: the planner counts the one draft model serve loads ------------------------------

def test_the_ring_plan_holds_one_draft_with_a_stream_per_sequence(tmp_path: Path):
    target = write_shape_only(tmp_path / "qwq.gguf", QWQ_32B_Q4_K_H)
    draft = write_shape_only(tmp_path / "draft.gguf", QWEN3_0_6B_Q8_0)
    gpu = GpuInfo(0, "RTX 4070", 12 * GiB, 12 * GiB, 0, 40, "test")
    infos = [NodeInfo(HostInfo(f"pc{i}", 1, "cpu", 8, 64 * GiB, 60 * GiB, [gpu]), {})
             for i in (1, 2)]
    plans = {p: plan_ring(target, ["a:1", "b:1"], infos, 8192, p, draft) for p in (1, 4)}
    assert all(p.draft is not None for p in plans.values())
    one, four = (plans[p].draft.memory for p in (1, 4))  # type: ignore[union-attr]
    assert one.weights == four.weights  # one set of weights, whatever --parallel is
    assert four.kv == pytest.approx(4 * one.kv, rel=0.02)  # a KV stream per sequence
