"""The ring over real loopback gRPC: worker processes, the demo target, bit-exact."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.auth import call_metadata
from cluster.messages import LoadSpec, StepRequest
from cluster.sampling import SamplingParams
from cluster.stage_cut import StageSpec, even_split, split_at
from cluster.wire import worker_pb2 as pb
from cluster.wire import worker_pb2_grpc as pb_grpc
from coordinator.generate import generate
from coordinator.grpc_pipeline import GrpcPipeline
from coordinator.launcher import LocalWorkers
from coordinator.local_pipeline import LocalPipeline
from coordinator.tokenizer import Tokenizer

pytestmark = pytest.mark.slow
N_TOKENS = 32
N_CTX = 1024
GREEDY = SamplingParams()
INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]
SPLITS = {2: split_at(28, [14]), 3: split_at(28, [9, 19])}


@pytest.fixture(scope="module")
def tokenizer(demo_target: Path) -> Tokenizer:
    return Tokenizer(demo_target)


@pytest.fixture(scope="module")
def prompt(tokenizer: Tokenizer) -> list[int]:
    return tokenizer.encode(tokenizer.chat_prompt(
        [{"role": "user", "content": "Write a Python function that merges two sorted lists."}]))


def first_logits_and_tokens(pipeline, prompt: list[int]) -> tuple[np.ndarray, list[int]]:
    first = pipeline.step(StepRequest(seq=0, start=0, tokens=prompt, sampling=GREEDY,
                                      return_logits=True))
    pipeline.reset(0)
    never_end = lambda _t: False  # noqa: E731 — a fixed length to compare
    tokens = generate(pipeline, prompt, N_TOKENS, GREEDY, never_end).tokens
    pipeline.reset(0)
    return first.logits[-1], tokens


@pytest.fixture(scope="module")
def reference(demo_target: Path, prompt: list[int]) -> tuple[np.ndarray, list[int]]:
    pipeline = LocalPipeline.load(demo_target, even_split(28, 1), n_ctx=N_CTX)
    try:
        return first_logits_and_tokens(pipeline, prompt)
    finally:
        pipeline.close()


@pytest.fixture(scope="module")
def workers() -> Iterator[LocalWorkers]:
    with LocalWorkers(3) as running:
        yield running


def specs_for(model: Path, split: list[StageSpec]) -> list[LoadSpec]:
    return [LoadSpec(str(model), s.begin, s.end, n_ctx=N_CTX, n_threads=1) for s in split]


@pytest.fixture()
def ring(request, workers: LocalWorkers, demo_target: Path) -> Iterator[GrpcPipeline]:
    n = request.param
    pipeline = GrpcPipeline(workers.addresses[:n], token=workers.token)
    try:
        pipeline.load(specs_for(demo_target, SPLITS[n]))
        yield pipeline
    finally:
        pipeline.close()


@pytest.mark.parametrize("ring", [2, 3], indirect=True)
def test_ring_equals_one_stage(ring: GrpcPipeline, reference, prompt):
    logits, tokens = first_logits_and_tokens(ring, prompt)
    assert np.abs(logits - reference[0]).max() == 0.0
    assert len(tokens) == N_TOKENS
    assert tokens == reference[1]


@pytest.mark.parametrize("ring", [2], indirect=True)
def test_long_prefill_is_chunked_and_still_exact(ring: GrpcPipeline, demo_target: Path,
                                                 tokenizer: Tokenizer):
    # 760 tokens × 1536 × 4 bytes = 4.7 MB of hidden states between the two workers.
    text = "\n".join(f"def f{i}(x):\n    return x * {i}" for i in range(76))
    long_prompt = tokenizer.encode(text)[:760]
    assert len(long_prompt) == 760
    step = StepRequest(seq=0, start=0, tokens=long_prompt, sampling=GREEDY, return_logits=True)
    got = ring.step(step).logits
    ring.reset(0)
    local = LocalPipeline.load(demo_target, even_split(28, 1), n_ctx=N_CTX)
    try:
        want = local.logits(step)
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
        return list(s.Truncate(pb.TruncateRequest(seqs=[0], length=2**32 - 1),
                               metadata=metadata).lengths)


def send_one(address: str, token: str, msg: pb.ForwardMessage) -> pb.ForwardReply:
    s, metadata, channel = stub(address, token)
    with channel:
        call = s.Forward(iter([msg]), metadata=metadata, timeout=60)
        return next(iter(call))


@pytest.fixture()
def loaded_ring(workers: LocalWorkers, demo_target: Path, prompt: list[int]
                ) -> Iterator[GrpcPipeline]:
    pipeline = GrpcPipeline(workers.addresses[:2], token=workers.token)
    try:
        pipeline.load(specs_for(demo_target, SPLITS[2]))
        pipeline.step(StepRequest(seq=0, start=0, tokens=prompt, sampling=GREEDY))
        yield pipeline
    finally:
        pipeline.close()


def malformed(prompt: list[int]) -> dict[str, tuple[int, pb.ForwardMessage, str]]:
    n = len(prompt)
    return {
        "wrong byte length": (1, pb.ForwardMessage(
            seq=0, step_id=1, positions=[n], tokens=[1], hidden=b"\0" * 1000, n_embd=1536,
            n_chunks=1), "bytes"),
        "non-contiguous positions": (0, pb.ForwardMessage(
            seq=0, step_id=2, positions=[n, n + 2], tokens=[1, 2], n_chunks=1), "contiguous"),
        "unknown sequence": (0, pb.ForwardMessage(
            seq=7, step_id=3, positions=[0], tokens=[1], n_chunks=1), "unknown sequence"),
        "past the context": (0, pb.ForwardMessage(
            seq=0, step_id=4, positions=list(range(n, N_CTX + 1)),
            tokens=[1] * (N_CTX + 1 - n), n_chunks=1), "context"),
        "hole in the sequence": (0, pb.ForwardMessage(
            seq=0, step_id=5, positions=[n + 5], tokens=[1], n_chunks=1), "continue"),
        "token id out of range": (0, pb.ForwardMessage(
            seq=0, step_id=6, positions=[n], tokens=[10**7], n_chunks=1), "out of range"),
    }


@pytest.mark.parametrize("case", ["wrong byte length", "non-contiguous positions",
                                  "unknown sequence", "past the context",
                                  "hole in the sequence", "token id out of range"])
def test_malformed_forward_is_refused_and_changes_nothing(
        case: str, loaded_ring: GrpcPipeline, workers: LocalWorkers, prompt, reference):
    before = [lengths(a, workers.token) for a in workers.addresses[:2]]
    assert before == [[len(prompt)], [len(prompt)]]
    index, msg, words = malformed(prompt)[case]
    reply = send_one(workers.addresses[index], workers.token, msg)
    assert reply.WhichOneof("outcome") == "error"
    assert reply.error.code == INVALID
    assert words in reply.error.message
    assert [lengths(a, workers.token) for a in workers.addresses[:2]] == before
    # … and the ring still serves, with the same answer as before
    loaded_ring.reset(0)
    assert generate(loaded_ring, prompt, 8, GREEDY, lambda _t: False).tokens == \
        reference[1][:8]


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


def test_node_info_reports_the_machine_and_the_stage(loaded_ring: GrpcPipeline):
    first, last = loaded_ring.node_infos()
    assert first.host.cpu_count >= 1 and first.host.ram_total_bytes > 2**30
    assert first.host.gpus == [] and first.host.gpu_error  # no NVIDIA driver here
    assert first.versions["llama_cpp_python"] == "0.3.36"
    assert first.stage is not None and (first.stage.begin, first.stage.end) == (0, 14)
    assert first.stage.downstream is not None
    assert last.stage is not None and (last.stage.begin, last.stage.end) == (14, 28)
    assert last.stage.downstream is None and last.model_n_layer == 28


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
