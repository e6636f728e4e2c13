"""This worker's own long-lived Forward stream to the next worker in the ring."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from cluster.auth import call_metadata
from cluster.errors import SpecshardError
from cluster.messages import Hop, Peer
from cluster.wire import worker_pb2 as pb
from cluster.wire import worker_pb2_grpc as pb_grpc
from cluster.wire_convert import MAX_MESSAGE_BYTES, hop_to_wire

if TYPE_CHECKING:
    from worker.server import WorkerOptions

log = logging.getLogger(__name__)
CONNECT_TIMEOUT_S = 30.0
_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES + (1 << 16)),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES + (1 << 16))]


class DownstreamUnavailable(SpecshardError):
    """The next worker cannot be reached; the step is lost and the coordinator told."""


class Downstream:
    def __init__(self, peer: Peer, options: WorkerOptions, f16: bool = False) -> None:
        self.peer = peer
        self._options = options
        self._f16 = f16  # halve the bytes on the wire, at the cost of bit-exactness
        self._channel: grpc.aio.Channel | None = None
        self._queue: asyncio.Queue[pb.ForwardMessage | None] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None

    def _open_channel(self) -> grpc.aio.Channel:
        options: list[tuple[str, int | str]] = list(_OPTIONS)
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
        self._channel = self._open_channel()
        try:
            await asyncio.wait_for(self._channel.channel_ready(), CONNECT_TIMEOUT_S)
        except TimeoutError:
            raise DownstreamUnavailable(
                f"cannot reach the next worker at {self.peer.address}") from None
        self._start_stream()

    def _start_stream(self) -> None:
        assert self._channel is not None
        self._queue = asyncio.Queue()
        stub = pb_grpc.WorkerStub(self._channel)
        call = stub.Forward(self._requests(self._queue),
                            metadata=call_metadata(self._options.token))
        self._reader = asyncio.create_task(self._read(call))

    @staticmethod
    async def _requests(queue: asyncio.Queue[pb.ForwardMessage | None]
                        ) -> AsyncIterator[pb.ForwardMessage]:
        while (msg := await queue.get()) is not None:
            yield msg

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        try:
            async for reply in call:
                # The next worker already told its subscribers; this is for our log.
                log.warning("downstream %s refused step %d: %s", self.peer.address,
                            reply.step_id, reply.error.message)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                log.warning("stream to %s ended: %s", self.peer.address, exc.details())

    async def send(self, hop: Hop) -> None:
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
        for msg in hop_to_wire(hop, f16=False if hop.cancel else self._f16):
            self._queue.put_nowait(msg)

    async def close(self) -> None:
        self._queue.put_nowait(None)
        if self._reader:
            try:
                await asyncio.wait_for(self._reader, 2.0)
            except (TimeoutError, asyncio.CancelledError):
                self._reader.cancel()
        if self._channel:
            await self._channel.close()
