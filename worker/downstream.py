"""This worker's own long-lived Forward stream to the next worker in the ring."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import grpc

from cluster import trace
from cluster.auth import call_metadata, split_address
from cluster.errors import SpecshardError
from cluster.messages import Peer
from cluster.wire import worker_pb2 as pb
from cluster.wire import worker_pb2_grpc as pb_grpc
from cluster.wire_convert import CHANNEL_OPTIONS, error_to_wire
from worker.options import WorkerOptions

log = logging.getLogger(__name__)
CONNECT_TIMEOUT_S = 30.0
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]


class DownstreamUnavailable(SpecshardError):
    """The next worker cannot be reached; the batch is lost and the coordinator told."""


class Downstream:
    """Sends finished batches on; a broken stream fails every batch past this worker.

    A batch handed on is answered by the last worker, so this worker cannot tell which of
    the batches it sent were lost with the stream: it reports them all lost at once (an
    UNAVAILABLE error for batch 0 to its subscribers), and the coordinator recovers
    instead of waiting for answers that will not come.

    Messages are written to the stream by the task that computed them (`send`), not
    handed to a generator task: one event-loop hand-off less per hop (docs/overhead.md).
    A lock keeps a batch's chunks together when two streams feed this worker.
    """

    def __init__(self, peer: Peer, options: WorkerOptions,
                 publish: Callable[[pb.ForwardReply], Awaitable[None]]) -> None:
        self.peer = peer
        self._options = options
        self._publish = publish
        self._channel: grpc.aio.Channel | None = None
        self._call: grpc.aio.StreamStreamCall | None = None
        self._writing = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None
        self._closing = False

    def _open_channel(self) -> grpc.aio.Channel:
        options: list[tuple[str, int | str]] = list(CHANNEL_OPTIONS)
        if self.peer.server_name:
            options.append(("grpc.ssl_target_name_override", self.peer.server_name))
        if self.peer.tls:
            if self._options.tls is None:
                raise SpecshardError("the downstream worker wants TLS: give this worker "
                                     "--tls-cert/--tls-key (and --tls-ca)")
            return grpc.aio.secure_channel(self.peer.address,
                                           self._options.tls.channel_credentials(), options)
        return grpc.aio.insecure_channel(self.peer.address, options)

    async def connect(self) -> None:
        if self._channel is not None:  # a reconnect: the old channel goes first
            await self._channel.close()
            self._channel = None
        await self._reachable()
        self._channel = self._open_channel()
        try:
            await asyncio.wait_for(self._channel.channel_ready(), CONNECT_TIMEOUT_S)
        except asyncio.TimeoutError:  # not TimeoutError: they differ before Python 3.11
            raise DownstreamUnavailable(
                f"cannot reach the next worker at {self.peer.address}") from None
        stub = pb_grpc.WorkerStub(self._channel)
        self._call = stub.Forward(metadata=call_metadata(self._options.token))
        self._reader = asyncio.create_task(self._read(self._call))

    async def _reachable(self) -> None:
        """A refused connection fails at once: gRPC would retry it for the whole
        CONNECT_TIMEOUT_S while this worker's stream waits."""
        host, port = split_address(self.peer.address)
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5.0)
        except ConnectionRefusedError:
            raise DownstreamUnavailable(
                f"the next worker at {self.peer.address} refused the connection") from None
        except (OSError, asyncio.TimeoutError):
            return  # a slow route or a box still booting: gRPC gets the full wait
        writer.close()

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        try:
            async for reply in call:
                # The next worker already told its subscribers; this is for our log.
                log.warning("downstream %s refused batch %d: %s", self.peer.address,
                            reply.batch_id, reply.error.message)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED and not self._closing:
                why = f"the stream to {self.peer.address} broke: {exc.details()}"
                log.warning("%s", why)
                await self._publish(error_to_wire(0, _UNAVAILABLE, why, self._options.name))

    async def send(self, batch_id: int, messages: list[pb.ForwardMessage]) -> None:
        if self._reader is None or self._reader.done():
            if self._reader is not None:  # the stream broke: try once to open a new one
                log.info("reopening the stream to %s", self.peer.address)
            try:
                await self.connect()
            except DownstreamUnavailable:
                raise
            except Exception as exc:
                raise DownstreamUnavailable(
                    f"the next worker at {self.peer.address} is unavailable: {exc}") from exc
        call = self._call
        assert call is not None
        try:
            async with self._writing:
                for msg in messages:
                    trace.mark("send", batch_id)
                    await call.write(msg)
                    trace.mark("sent", batch_id)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            why = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            raise DownstreamUnavailable(f"batch {batch_id} could not be sent to "
                                        f"{self.peer.address}: {why}") from None

    async def close(self) -> None:
        self._closing = True
        if self._call is not None:
            # Bounded: a write may wait on a next worker that stopped reading. An ended
            # or stuck stream is ended by closing the channel below.
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError,
                                     asyncio.TimeoutError):
                await asyncio.wait_for(self._done_writing(self._call), 2.0)
        if self._reader:
            try:
                await asyncio.wait_for(self._reader, 2.0)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._reader.cancel()
        if self._channel:
            await self._channel.close()

    async def _done_writing(self, call: grpc.aio.StreamStreamCall) -> None:
        async with self._writing:  # after the batch being written, never inside it
            await call.done_writing()
