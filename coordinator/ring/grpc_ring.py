"""The coordinator's side of the ring: batches to worker 0, verdicts from the last.

`submit` never blocks: batches go out on one long-lived Forward stream, and what comes
back — a batch's verdicts, its refusal, or the loss of a worker — is handed to the
engine's inbox (`sink`) by the threads that read each worker's Results stream.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import grpc
import grpc.experimental
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tqdm import tqdm

from cluster import trace
from cluster.auth import TlsFiles, call_metadata, split_address
from cluster.errors import SpecshardError
from cluster.messages import Activations, Batch, LoadSpec, NodeInfo, Peer
from cluster.wire import worker_pb2 as pb
from cluster.wire import worker_pb2_grpc as pb_grpc
from cluster.wire_convert import (
    CHANNEL_OPTIONS,
    batch_to_wire,
    load_to_wire,
    node_from_wire,
    progress_from_wire,
    result_from_wire,
)
from coordinator.ring.contract import BatchDone, BatchFailed, RingLost, Sink, WorkerLost

log = logging.getLogger(__name__)
SUBSCRIBE_TIMEOUT_S = 30.0
_CODES = {c.value[0]: c for c in grpc.StatusCode}




class WorkerClient:
    """One worker's channel, kept for the ring's life (health checks reuse it)."""

    def __init__(self, address: str, token: str | None, tls: TlsFiles | None,
                 server_name: str = "") -> None:
        self.address = address
        self.metadata = call_metadata(token)
        options = list(CHANNEL_OPTIONS)
        # Server-streaming calls (Results, LoadStage) read on the calling thread, not
        # handed over from gRPC's polling thread: one thread hand-off less per verdict.
        options.append((grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1))
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
            raise rpc_error(self.address, exc) from None

    def load(self, spec: LoadSpec, on_update: Callable[[str, float, str], None]) -> None:
        try:
            for msg in self.stub.LoadStage(load_to_wire(spec), metadata=self.metadata):
                update = progress_from_wire(msg)
                on_update(update.phase, update.fraction, update.detail)
        except grpc.RpcError as exc:
            raise rpc_error(self.address, exc) from None

    def truncate(self, seqs: list[int], length: int) -> list[int]:
        try:
            reply = self.stub.Truncate(pb.TruncateRequest(seqs=seqs, length=length),
                                       metadata=self.metadata, timeout=60)
        except grpc.RpcError as exc:
            raise rpc_error(self.address, exc) from None
        return list(reply.lengths)

    def close(self) -> None:
        self.channel.close()


def rpc_error(address: str, exc: grpc.RpcError) -> Exception:
    code, details = exc.code(), exc.details()  # type: ignore[attr-defined]
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return SpecshardError(f"worker {address} refused the token: {details}")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                grpc.StatusCode.DEADLINE_EXCEEDED):
        return WorkerLost(f"worker {address} is unavailable: {details}")
    return SpecshardError(f"worker {address}: {details}")


class GrpcRing:
    """Running workers chained into a ring, fed batches by the engine."""

    def __init__(self, addresses: list[str], token: str | None = None,
                 tls: TlsFiles | None = None, clients: list[WorkerClient] | None = None
                 ) -> None:
        """`clients`: channels to the workers owned by the caller (one channel per worker
        in a process: each sync channel runs a thread of its own)."""
        if not addresses:
            raise SpecshardError("a ring needs at least one worker")
        self.addresses = list(addresses)
        self.tls = tls
        self._owns_clients = clients is None
        self.workers = clients or [WorkerClient(a, token, tls) for a in addresses]
        self.specs: list[LoadSpec] = []
        self._sink: Sink = lambda _event: None
        self._outbox: queue.Queue[pb.ForwardMessage | None] = queue.Queue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._calls: list[grpc.Future] = []
        self._subscribed = [threading.Event() for _ in addresses]
        self._lost: str | None = None
        self._closed = False

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
            logged: set[tuple[str, int]] = set()

            def show(phase: str, fraction: float, detail: str) -> None:
                bars[i].n = int(100 * fraction) if phase == "CUT" else 100
                bars[i].set_postfix_str(phase.lower())
                # The log (a journal under systemd, the status page) gets each phase, and
                # a cut's progress by quarters: a bar only shows on a terminal.
                step = (phase, int(4 * fraction) if phase == "CUT" else 0)
                if step not in logged:
                    logged.add(step)
                    log.info("%s layers %d-%d: %s %s", self.workers[i].address,
                             specs[i].begin, specs[i].end, phase.lower(), detail)

            self.workers[i].load(chained[i], show)

        try:
            with ThreadPoolExecutor(len(self.workers)) as pool:
                for done in [pool.submit(load_one, i) for i in range(len(self.workers))]:
                    done.result()
        finally:
            for bar in bars:
                bar.close()
        self.specs = chained

    def connect(self, sink: Sink) -> None:
        """Subscribe to every worker's results, then open the stream into worker 0.

        Called again, it only changes where the outcomes go (a new engine on the ring)."""
        self._sink = sink
        if self._calls:
            return
        for i, w in enumerate(self.workers):
            call = w.stub.Results(pb.ResultsRequest(), metadata=w.metadata)
            self._calls.append(call)
            self._spawn(self._read_results, i, call)
        for i, subscribed in enumerate(self._subscribed):
            if not subscribed.wait(SUBSCRIBE_TIMEOUT_S):
                raise WorkerLost(f"worker {self.addresses[i]} did not take the results "
                                 f"subscription within {SUBSCRIBE_TIMEOUT_S:.0f} s")
            if self._lost:
                raise WorkerLost(self._lost)
        first = self.workers[0]
        forward = first.stub.Forward(self._requests(), metadata=first.metadata)
        self._calls.append(forward)
        self._spawn(self._drain_inline, forward)

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True, name="ring-reader")
        thread.start()
        self._threads.append(thread)

    def _requests(self) -> Iterator[pb.ForwardMessage]:
        while (msg := self._outbox.get()) is not None:
            trace.mark("write", msg.batch_id)  # gRPC's thread has it: sent from here
            yield msg

    # --- what comes back ---------------------------------------------------------------

    def _read_results(self, i: int, call: Iterator[pb.ForwardReply]) -> None:
        worker = self.addresses[i]
        try:
            for reply in call:
                if not self._subscribed[i].is_set():  # the first reply: we are subscribed
                    self._subscribed[i].set()
                    continue
                trace.mark("read", reply.batch_id)
                self._on_reply(worker, reply)
            # A worker never ends this call itself: its answers would stop coming.
            self.lose(f"worker {worker} ended its results stream")
        except grpc.RpcError as exc:  # ignored once the ring is closing (see `lose`)
            self.lose(f"worker {worker} stopped: {exc.details()}")  # type: ignore[attr-defined]
        finally:
            self._subscribed[i].set()  # nobody waits out the timeout for a dead stream

    def _drain_inline(self, call: Iterator[pb.ForwardReply]) -> None:
        try:  # inline errors repeat what worker 0 published to us
            for _ in call:
                pass
        except grpc.RpcError as exc:
            self.lose(f"the stream to {self.addresses[0]} ended: "
                       f"{exc.details()}")  # type: ignore[attr-defined]

    def _on_reply(self, worker: str, reply: pb.ForwardReply) -> None:
        outcome = reply.WhichOneof("outcome")
        if outcome == "error":
            e = reply.error
            code = _CODES.get(e.code, grpc.StatusCode.UNKNOWN)
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                self.lose(f"{e.worker}: {e.message}")
            else:
                self._sink(BatchFailed(reply.batch_id, code.name, e.message, e.worker))
            return
        if outcome is None:
            return  # nothing to act on (no worker sends these today)
        result = result_from_wire(reply)
        # The workers report in ring order: the i-th time is the i-th worker's.
        named = list(zip(self.addresses, result.times, strict=False))
        self._sink(BatchDone(result, {a: s for a, (s, _) in named},
                             {a: b for a, (_, b) in named[:-1]}))

    def lose(self, why: str) -> None:
        """Mark the ring lost (once) and tell the engine: its batches in flight are gone."""
        with self._lock:
            if self._lost or self._closed:
                return
            self._lost = why
        log.warning("ring lost: %s", why)
        self._sink(RingLost(why))

    # --- the ring as the engine sees it ------------------------------------------------

    @property
    def n_ctx(self) -> int:
        return min(s.n_ctx for s in self.specs)

    @property
    def n_seq(self) -> int:
        return min(s.n_seq_max for s in self.specs)

    def submit(self, batch: Batch) -> None:
        """Send a batch down the ring; its outcome arrives at the sink."""
        if self._lost or self._closed:  # closed: a rebuild that failed left it behind
            raise WorkerLost(self._lost or "the ring was closed")
        trace.mark("submit", batch.batch_id)
        for msg in batch_to_wire(Activations(batch)):
            self._outbox.put(msg)

    def truncate_all(self, seqs: list[int], length: int = 0) -> None:
        """Out-of-band reset of every stage, for a ring at rest (recovery)."""
        for w in self.workers:
            w.truncate(seqs, length)

    def node_infos(self) -> list[NodeInfo]:
        return [w.node_info() for w in self.workers]

    def close(self) -> None:
        self._closed = True
        self._outbox.put(None)
        for call in self._calls:
            call.cancel()
        deadline = time.monotonic() + 5
        for thread in self._threads:
            thread.join(timeout=max(deadline - time.monotonic(), 0.1))
        if self._owns_clients:
            for w in self.workers:
                w.close()
