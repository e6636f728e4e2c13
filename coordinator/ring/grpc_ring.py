"""The coordinator's side of the ring: batches to worker 0, verdicts from the last.

`submit` never blocks: batches go out on one long-lived Forward stream, and what comes
back — a batch's verdicts, its refusal, or the loss of a worker — is handed to the
engine (`sink`) by the tasks that read each worker's Results stream. All of them run on
one asyncio loop of the ring's own ("ring-reader"): a verdict read there is handled
there by an idle engine, whose next batch is written from there (docs/overhead.md).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import socket
import threading
from collections import deque
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import grpc
import grpc.experimental
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tqdm import tqdm

from cluster import trace
from cluster.auth import TlsFiles, call_metadata, split_address
from cluster.errors import SpecshardError
from cluster.messages import Activations, Batch, BatchResult, LoadSpec, NodeInfo, Peer
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

log = logging.getLogger(__name__)
SUBSCRIBE_TIMEOUT_S = 30.0
CLOSE_TIMEOUT_S = 5.0
T = TypeVar("T")
_CODES = {c.value[0]: c for c in grpc.StatusCode}


class WorkerLost(SpecshardError):
    """A worker stopped answering: the batches in flight are lost (recovery replays)."""


@dataclass(frozen=True)
class BatchDone:
    result: BatchResult
    stage_ms: dict[str, float]  # compute time per worker, by address
    busy_ms: dict[str, float]  # arrival → handed on, per non-last worker


@dataclass(frozen=True)
class BatchFailed:
    """A worker refused the batch whole (its caches unchanged): a bug or a bad request."""

    batch_id: int
    code: grpc.StatusCode
    message: str
    worker: str


@dataclass(frozen=True)
class RingLost:
    why: str


RingEvent = BatchDone | BatchFailed | RingLost


class WorkerClient:
    """One worker's channel, kept for the ring's life (health checks reuse it)."""

    def __init__(self, address: str, token: str | None, tls: TlsFiles | None,
                 server_name: str = "") -> None:
        self.address = address
        self.metadata = call_metadata(token)
        self.tls, self.server_name = tls, server_name
        options = list(CHANNEL_OPTIONS)
        # LoadStage's progress is read on the calling thread, not handed over from
        # gRPC's polling thread (the ring's streams use `aio_channel`).
        options.append((grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1))
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        self.channel = grpc.secure_channel(address, tls.channel_credentials(), options) \
            if tls else grpc.insecure_channel(address, options)
        self.stub = pb_grpc.WorkerStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def aio_channel(self) -> grpc.aio.Channel:
        """A grpc.aio channel to the worker for the ring's streams; made on the loop
        that will use it."""
        options = list(CHANNEL_OPTIONS)
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        if self.tls:
            return grpc.aio.secure_channel(self.address, self.tls.channel_credentials(),
                                           options)
        return grpc.aio.insecure_channel(self.address, options)

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


def rpc_error(address: str, exc: grpc.RpcError) -> SpecshardError:
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
        self._sink: Callable[[RingEvent], None] = lambda _event: None
        # The streams run on one asyncio loop (`connect`): a verdict is read, handled
        # by an idle engine and its next batch written, all on that loop's thread.
        self._io: _RingLoop | None = None
        self._outbox: deque[list[pb.ForwardMessage] | None] = deque()  # submit order
        # asyncio's events bind to the loop that first waits on them: made here, set
        # on the ring's loop only (`submit` goes through call_soon_threadsafe).
        self._wake = asyncio.Event()  # the writer's: batches are waiting
        self._subscribed = [asyncio.Event() for _ in addresses]
        self._lock = threading.Lock()
        self._channels: list[grpc.aio.Channel] = []
        self._calls: list[grpc.aio.Call] = []
        self._tasks: list[asyncio.Future[None]] = []
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
            def show(phase: str, fraction: float, detail: str) -> None:
                bars[i].n = int(100 * fraction) if phase == "CUT" else 100
                bars[i].set_postfix_str(phase.lower())

            self.workers[i].load(chained[i], show)

        try:
            with ThreadPoolExecutor(len(self.workers)) as pool:
                for done in [pool.submit(load_one, i) for i in range(len(self.workers))]:
                    done.result()
        finally:
            for bar in bars:
                bar.close()
        self.specs = chained

    def connect(self, sink: Callable[[RingEvent], None]) -> None:
        """Subscribe to every worker's results, then open the stream into worker 0.

        Called again, it only changes where the outcomes go (a new engine on the ring)."""
        self._sink = sink
        if self._io is not None:
            return
        if self._closed:
            raise WorkerLost(self._lost or "the ring was closed")
        self._io = _RingLoop()
        self._io.call(self._open(), SUBSCRIBE_TIMEOUT_S + 30)

    async def _open(self) -> None:
        """On the ring's loop: Results calls read by one task each, then worker 0's
        Forward stream with its writer task."""
        for i, w in enumerate(self.workers):
            channel = w.aio_channel()
            self._channels.append(channel)
            call = pb_grpc.WorkerStub(channel).Results(pb.ResultsRequest(),
                                                       metadata=w.metadata)
            self._calls.append(call)
            self._tasks.append(asyncio.ensure_future(self._read_results(i, call)))
        for i, subscribed in enumerate(self._subscribed):
            try:
                await asyncio.wait_for(subscribed.wait(), SUBSCRIBE_TIMEOUT_S)
            except asyncio.TimeoutError:  # not TimeoutError: they differ before 3.11
                raise WorkerLost(f"worker {self.addresses[i]} did not take the results "
                                 f"subscription within {SUBSCRIBE_TIMEOUT_S:.0f} s") from None
            if self._lost:
                raise WorkerLost(self._lost)
        first = self.workers[0]
        forward = pb_grpc.WorkerStub(self._channels[0]).Forward(metadata=first.metadata)
        self._calls.append(forward)
        self._tasks += [asyncio.ensure_future(self._write(forward)),
                        asyncio.ensure_future(self._drain_inline(forward))]

    # --- what comes back ---------------------------------------------------------------

    async def _read_results(self, i: int, call: grpc.aio.UnaryStreamCall) -> None:
        worker = self.addresses[i]
        try:
            async for reply in call:
                if not self._subscribed[i].is_set():  # the first reply: we are subscribed
                    self._subscribed[i].set()
                    continue
                # On the ring's loop: an idle engine handles the verdict here and its
                # next batch goes out from here too (`submit`), with no thread between.
                trace.mark("read", reply.batch_id)
                self._on_reply(worker, reply)
                # Let the writer send the batch this verdict made before this task arms
                # its next read (~0.05 ms of gRPC's own Python on this VM).
                await asyncio.sleep(0)
            # A worker never ends this call itself: its answers would stop coming.
            self._lose(f"worker {worker} ended its results stream")
        except grpc.aio.AioRpcError as exc:  # ignored once the ring is closing (`_lose`)
            self._lose(f"worker {worker} stopped: {exc.details()}")
        except Exception as exc:  # a bug: the engine recovers rather than waits forever
            log.exception("reading the results of %s", worker)
            self._lose(f"reading the results of {worker} failed: "
                       f"{type(exc).__name__}: {exc}")
        finally:
            self._subscribed[i].set()  # nobody waits out the timeout for a dead stream

    async def _drain_inline(self, call: grpc.aio.StreamStreamCall) -> None:
        try:  # inline errors repeat what worker 0 published to us
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as exc:
            self._lose(f"the stream to {self.addresses[0]} ended: {exc.details()}")

    async def _write(self, call: grpc.aio.StreamStreamCall) -> None:
        """Worker 0's stream, written in submission order, one message at a time."""
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._outbox:
                    messages = self._outbox.popleft()
                    if messages is None:  # closing
                        return
                    for msg in messages:
                        trace.mark("write", msg.batch_id)
                        await call.write(msg)
        except Exception as exc:  # the call ended (AioRpcError), or a bug: batches stop
            why = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else \
                f"{type(exc).__name__}: {exc}"
            self._lose(f"the stream to {self.addresses[0]} ended: {why}")

    def _on_reply(self, worker: str, reply: pb.ForwardReply) -> None:
        outcome = reply.WhichOneof("outcome")
        if outcome == "error":
            e = reply.error
            code = _CODES.get(e.code, grpc.StatusCode.UNKNOWN)
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                self._lose(f"{e.worker}: {e.message}")
            else:
                self._sink(BatchFailed(reply.batch_id, code, e.message, e.worker))
            return
        if outcome is None:
            return  # nothing to act on (no worker sends these today)
        result = result_from_wire(reply)
        # The workers report in ring order: the i-th time is the i-th worker's.
        named = list(zip(self.addresses, result.times, strict=False))
        self._sink(BatchDone(result, {a: s for a, (s, _) in named},
                             {a: b for a, (_, b) in named[:-1]}))

    def _lose(self, why: str) -> None:
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
        """Send a batch down the ring; its outcome arrives at the sink. Batches go out in
        the order they were submitted, from whichever thread."""
        if self._lost or self._closed:  # closed: a rebuild that failed left it behind
            raise WorkerLost(self._lost or "the ring was closed")
        io = self._io
        if io is None:
            raise WorkerLost("the ring is not connected")
        trace.mark("submit", batch.batch_id)
        self._outbox.append(batch_to_wire(Activations(batch)))
        if io.on_loop():  # a verdict's handler: the writer runs as soon as it returns
            self._wake.set()
            return
        try:
            io.loop.call_soon_threadsafe(self._wake.set)
        except RuntimeError:  # the loop closed under us: the ring is closing
            raise WorkerLost(self._lost or "the ring was closed") from None

    def truncate_all(self, seqs: list[int], length: int = 0) -> None:
        """Out-of-band reset of every stage, for a ring at rest (recovery)."""
        for w in self.workers:
            w.truncate(seqs, length)

    def node_infos(self) -> list[NodeInfo]:
        return [w.node_info() for w in self.workers]

    def close(self) -> None:
        self._closed = True
        io, self._io = self._io, None
        if io is not None:
            if io.on_loop():  # from a sink on the ring's own loop: end there, unwaited
                io.loop.create_task(self._shut()).add_done_callback(
                    lambda _: io.loop.stop())
            else:
                try:
                    io.call(self._shut(), CLOSE_TIMEOUT_S)
                except Exception as exc:  # still stop the loop, and say what went wrong
                    log.warning("closing the ring's streams: %s: %s",
                                type(exc).__name__, exc)
                io.stop(CLOSE_TIMEOUT_S)
        if self._owns_clients:
            for w in self.workers:
                w.close()

    async def _shut(self) -> None:
        self._outbox.append(None)
        self._wake.set()
        for call in self._calls:
            call.cancel()
        for channel in self._channels:
            await channel.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Nothing holds the channels: gRPC's aio poller thread ends with the last one.
        self._channels, self._calls, self._tasks = [], [], []


class _RingLoop:
    """The asyncio loop that runs a ring's streams, on a thread of its own."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True, name="ring-reader")
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def on_loop(self) -> bool:
        return threading.current_thread() is self.thread

    def call(self, work: Coroutine[Any, Any, T], timeout_s: float) -> T:
        """Run `work` on the loop and wait for its result (its exception is raised here)."""
        future = asyncio.run_coroutine_threadsafe(work, self.loop)
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise WorkerLost(f"the ring's streams did not answer within {timeout_s:.0f} s"
                             ) from None

    def stop(self, timeout_s: float) -> None:
        with contextlib.suppress(RuntimeError):  # already closed
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout_s)
