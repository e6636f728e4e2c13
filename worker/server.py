"""The gRPC worker: one stage, fed by its upstream, feeding its downstream (grpc.aio).

Steps arrive on a long-lived Forward stream, are reassembled (chunks), checked, run on
the stage in a single compute thread (llama.cpp contexts are not thread-safe; the event
loop stays free for health checks), and pushed to the next worker on this worker's own
stream. The last worker verifies and publishes results to its Results subscribers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cluster import models, trace
from cluster.auth import check_listen
from cluster.errors import InvalidForward, SpecshardError
from cluster.messages import Activations, LoadSpec, LoadUpdate, NodeInfo
from cluster.wire import worker_pb2 as pb
from cluster.wire import worker_pb2_grpc as pb_grpc
from cluster.wire_convert import (
    CHANNEL_OPTIONS,
    BatchAssembler,
    error_to_wire,
    load_from_wire,
    node_to_wire,
    progress_to_wire,
)
from worker.auth import TokenInterceptor
from worker.downstream import Downstream, DownstreamUnavailable
from worker.options import WorkerOptions
from worker.runner import StageRunner, versions

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["Worker"].full_name
T = TypeVar("T")
# A peer that vanished without closing its connection (a box powered off) is found by
# an unanswered ping and its calls end: a Results subscriber that stops reading would
# otherwise hold the last stage's writes once gRPC's flow-control window fills.
SERVER_KEEPALIVE: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 20_000), ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0)]
_INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]
_INTERNAL = grpc.StatusCode.INTERNAL.value[0]
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]


class WorkerService(pb_grpc.WorkerServicer):
    def __init__(self, options: WorkerOptions, health_servicer: health.aio.HealthServicer
                 ) -> None:
        self.options = options
        self.name = options.name
        self._health = health_servicer
        self._compute = ThreadPoolExecutor(1, thread_name_prefix="stage")
        self._runner: StageRunner | None = None
        self._spec: LoadSpec | None = None
        self._downstream: Downstream | None = None
        self._subscribers: set[_Subscriber] = set()
        self._load_lock = asyncio.Lock()

    # --- control -----------------------------------------------------------------------

    async def GetNodeInfo(self, request: pb.NodeInfoRequest, context: grpc.aio.ServicerContext
                          ) -> pb.NodeInfo:
        from cluster.hardware import host_info

        host = await asyncio.to_thread(host_info)
        runner = self._runner
        n_layer = runner.stage.model_n_layer if runner else 0
        # The RoPE values the stage computes with, not the ones it was asked for.
        stage = dataclasses.replace(self._spec, rope=runner.rope) if runner and self._spec \
            else self._spec
        return node_to_wire(NodeInfo(host, versions(), stage, n_layer,
                                     runner.capture if runner else ""))

    async def LoadStage(self, request: pb.LoadStageRequest, context: grpc.aio.ServicerContext
                        ) -> AsyncIterator[pb.LoadProgress]:
        async with self._load_lock:
            try:  # a spec that does not convert (bad rope values) is refused the same way
                spec = load_from_wire(request)
                async for update in self._load(spec):
                    yield progress_to_wire(update)
            except SpecshardError as exc:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))

    async def _load(self, spec: LoadSpec) -> AsyncIterator[LoadUpdate]:
        loop = asyncio.get_running_loop()
        if self._runner is None or self._spec is None or not self._spec_same_stage(spec):
            # Checked before the running stage is let go: a stage that cannot load leaves
            # the worker serving (and holding the caches of) the one it has.
            model = await asyncio.to_thread(models.resolve, spec.model_path)
            await asyncio.to_thread(StageRunner.check, model, spec)
            await self._health.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
            updates: asyncio.Queue[LoadUpdate] = asyncio.Queue()

            def report(done: int, total: int) -> None:
                loop.call_soon_threadsafe(updates.put_nowait, LoadUpdate(
                    "CUT", done / total if total else 1.0, f"{done}/{total} bytes"))

            old, self._runner = self._runner, None
            if old:
                await self._in_stage(old.close)
            task = asyncio.ensure_future(self._in_stage(StageRunner.open, model, spec, report))
            while not task.done() or not updates.empty():
                try:
                    yield await asyncio.wait_for(updates.get(), 0.2)
                except asyncio.TimeoutError:  # not TimeoutError: they differ before 3.11
                    continue
            self._runner = await task
            yield LoadUpdate("LOAD", 1.0, f"layers {spec.begin}:{spec.end} loaded")
        self._spec = spec
        if self._downstream:
            await self._downstream.close()
            self._downstream = None
        if spec.downstream:
            self._downstream = Downstream(spec.downstream, self.options, self._publish)
            await self._downstream.connect()
            yield LoadUpdate("CONNECT", 1.0, f"streaming to {spec.downstream.address}")
        await self._health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        yield LoadUpdate("READY", 1.0, self.name)

    def _spec_same_stage(self, spec: LoadSpec) -> bool:
        old = self._spec
        assert old is not None
        return (old.model_path, old.begin, old.end, old.n_ctx, old.n_seq_max, old.type_k,
                old.type_v, old.flash_attn, old.n_threads, old.rope) == \
            (spec.model_path, spec.begin, spec.end, spec.n_ctx, spec.n_seq_max, spec.type_k,
             spec.type_v, spec.flash_attn, spec.n_threads, spec.rope)

    async def Truncate(self, request: pb.TruncateRequest, context: grpc.aio.ServicerContext
                       ) -> pb.TruncateReply:
        """Out of band, for a pipeline at rest (recovery); in-flight steps use cancel."""
        runner = self._runner
        if runner is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no stage loaded")
        assert runner is not None
        try:
            lengths = await self._in_stage(runner.truncate, list(request.seqs),
                                           request.length)
        except InvalidForward as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return pb.TruncateReply(lengths=lengths)

    # --- the ring ----------------------------------------------------------------------

    async def Forward(self, request_iterator: AsyncIterator[pb.ForwardMessage],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ForwardReply]:
        assembler = BatchAssembler()
        if self._runner is not None:  # a new sender: what it breaks starts over
            await self._in_stage(self._runner.forget_chains)
        async for msg in _parsed(request_iterator, context):
            trace.mark("in", msg.batch_id)
            try:
                acts = assembler.add(msg)
                if acts is not None:
                    await self._process(acts)
            except InvalidForward as exc:
                yield await self._refuse(msg.batch_id, _INVALID, str(exc))
            except DownstreamUnavailable as exc:
                yield await self._refuse(msg.batch_id, _UNAVAILABLE, str(exc))
            except Exception as exc:  # a bug or llama.cpp failure: report, keep serving
                log.exception("batch %d failed", msg.batch_id)
                yield await self._refuse(msg.batch_id, _INTERNAL, str(exc))
        if assembler.pending is not None:
            # The sender left inside a batch: tell it, on its own stream only (the
            # coordinator learns of a lost upstream from that worker's Results, and recovers
            # rather than failing the batch's requests).
            yield error_to_wire(assembler.pending, _INVALID, f"the stream ended before the "
                                f"last chunk of batch {assembler.pending}", self.name)

    async def _refuse(self, batch_id: int, code: int, why: str) -> pb.ForwardReply:
        reply = error_to_wire(batch_id, code, why, self.name)
        await self._publish(reply)
        return reply

    async def _process(self, acts: Activations) -> None:
        runner = self._runner
        if runner is None:
            raise InvalidForward("no stage loaded")
        # On the compute thread, never on this loop: health checks answer from here
        # while a slow batch computes (a big model on a CPU box takes seconds).
        outcome = await self._in_stage(runner.run, acts, time.perf_counter())
        if outcome.reply is not None:  # the last stage's verdicts
            await self._publish(outcome.reply)
            return
        if self._downstream is None:
            raise InvalidForward("this stage has no downstream worker")
        await self._downstream.send(acts.batch.batch_id, outcome.downstream)

    async def _in_stage(self, work: Callable[..., T], *args: object) -> T:
        """`work` on the single compute thread: llama.cpp contexts are not thread-safe."""
        return await asyncio.get_running_loop().run_in_executor(self._compute, work, *args)

    async def _publish(self, reply: pb.ForwardReply) -> None:
        """To every Results subscriber, written by the task that has the reply (no
        queue and generator task in between: docs/overhead.md). A subscriber that stops
        reading holds this back once its flow-control window is full, until its call
        ends (the coordinator closes it, or SERVER_KEEPALIVE finds the peer gone)."""
        for sub in list(self._subscribers):
            try:
                async with sub.writing:
                    trace.mark("send", reply.batch_id)
                    await sub.context.write(reply)
                    trace.mark("sent", reply.batch_id)
            except Exception as exc:  # its call ended (a coordinator gone): drop it
                log.info("a results subscriber left (%s): %s", type(exc).__name__, exc)
                self._subscribers.discard(sub)
                sub.failed = f"{type(exc).__name__}: {exc}"
                sub.gone.set()

    async def Results(self, request: pb.ResultsRequest,
                      context: grpc.aio.ServicerContext) -> None:
        sub = _Subscriber(context)
        self._subscribers.add(sub)
        try:
            async with sub.writing:  # subscribed: the caller may start sending steps
                await context.write(pb.ForwardReply())
            await sub.gone.wait()  # replies are written by _publish; a cancel ends this
            # A write failed: if the caller is still there, it hears so now rather than
            # waiting for answers that will not come.
            await context.abort(grpc.StatusCode.INTERNAL,
                                f"{self.name}: a reply could not be written: {sub.failed}")
        finally:
            self._subscribers.discard(sub)

    async def close(self) -> None:
        if self._downstream:
            await self._downstream.close()
        if self._runner:
            await self._in_stage(self._runner.close)
        self._compute.shutdown(wait=True)


@dataclass(eq=False)
class _Subscriber:
    """A Results call: replies are written to its context, one writer at a time."""

    context: grpc.aio.ServicerContext
    writing: asyncio.Lock = field(default_factory=asyncio.Lock)
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    failed: str = ""  # why a write to it failed


async def _parsed(messages: AsyncIterator[pb.ForwardMessage],
                  context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ForwardMessage]:
    """The stream's messages; bytes that are no message end it INVALID_ARGUMENT (gRPC would
    report the parser's exception as UNKNOWN)."""
    try:
        async for msg in messages:
            yield msg
    except DecodeError as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"a message does not parse: {exc}")


@dataclass
class RunningWorker:
    server: grpc.aio.Server
    service: WorkerService
    port: int

    async def stop(self, grace: float = 2.0) -> None:
        await self.server.stop(grace)
        await self.service.close()


async def start_worker(options: WorkerOptions) -> RunningWorker:
    check_listen(options.listen, options.token)
    interceptors = [TokenInterceptor(options.token)] if options.token else []
    server = grpc.aio.server(interceptors=interceptors,
                             options=[*CHANNEL_OPTIONS, *SERVER_KEEPALIVE])
    health_servicer = health.aio.HealthServicer()
    service = WorkerService(options, health_servicer)
    pb_grpc.add_WorkerServicer_to_server(service, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    if options.tls:
        port = server.add_secure_port(options.listen, options.tls.server_credentials())
    else:
        port = server.add_insecure_port(options.listen)
    if port == 0:
        raise SpecshardError(f"cannot listen on {options.listen}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    if not service.name:
        service.name = f"{options.listen.rpartition(':')[0]}:{port}"
    log.info("worker listening on port %d", port)
    return RunningWorker(server, service, port)


def run_worker(options: WorkerOptions, port_file: Path | None = None) -> None:
    """Serve until SIGTERM/SIGINT; write the bound port to `port_file` once listening."""
    import signal

    async def main() -> None:
        worker = await start_worker(options)
        if port_file:
            tmp = port_file.with_suffix(".tmp")
            tmp.write_text(str(worker.port))
            tmp.replace(port_file)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await worker.stop()

    asyncio.run(main())
