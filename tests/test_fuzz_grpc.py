"""Malformed calls from a raw gRPC client against real worker processes holding a loaded
2-stage ring (issue 9): each is refused — INVALID_ARGUMENT inline on Forward or in the
call status, UNAUTHENTICATED, FAILED_PRECONDITION for LoadStage — and afterwards every
sequence's KV length is what it was, both workers report SERVING, and a greedy decode
through the ring gives the tokens (and bit-identical logits) it gave before.

Cases: FORWARD and calls() in tests/fuzz_grpc_cases.py (one test each), and the stream
and wire cases here. The tiny model: token ids and hidden bytes are ours to send."""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.auth import call_metadata
from cluster.messages import Batch, SeqResult, Slice
from cluster.sampling import SamplingParams
from cluster.stage_cut import split_at
from cluster.wire import worker_pb2 as pb
from cluster.wire import worker_pb2_grpc as pb_grpc
from coordinator.placement.local import LocalWorkers
from coordinator.ring.builder import BuiltRing, build_ring
from coordinator.ring.contract import BatchDone, BatchFailed, RingEvent
from coordinator.ring.supervisor import StaticWorkers
from tests.fuzz_grpc_cases import (
    CUT,
    FORWARD,
    INVALID,
    L0,
    L1,
    LAST,
    N_CTX,
    N_LAYER,
    N_SEQ,
    PROMPT,
    PROMPT1,
    STEPS,
    Call,
    Fwd,
    calls,
    chunked,
)
from tests.tiny_gguf import write_tiny_model

pytestmark = pytest.mark.slow
WAIT = 30.0  # per call: a hang fails the test instead of stalling the run
SERVICE = pb.DESCRIPTOR.services_by_name["Worker"].full_name


class Events:
    """The ring's outcomes: answers in order, refusals by batch id."""

    def __init__(self) -> None:
        self.done: queue.Queue[BatchDone] = queue.Queue()
        self.refused: dict[int, list[BatchFailed]] = {}
        self.lost: list[RingEvent] = []
        self._changed = threading.Condition()

    def __call__(self, event: RingEvent) -> None:
        if isinstance(event, BatchDone):
            self.done.put(event)
            return
        with self._changed:
            if isinstance(event, BatchFailed):
                self.refused.setdefault(event.batch_id, []).append(event)
            else:
                self.lost.append(event)
            self._changed.notify_all()

    def wait_refused(self, batch_id: int, n: int) -> list[BatchFailed]:
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.refused.get(batch_id, [])) >= n,
                                          WAIT), f"batch {batch_id}: no refusal published"
            return self.refused[batch_id]


@dataclass
class Fuzz:
    built: BuiltRing
    token: str
    addresses: list[str]
    channels: list[grpc.Channel]
    events: Events = field(default_factory=Events)
    reference: tuple[list[int], np.ndarray] | None = None
    kv: list[list[int]] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    next_id: int = 1_000_000
    cases_run: int = 0

    @property
    def stubs(self) -> list[pb_grpc.WorkerStub]:
        return [pb_grpc.WorkerStub(c) for c in self.channels]

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return call_metadata(self.token)

    def call(self, piece: Slice) -> SeqResult:
        self.next_id += 1
        self.built.ring.submit(Batch(self.next_id, [piece]))
        done = self.events.done.get(timeout=WAIT)
        assert done.result.batch_id == self.next_id
        return done.result.results[0]

    def lengths(self) -> list[list[int]]:
        """Every sequence's KV length on each worker (a Truncate that cuts nothing)."""
        return [list(s.Truncate(pb.TruncateRequest(length=2**32 - 1), metadata=self.metadata,
                                timeout=WAIT).lengths) for s in self.stubs]


def greedy(fz: Fuzz) -> tuple[list[int], np.ndarray]:
    """Sequence 0: PROMPT from position 0 (dropping what it held), then STEPS tokens."""
    first = fz.call(Slice(0, 0, PROMPT, return_logits=True))
    assert first.logits is not None
    tokens = [first.next_token]
    for _ in range(STEPS - 1):
        tokens.append(fz.call(Slice(0, len(PROMPT) + len(tokens) - 1, [tokens[-1]])
                              ).next_token)
    return tokens, first.logits


def model_files(tmp: Path) -> tuple[Path, Path, Path]:
    """The model, a file that is no GGUF, and a GGUF cut inside its header."""
    model = write_tiny_model(tmp / "tiny.gguf")
    junk = tmp / "junk.gguf"
    junk.write_bytes(b"this is not a model" * 10)
    torn = tmp / "torn.gguf"
    torn.write_bytes(model.read_bytes()[:200])
    return model, junk, torn


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzz]:
    model, junk, torn = model_files(tmp_path_factory.mktemp("fuzz-grpc"))
    with LocalWorkers(2) as workers:
        built = build_ring(model, workers=StaticWorkers(workers.addresses, workers.token,
                                                        None),
                           ctx=N_CTX, parallel=N_SEQ, split=split_at(N_LAYER, [CUT]))
        fz = Fuzz(built, workers.token, workers.addresses,
                  [grpc.insecure_channel(a) for a in workers.addresses],
                  calls=calls(model, junk, torn))
        try:
            built.ring.connect(fz.events)
            fz.reference = greedy(fz)
            fz.call(Slice(1, 0, PROMPT1))
            fz.kv = fz.lengths()
            assert fz.kv == [[L0, L1], [L0, L1]]
            yield fz
        finally:
            for channel in fz.channels:
                channel.close()
            built.close()


def assert_unharmed(fz: Fuzz) -> None:
    assert fz.lengths() == fz.kv
    for channel in fz.channels:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE), metadata=fz.metadata, timeout=WAIT)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert fz.reference is not None
    tokens, logits = greedy(fz)
    assert tokens == fz.reference[0] and np.array_equal(logits, fz.reference[1])
    assert fz.lengths() == fz.kv  # the replay computed exactly what was there
    assert not fz.events.lost


def renumbered(messages: list[pb.ForwardMessage], offset: int) -> list[pb.ForwardMessage]:
    """The messages with batch ids of their own, so no case hears another's refusals."""
    out = []
    for msg in messages:
        copy = pb.ForwardMessage()
        copy.CopyFrom(msg)
        copy.batch_id += offset
        out.append(copy)
    return out


# --- the cases --------------------------------------------------------------------------

@pytest.mark.parametrize("case", FORWARD, ids=[c.name for c in FORWARD])
def test_a_malformed_forward_is_refused_and_changes_nothing(case: Fwd, fuzz: Fuzz) -> None:
    fuzz.cases_run += 1
    messages = renumbered(case.messages, 1000 * fuzz.cases_run)
    replies = list(fuzz.stubs[case.worker].Forward(iter(messages), metadata=fuzz.metadata,
                                                   timeout=WAIT))
    assert replies, "no answer"
    for reply in replies:
        assert reply.WhichOneof("outcome") == "error", reply
        assert reply.error.code == INVALID.value[0], reply
    assert case.words in replies[0].error.message, replies[0].error.message
    if case.published:  # the coordinator is told too, through the Results stream
        refused = fuzz.events.wait_refused(replies[0].batch_id, 1)
        assert refused[0].code == INVALID.name
    assert_unharmed(fuzz)


CALL_NAMES = [c.name for c in calls(Path("m"), Path("j"), Path("t"))]  # paths: at run time


@pytest.mark.parametrize("name", CALL_NAMES)
def test_a_refused_call_changes_nothing(name: str, fuzz: Fuzz) -> None:
    case = next(c for c in fuzz.calls if c.name == name)
    stub, metadata = fuzz.stubs[case.worker], case.auth(fuzz.token)
    with pytest.raises(grpc.RpcError) as caught:
        if case.rpc == "Truncate":
            stub.Truncate(case.request, metadata=metadata, timeout=WAIT)
        elif case.rpc == "LoadStage":
            list(stub.LoadStage(case.request, metadata=metadata, timeout=WAIT))
        else:
            list(stub.Forward(iter([case.request]), metadata=metadata, timeout=WAIT))
    error = cast(grpc.Call, caught.value)
    assert error.code() == case.code, error.details()
    assert case.words in (error.details() or ""), error.details()
    assert_unharmed(fuzz)


def test_a_stream_cancelled_inside_a_batch_changes_nothing(fuzz: Fuzz) -> None:
    sent, release = threading.Event(), threading.Event()

    def messages() -> Iterator[pb.ForwardMessage]:
        yield chunked(3)[0]  # the head of a batch whose other chunks never come
        sent.set()
        release.wait(WAIT)

    call = fuzz.stubs[LAST].Forward(messages(), metadata=fuzz.metadata, timeout=WAIT)
    try:
        assert sent.wait(WAIT)
        time.sleep(0.3)  # the head reaches the worker before the stream is torn down
        call.cancel()
        with pytest.raises(grpc.RpcError) as caught:
            list(call)
        assert cast(grpc.Call, caught.value).code() == grpc.StatusCode.CANCELLED
    finally:
        release.set()
    assert_unharmed(fuzz)


def test_a_message_cut_short_is_refused(fuzz: Fuzz) -> None:
    # Bytes that do not parse as a ForwardMessage: cut inside the hidden states' bytes.
    whole = chunked(2)[0].SerializeToString()
    forward = fuzz.channels[LAST].stream_stream(
        f"/{SERVICE}/Forward", request_serializer=None,
        response_deserializer=pb.ForwardReply.FromString)
    with pytest.raises(grpc.RpcError) as caught:
        list(forward(iter([whole[:-7]]), metadata=fuzz.metadata, timeout=WAIT))
    error = cast(grpc.Call, caught.value)
    assert error.code() == INVALID, error.details()
    assert "does not parse" in (error.details() or "")
    assert_unharmed(fuzz)


@pytest.mark.parametrize("data", [
    b"\xff" * 4096,  # not HTTP/2
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x00\x00\x00\x00\x00\x00\x01",  # cut frame
], ids=["garbage", "a frame cut short"])
def test_raw_bytes_on_the_port_are_closed_on(data: bytes, fuzz: Fuzz) -> None:
    host, _, port = fuzz.addresses[LAST].rpartition(":")
    with socket.create_connection((host, int(port)), timeout=WAIT) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(4096):  # a timeout here is a hang: the test fails
            pass
    assert_unharmed(fuzz)


def test_two_hundred_refusals_on_one_stream(fuzz: Fuzz) -> None:
    singles = [c.messages[0] for c in FORWARD if c.worker == LAST and len(c.messages) == 1]
    messages = [renumbered([singles[i % len(singles)]], 10**6 + i)[0] for i in range(200)]
    replies = list(fuzz.stubs[LAST].Forward(iter(messages), metadata=fuzz.metadata,
                                            timeout=WAIT))
    assert [r.batch_id for r in replies] == [m.batch_id for m in messages]
    assert all(r.error.code == INVALID.value[0] for r in replies)
    assert_unharmed(fuzz)


def test_a_top_k_past_uint32_crosses_the_wire(fuzz: Fuzz) -> None:
    # The HTTP API takes any top_k; on the wire it is uint32, and any k ≥ the vocabulary
    # is no filter: the same draw as top_k 0.
    huge = fuzz.call(Slice(1, 0, PROMPT1, SamplingParams(1.0, top_k=2**40), step_seed=7))
    off = fuzz.call(Slice(1, 0, PROMPT1, SamplingParams(1.0), step_seed=7))
    assert huge.tokens == off.tokens
    assert_unharmed(fuzz)


def test_a_results_subscriber_that_leaves_is_dropped(fuzz: Fuzz) -> None:
    """Replies are written to every Results call; one that ends (its coordinator gone)
    is dropped at the next reply and the others keep theirs."""
    extra = fuzz.stubs[LAST].Results(pb.ResultsRequest(), metadata=fuzz.metadata,
                                     timeout=WAIT)
    assert next(extra).WhichOneof("outcome") is None  # the subscription's empty reply
    case = next(c for c in FORWARD if c.worker == LAST and c.published
                and len(c.messages) == 1)
    fuzz.cases_run += 1
    messages = renumbered(case.messages, 1000 * fuzz.cases_run)
    list(fuzz.stubs[LAST].Forward(iter(messages), metadata=fuzz.metadata, timeout=WAIT))
    got = next(extra)
    assert (got.batch_id, got.WhichOneof("outcome")) == (messages[0].batch_id, "error")
    extra.cancel()
    assert_unharmed(fuzz)  # its replies after the cancel reach the ring's subscriber
