"""Where the engine's step runs: one thread owns every sequence (docs/architecture.md).
The ring's reader threads only hand verdicts over; the owner check the suite turns on
(SPECSHARD_OWNER_CHECK=1) makes a write from any other thread fail at once."""

from __future__ import annotations

import json
import os
import queue
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.overhead import SEGMENTS, trace_segments
from cluster import trace
from cluster.stage_cut import split_at
from coordinator.constrain.state import Constraint
from coordinator.engine import ownership
from coordinator.engine.request import Failed, Finished, GenerationRequest, TextChunk
from coordinator.placement.local import LocalWorkers
from coordinator.ring.builder import BuiltRing, build_ring
from coordinator.ring.supervisor import StaticWorkers
from coordinator.service import start_engine
from coordinator.speculation.gamma import FREE_DRAFT
from coordinator.tokenizer import Tokenizer

N_TOKENS = 40
WAIT = 60.0


@pytest.fixture()
def grpc_ring(tiny_chat_model: Path) -> Iterator[BuiltRing]:
    with LocalWorkers(2) as workers:
        built = build_ring(tiny_chat_model,
                           workers=StaticWorkers(workers.addresses, workers.token, None),
                           ctx=512, threads=1, split=split_at(4, [2]))
        try:
            yield built
        finally:
            built.close()


def decode(built: BuiltRing, model: Path) -> tuple[list[int], Counter[str]]:
    """Greedy tokens of one request, and which threads delivered its token events."""
    tokenizer = Tokenizer(model)
    prompt = tokenizer.encode(tokenizer.chat_prompt([{"role": "user", "content": "hi"}]))
    engine = start_engine(built, tokenizer, "test", costs=FREE_DRAFT)
    events: queue.Queue[tuple[str, object]] = queue.Queue()
    try:
        engine.submit(GenerationRequest(prompt, N_TOKENS, ignore_eos=True),
                      lambda e: events.put((threading.current_thread().name, e)))
        tokens: list[int] = []
        threads: Counter[str] = Counter()
        while True:
            name, event = events.get(timeout=WAIT)
            if isinstance(event, TextChunk):
                tokens += event.token_ids
                threads[name] += 1
            elif isinstance(event, Finished):
                return tokens, threads
            else:
                pytest.fail(f"unexpected event {event!r}")
    finally:
        engine.close()


def test_every_step_runs_on_the_engine_thread(grpc_ring: BuiltRing,
                                              tiny_chat_model: Path) -> None:
    tokens, threads = decode(grpc_ring, tiny_chat_model)
    local = build_ring(tiny_chat_model, ctx=512, threads=1, split=split_at(4, [2]))
    try:
        in_process, local_threads = decode(local, tiny_chat_model)
    finally:
        local.close()
    assert len(tokens) == N_TOKENS and tokens == in_process
    # Verdicts are read on the ring's threads and applied on the engine's only.
    assert set(threads) == {"engine-core"} and set(local_threads) == {"engine-core"}


def test_a_sequence_written_from_another_thread_fails_the_owner_check(
        tiny_chat_model: Path) -> None:
    assert ownership.CHECKED  # tests/conftest.py turns the check on
    tokenizer = Tokenizer(tiny_chat_model)
    built = build_ring(tiny_chat_model, ctx=512, threads=1, split=split_at(4, [2]))
    engine = start_engine(built, tokenizer, "test", costs=FREE_DRAFT)
    events: queue.Queue[object] = queue.Queue()
    try:
        seq = engine.submit(GenerationRequest(tokenizer.encode("hello"), 400,
                                              ignore_eos=True), events.put)
        assert isinstance(events.get(timeout=WAIT), TextChunk)  # admitted and decoding
        with pytest.raises(ownership.OwnerViolation, match="n_sent"):
            seq.n_sent = 0
        engine.cancel(seq)
        while not isinstance(event := events.get(timeout=WAIT), Finished):
            assert isinstance(event, TextChunk), event
        assert event.finish_reason == "abort"
    finally:
        engine.close()
        built.close()


def test_a_traced_ring_times_every_part_of_a_step(tiny_chat_model: Path, tmp_path: Path
                                                 ) -> None:
    """SPECSHARD_TRACE (cluster/trace.py): the coordinator and both workers mark every
    point of every step, so bench/overhead.py can split a step into its parts."""
    trace.start(str(tmp_path / "trace"))
    try:
        with LocalWorkers(2) as workers:
            built = build_ring(tiny_chat_model,
                               workers=StaticWorkers(workers.addresses, workers.token, None),
                               ctx=512, threads=1, split=split_at(4, [2]))
            try:
                tokens, _ = decode(built, tiny_chat_model)
            finally:
                built.close()
    finally:
        coordinator = trace.stop()
    assert len(tokens) == N_TOKENS
    files = sorted(tmp_path.glob("trace.*.json"))  # written by each worker as it exits
    assert len(files) == 2, files
    segments = trace_segments(coordinator, [json.loads(f.read_text()) for f in files])
    assert list(segments) == [name for name, _, _ in SEGMENTS]
    assert all(ms > 0 for ms in segments.values()), segments
    assert os.environ.get(trace.ENV) is None  # later processes are not traced


class BrokenGrammar(Constraint):
    """A request's grammar that fails when the engine asks for its masks."""

    def __init__(self) -> None:  # no matcher: it never gets that far
        self.what = "grammar"

    def slice_masks(self, guesses: list[int]) -> tuple[int, list[bytes]]:
        raise RuntimeError("this grammar cannot say what comes next")


def test_a_window_that_cannot_be_built_fails_its_request_alone(
        grpc_ring: BuiltRing, tiny_chat_model: Path) -> None:
    """Building a window raises for one request (its grammar, here) while another
    decodes beside it in the same batches: that request fails, the other finishes with
    its solo tokens."""
    tokenizer = Tokenizer(tiny_chat_model)
    prompt = tokenizer.encode(tokenizer.chat_prompt([{"role": "user", "content": "hi"}]))
    alone, _ = decode(grpc_ring, tiny_chat_model)
    engine = start_engine(grpc_ring, tokenizer, "test", costs=FREE_DRAFT)
    good: queue.Queue[object] = queue.Queue()
    bad: queue.Queue[object] = queue.Queue()
    try:
        engine.submit(GenerationRequest(prompt, N_TOKENS, ignore_eos=True), good.put)
        engine.submit(GenerationRequest(prompt, N_TOKENS, ignore_eos=True,
                                        constraint=BrokenGrammar()), bad.put)
        failed = bad.get(timeout=WAIT)
        assert isinstance(failed, Failed) and "cannot say what comes next" in str(failed.error)
        tokens: list[int] = []
        while not isinstance(event := good.get(timeout=WAIT), Finished):
            assert isinstance(event, TextChunk), event
            tokens += event.token_ids
        assert event.finish_reason == "length" and tokens == alone
    finally:
        engine.close()
