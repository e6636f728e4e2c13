"""The coordinator's side of the ring: token ids to worker 0, results from the last.

Synchronous on purpose: the decode loop calls `step()` and waits, and several threads
(one per request being served) may call it at once; their steps travel the ring
interleaved, each worker computing one while the next computes another.
"""

from __future__ import annotations

import itertools
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tqdm import tqdm

from cluster.auth import TlsFiles, call_metadata, split_address
from cluster.errors import InvalidForward, SpecshardError
from cluster.messages import Hop, LoadSpec, NodeInfo, Peer, StepRequest, StepResult
from cluster.sampling import SamplingParams
from cluster.wire import worker_pb2 as pb
from cluster.wire import worker_pb2_grpc as pb_grpc
from cluster.wire_convert import (
    MAX_MESSAGE_BYTES,
    hop_to_wire,
    load_to_wire,
    node_from_wire,
    progress_from_wire,
    result_from_wire,
)

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["Worker"].full_name
# Results may carry logits rows (return_logits: 600 KB per row on a 150k vocabulary).
_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES + (1 << 16)),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024)]


class WorkerLost(SpecshardError):
    """A worker stopped answering: the steps in flight are lost (recovery replays them)."""


class StepFailed(SpecshardError):
    def __init__(self, code: grpc.StatusCode, message: str, worker: str) -> None:
        super().__init__(f"{worker}: {message}")
        self.code = code


_CODES = {c.value[0]: c for c in grpc.StatusCode}


@dataclass
class StageTimes:
    """Per-worker compute time of recent steps (ms), for metrics."""

    stage_ms: dict[str, list[float]] = field(default_factory=dict)

    def add(self, worker: str, ms: float) -> None:
        samples = self.stage_ms.setdefault(worker, [])
        samples.append(ms)
        del samples[:-256]


class WorkerClient:
    def __init__(self, address: str, token: str | None, tls: TlsFiles | None,
                 server_name: str = "") -> None:
        self.address = address
        self.metadata = call_metadata(token)
        options: list[tuple[str, int | str]] = list(_OPTIONS)
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        self.channel = grpc.secure_channel(address, tls.channel_credentials(), options) \
            if tls else grpc.insecure_channel(address, options)
        self.stub = pb_grpc.WorkerStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def wait_ready(self, timeout_s: float) -> None:
        # A refused connection will not turn into a worker by waiting: gRPC would retry
        # with backoff for the whole timeout. Anything else (a box still booting, a slow
        # route) gets the full wait.
        host, port = split_address(self.address)
        try:
            socket.create_connection((host, port), timeout=min(timeout_s, 5.0)).close()
        except ConnectionRefusedError:
            raise WorkerLost(f"worker {self.address} is not reachable") from None
        except OSError:
            pass
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            raise WorkerLost(f"worker {self.address} is not reachable") from None

    def healthy(self, service: str = "", timeout_s: float = 2.0) -> bool:
        try:
            reply = self.health.Check(health_pb2.HealthCheckRequest(service=service),
                                      timeout=timeout_s, metadata=self.metadata)
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def node_info(self) -> NodeInfo:
        self.wait_ready(30.0)
        try:
            return node_from_wire(self.stub.GetNodeInfo(pb.NodeInfoRequest(),
                                                        metadata=self.metadata, timeout=30))
        except grpc.RpcError as exc:
            raise _rpc_error(self.address, exc) from None

    def load(self, spec: LoadSpec, on_update: Callable[[str, float, str], None]) -> None:
        try:
            for msg in self.stub.LoadStage(load_to_wire(spec), metadata=self.metadata):
                update = progress_from_wire(msg)
                on_update(update.phase, update.fraction, update.detail)
        except grpc.RpcError as exc:
            raise _rpc_error(self.address, exc) from None

    def truncate(self, seqs: list[int], length: int) -> list[int]:
        reply = self.stub.Truncate(pb.TruncateRequest(seqs=seqs, length=length),
                                   metadata=self.metadata, timeout=60)
        return list(reply.lengths)

    def close(self) -> None:
        self.channel.close()


def _rpc_error(address: str, exc: grpc.RpcError) -> SpecshardError:
    code, details = exc.code(), exc.details()  # type: ignore[attr-defined]
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return SpecshardError(f"worker {address} refused the token: {details}")
    if code == grpc.StatusCode.UNAVAILABLE:
        return WorkerLost(f"worker {address} is unavailable: {details}")
    return SpecshardError(f"worker {address}: {details}")


class GrpcPipeline:
    """A ring of running workers, seen by the decode loop as one `Pipeline`."""

    def __init__(self, addresses: list[str], token: str | None = None,
                 tls: TlsFiles | None = None, step_timeout_s: float = 600.0) -> None:
        if not addresses:
            raise SpecshardError("a pipeline needs at least one worker")
        self.addresses = list(addresses)
        self.tls = tls
        self.workers = [WorkerClient(a, token, tls) for a in addresses]
        self.step_timeout_s = step_timeout_s
        self.times = StageTimes()
        self._specs: list[LoadSpec] = []
        self._pending: dict[int, tuple[StepRequest, Future[StepResult]]] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._outbox: queue.Queue[pb.ForwardMessage | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._calls: list[grpc.Future] = []
        self._broken: str | None = None

    # --- set-up ------------------------------------------------------------------------

    def load(self, specs: list[LoadSpec], progress: bool = False) -> None:
        """Load stage i on worker i (in parallel), chaining each to the next worker."""
        if len(specs) != len(self.workers):
            raise SpecshardError(f"{len(specs)} stages for {len(self.workers)} workers")
        for w in self.workers:
            w.wait_ready(30.0)
        chained = [replace(s, downstream=Peer(self.addresses[i + 1], tls=self.tls is not None)
                           if i + 1 < len(specs) else None) for i, s in enumerate(specs)]
        bars = [tqdm(total=100, desc=f"{w.address} L{s.begin}-{s.end}", disable=not progress,
                     leave=False, bar_format="{desc}: {percentage:3.0f}% {postfix}")
                for w, s in zip(self.workers, specs, strict=True)]

        def load_one(i: int) -> None:
            def show(phase: str, fraction: float, detail: str) -> None:
                bars[i].n = int(100 * fraction) if phase == "CUT" else 100
                bars[i].set_postfix_str(phase.lower())

            self.workers[i].load(chained[i], show)

        with ThreadPoolExecutor(len(self.workers)) as pool:
            for done in [pool.submit(load_one, i) for i in range(len(self.workers))]:
                done.result()
        for bar in bars:
            bar.close()
        self._specs = chained
        self._start_streams()

    def _start_streams(self) -> None:
        ready = threading.Barrier(len(self.workers) + 1)
        for w in self.workers:
            call = w.stub.Results(pb.ResultsRequest(), metadata=w.metadata)
            self._calls.append(call)
            self._spawn(self._read_results, w, call, ready)
        ready.wait(timeout=30)  # every worker has registered us before the first step
        first = self.workers[0]
        forward = first.stub.Forward(self._requests(), metadata=first.metadata)
        self._calls.append(forward)
        self._spawn(self._drain_inline, forward)

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _requests(self) -> Iterator[pb.ForwardMessage]:
        while (msg := self._outbox.get()) is not None:
            yield msg

    def _read_results(self, worker: WorkerClient, call: Iterator[pb.ForwardReply],
                      ready: threading.Barrier) -> None:
        try:
            for reply in call:
                if ready is not None:
                    ready.wait(timeout=30)
                    ready = None  # type: ignore[assignment]
                    continue
                self._on_reply(worker, reply)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:  # type: ignore[attr-defined]
                self._fail_all(f"worker {worker.address} stopped: "
                               f"{exc.details()}")  # type: ignore[attr-defined]

    def _drain_inline(self, call: Iterator[pb.ForwardReply]) -> None:
        try:  # inline errors repeat what worker 0 published to us
            for _ in call:
                pass
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:  # type: ignore[attr-defined]
                self._fail_all(f"stream to {self.addresses[0]} ended: "
                               f"{exc.details()}")  # type: ignore[attr-defined]

    def _on_reply(self, worker: WorkerClient, reply: pb.ForwardReply) -> None:
        outcome = reply.WhichOneof("outcome")
        if outcome is None:
            self.times.add(worker.address, reply.stage_ms)
            return
        with self._lock:
            entry = self._pending.pop(reply.step_id, None)
        if entry is None:
            return
        request, future = entry
        if outcome == "error":
            e = reply.error
            future.set_exception(StepFailed(_CODES.get(e.code, grpc.StatusCode.UNKNOWN),
                                            e.message, e.worker))
        else:
            self.times.add(worker.address, reply.stage_ms)
            future.set_result(replace(result_from_wire(reply), step_id=request.step_id))

    def _fail_all(self, why: str) -> None:
        with self._lock:
            self._broken = why
            pending, self._pending = self._pending, {}
        for _, future in pending.values():
            future.set_exception(WorkerLost(why))

    # --- the Pipeline protocol ---------------------------------------------------------

    @property
    def n_ctx(self) -> int:
        return min(s.n_ctx for s in self._specs)

    def submit(self, request: StepRequest) -> Future[StepResult]:
        future: Future[StepResult] = Future()
        with self._lock:
            if self._broken:
                raise WorkerLost(self._broken)
            wire_id = next(self._ids)
            self._pending[wire_id] = (request, future)
            for msg in hop_to_wire(Hop(replace(request, step_id=wire_id))):
                self._outbox.put(msg)
        return future

    def step(self, request: StepRequest) -> StepResult:
        future = self.submit(request)
        try:
            return future.result(timeout=self.step_timeout_s)
        except FutureTimeout:
            raise WorkerLost(f"no result for step {request.step_id} of sequence "
                             f"{request.seq} in {self.step_timeout_s:.0f} s") from None
        except StepFailed as exc:
            if exc.code == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidForward(str(exc)) from None
            raise

    def reset(self, seq: int) -> None:
        """Free a sequence on every stage, in order with the steps already in flight."""
        cancel = StepRequest(seq=seq, start=0, tokens=[], sampling=SamplingParams())
        with self._lock:
            for msg in hop_to_wire(Hop(cancel, cancel=True)):
                self._outbox.put(msg)

    def truncate_all(self, seqs: list[int], length: int = 0) -> None:
        """Out-of-band reset of every stage, for a ring at rest (recovery)."""
        for w in self.workers:
            w.truncate(seqs, length)

    def node_infos(self) -> list[NodeInfo]:
        return [w.node_info() for w in self.workers]

    def wait_idle(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self._pending and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self) -> None:
        # Steps still waiting are lost with the ring (a rebuild replays them).
        self._fail_all("the ring was closed")
        self._outbox.put(None)
        for call in self._calls:
            call.cancel()
        for thread in self._threads:
            thread.join(timeout=5)
        for w in self.workers:
            w.close()
