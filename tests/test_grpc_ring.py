"""The ring over real loopback gRPC: worker processes, the demo target, bit-exact."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.auth import call_metadata
from cluster.messages import Batch, Slice
from cluster.stage_cut import StageSpec, even_split, split_at
from cluster.wire import worker_pb2 as pb
from cluster.wire import worker_pb2_grpc as pb_grpc
from coordinator.engine.request import GenerationRequest
from coordinator.placement.local import LocalWorkers
from coordinator.ring.builder import BuiltRing, build_ring
from coordinator.ring.grpc_ring import GrpcRing
from coordinator.ring.local_ring import LocalRing
from coordinator.ring.supervisor import StaticWorkers
from coordinator.service import start_engine
from coordinator.speculation.gamma import FREE_DRAFT
from coordinator.tokenizer import Tokenizer
from tests.ring_calls import Caller

pytestmark = pytest.mark.slow
N_TOKENS = 32
N_CTX = 1024
INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]
SPLITS = {2: split_at(28, [14]), 3: split_at(28, [9, 19])}


@pytest.fixture(scope="module")
def tokenizer(demo_target: Path) -> Tokenizer:
    return Tokenizer(demo_target)


@pytest.fixture(scope="module")
def prompt(tokenizer: Tokenizer) -> list[int]:
    return tokenizer.encode(tokenizer.chat_prompt(
        [{"role": "user", "content": "Write a Python function that merges two sorted lists."}]))


def greedy_tokens(built: BuiltRing, tokenizer: Tokenizer, prompt: list[int]) -> list[int]:
    engine = start_engine(built, tokenizer, "test", costs=FREE_DRAFT)
    try:
        return engine.generate(GenerationRequest(prompt, N_TOKENS, ignore_eos=True)).tokens
    finally:
        engine.close()


def first_logits(built: BuiltRing, prompt: list[int]) -> np.ndarray:
    result = Caller(built.ring).call(Slice(0, 0, prompt, return_logits=True))
    logits = result.results[0].logits
    assert logits is not None
    return logits[-1]


@pytest.fixture(scope="module")
def reference(demo_target: Path, tokenizer: Tokenizer, prompt: list[int]
              ) -> tuple[np.ndarray, list[int]]:
    built = build_ring(demo_target, stages=1, ctx=N_CTX, threads=2)
    try:
        return first_logits(built, prompt), greedy_tokens(built, tokenizer, prompt)
    finally:
        built.close()


@pytest.fixture(scope="module")
def workers() -> Iterator[LocalWorkers]:
    with LocalWorkers(3) as running:
        yield running


def ring_of(workers: LocalWorkers, model: Path, split: list[StageSpec], n: int,
            parallel: int = 1) -> BuiltRing:
    static = StaticWorkers(workers.addresses[:n], workers.token, None)
    return build_ring(model, workers=static, ctx=N_CTX, parallel=parallel, split=split)


@pytest.fixture()
def ring(request, workers: LocalWorkers, demo_target: Path) -> Iterator[BuiltRing]:
    n = request.param
    built = ring_of(workers, demo_target, SPLITS[n], n)
    try:
        yield built
    finally:
        built.close()


@pytest.mark.parametrize("ring", [2, 3], indirect=True)
def test_ring_equals_one_stage(ring: BuiltRing, reference, prompt, tokenizer):
    assert np.abs(first_logits(ring, prompt) - reference[0]).max() == 0.0
    ring.ring.truncate_all([], 0)
    tokens = greedy_tokens(ring, tokenizer, prompt)
    assert len(tokens) == N_TOKENS
    assert tokens == reference[1]


@pytest.mark.parametrize("ring", [2], indirect=True)
def test_long_prefill_is_chunked_and_still_exact(ring: BuiltRing, demo_target: Path,
                                                 tokenizer: Tokenizer):
    # 760 rows × 1536 × 4 bytes = 4.7 MB of hidden states between the two workers, and
    # more rows than a llama_decode takes (512): split on the wire and in the stage.
    text = "\n".join(f"def f{i}(x):\n    return x * {i}" for i in range(76))
    long_prompt = tokenizer.encode(text)[:760]
    assert len(long_prompt) == 760
    piece = Slice(0, 0, long_prompt, return_logits=True)
    got = Caller(ring.ring).call(piece).results[0].logits
    local = LocalRing.load(demo_target, even_split(28, 1), n_ctx=N_CTX)
    try:
        want = local.logits(Batch(0, [piece]))[0][0]
    finally:
        local.close()
    assert got is not None and np.abs(got - want).max() == 0.0


@pytest.mark.parametrize("ring", [2], indirect=True)
def test_a_reply_with_many_logit_rows_crosses_the_ring(ring: BuiltRing, prompt: list[int]):
    """8 judged rows × 151,936 × 4 bytes = 4.9 MB of logits in one reply: over gRPC's
    4 MiB default, under the one limit every channel of the ring shares."""
    piece = Slice(0, 0, prompt, n_draft=7, return_logits=True)
    result = Caller(ring.ring).call(piece).results[0]
    assert result.logits is not None and result.logits.shape == (8, 151936)


def test_pipelined_chunks_give_the_logits_of_one_stage_fed_the_same_chunks(
        workers: LocalWorkers, demo_target: Path, tokenizer: Tokenizer):
    """Chunks sent back to back (stage 0 computes chunk c+1 while stage 1 computes c)
    leave the same caches as one in-process stage prefilled chunk by chunk."""
    text = "\n".join(f"def g{i}(x):\n    return x + {i}" for i in range(30))
    long_prompt = tokenizer.encode(text)[:300]
    chunks = [long_prompt[i:i + 64] for i in range(0, len(long_prompt), 64)]
    slices = [Slice(0, 64 * k, c, judge=k == len(chunks) - 1, return_logits=True)
              for k, c in enumerate(chunks)]
    built = ring_of(workers, demo_target, SPLITS[2], 2)
    try:
        caller = Caller(built.ring)
        for k, piece in enumerate(slices):
            caller.send(Batch(k + 1, [piece]))  # all in flight before any answer
        answers = [caller.wait() for _ in slices]
    finally:
        built.close()
    assert [a.batch_id for a in answers] == list(range(1, len(slices) + 1))
    got = answers[-1].results[0].logits
    local = LocalRing.load(demo_target, even_split(28, 1), n_ctx=N_CTX)
    try:
        want = [local.logits(Batch(0, [piece]))[0] for piece in slices][-1][0]
    finally:
        local.close()
    assert got is not None and np.abs(got - want).max() == 0.0


# --- a worker refuses what does not fit, and keeps serving ------------------------------

def stub(address: str, token: str | None) -> tuple[pb_grpc.WorkerStub, tuple, grpc.Channel]:
    channel = grpc.insecure_channel(address)
    return pb_grpc.WorkerStub(channel), call_metadata(token), channel


def lengths(address: str, token: str) -> list[int]:
    s, metadata, channel = stub(address, token)
    with channel:
        return list(s.Truncate(pb.TruncateRequest(length=2**32 - 1),
                               metadata=metadata).lengths)


def send_one(address: str, token: str, msg: pb.ForwardMessage) -> pb.ForwardReply:
    s, metadata, channel = stub(address, token)
    with channel:
        call = s.Forward(iter([msg]), metadata=metadata, timeout=60)
        return next(iter(call))


@pytest.fixture()
def loaded_ring(workers: LocalWorkers, demo_target: Path, prompt: list[int]
                ) -> Iterator[BuiltRing]:
    built = ring_of(workers, demo_target, SPLITS[2], 2, parallel=2)
    try:
        Caller(built.ring).call(Slice(0, 0, prompt))
        yield built
    finally:
        built.close()


def forward(batch_id: int, *slices: pb.Slice, hidden: bytes = b"", n_embd: int = 0
            ) -> pb.ForwardMessage:
    return pb.ForwardMessage(batch_id=batch_id, slices=list(slices), hidden=hidden,
                             n_embd=n_embd, n_chunks=1)


def malformed(prompt: list[int]) -> dict[str, tuple[int, pb.ForwardMessage, str]]:
    n = len(prompt)
    return {
        "wrong byte length": (1, forward(1, pb.Slice(seq=0, start=n, tokens=[1]),
                                         hidden=b"\0" * 1000, n_embd=1536), "bytes"),
        "unknown sequence": (0, forward(3, pb.Slice(seq=7, start=0, tokens=[1])),
                             "unknown sequence"),
        "past the context": (0, forward(4, pb.Slice(seq=0, start=n,
                                                    tokens=[1] * (N_CTX + 1 - n))), "context"),
        "hole in the sequence": (0, forward(5, pb.Slice(seq=0, start=n + 5, tokens=[1])),
                                 "continue"),
        "token id out of range": (0, forward(6, pb.Slice(seq=0, start=n, tokens=[10**7])),
                                  "out of range"),
        "one bad slice of two": (0, forward(7, pb.Slice(seq=1, start=0, tokens=[5, 6]),
                                            pb.Slice(seq=0, start=n + 3, tokens=[1])),
                                 "continue"),
    }


@pytest.mark.parametrize("case", ["wrong byte length", "unknown sequence",
                                  "past the context", "hole in the sequence",
                                  "token id out of range", "one bad slice of two"])
def test_malformed_forward_is_refused_and_changes_nothing(
        case: str, loaded_ring: BuiltRing, workers: LocalWorkers, prompt, tokenizer,
        reference):
    before = [lengths(a, workers.token) for a in workers.addresses[:2]]
    assert before == [[len(prompt), 0], [len(prompt), 0]]
    index, msg, words = malformed(prompt)[case]
    reply = send_one(workers.addresses[index], workers.token, msg)
    assert reply.WhichOneof("outcome") == "error"
    assert reply.error.code == INVALID
    assert words in reply.error.message
    assert [lengths(a, workers.token) for a in workers.addresses[:2]] == before
    # … and the ring still serves, with the same answer as before
    loaded_ring.ring.truncate_all([], 0)
    assert greedy_tokens(loaded_ring, tokenizer, prompt) == reference[1]


@pytest.mark.parametrize("token", [None, "wrong-token-wrong-token"])
def test_a_missing_or_wrong_token_is_unauthenticated(workers: LocalWorkers,
                                                     token: str | None):
    s, metadata, channel = stub(workers.addresses[0], token)
    with channel:
        for call in (lambda: s.GetNodeInfo(pb.NodeInfoRequest(), metadata=metadata),
                     lambda: next(iter(s.Forward(iter([pb.ForwardMessage()]),
                                                 metadata=metadata))),
                     lambda: next(iter(s.Results(pb.ResultsRequest(), metadata=metadata))),
                     lambda: health_pb2_grpc.HealthStub(channel).Check(
                         health_pb2.HealthCheckRequest(), metadata=metadata)):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # still serving those who have the token
    s, metadata, channel = stub(workers.addresses[0], workers.token)
    with channel:
        assert s.GetNodeInfo(pb.NodeInfoRequest(), metadata=metadata).cpu_count >= 1


def test_node_info_reports_the_machine_and_the_stage(loaded_ring: BuiltRing):
    ring = loaded_ring.ring
    assert isinstance(ring, GrpcRing)
    first, last = ring.node_infos()
    assert first.host.cpu_count >= 1 and first.host.ram_total_bytes > 2**30
    assert first.host.gpus == [] and first.host.gpu_error  # no NVIDIA driver here
    assert first.versions["llama_cpp_python"] == "0.3.36"
    assert first.stage is not None and (first.stage.begin, first.stage.end) == (0, 14)
    assert first.stage.downstream is not None
    assert last.stage is not None and (last.stage.begin, last.stage.end) == (14, 28)
    assert last.stage.downstream is None and last.model_n_layer == 28
    assert first.capture in ("c", "python") and last.capture == ""


def test_plan_asks_running_workers(workers: LocalWorkers, demo_target: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]):
    import json

    from cluster.auth import write_token
    from cluster.cli import main

    token_file = write_token(tmp_path / "token", workers.token)
    code = main(["plan", "--model", str(demo_target), "--ctx", "2048", "--json",
                 "--token-file", str(token_file), "--margin", "256MiB",
                 *[arg for a in workers.addresses[:2] for arg in ("--worker", a)]])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["feasible"]
    assert [n["name"] for n in out["nodes"]] == workers.addresses[:2]
    assert out["nodes"][0]["layers"][0] == 0 and out["nodes"][1]["layers"][1] == 28
    assert out["nodes"][0]["layers"][1] == out["nodes"][1]["layers"][0]
