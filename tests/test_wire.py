"""The wire contract: generated code is current, conversions round-trip, bad shapes fail."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cluster.errors import InvalidForward
from cluster.messages import Hop, StepRequest, StepResult
from cluster.sampling import SamplingParams, SparseDist
from cluster.wire import worker_pb2 as pb
from cluster.wire_convert import (
    CHUNK_BYTES,
    MAX_MESSAGE_BYTES,
    HopAssembler,
    hop_to_wire,
    result_from_wire,
    result_to_wire,
)

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_matches_the_proto(tmp_path: Path):
    subprocess.run([sys.executable, str(ROOT / "proto" / "generate.py"), str(tmp_path)],
                   check=True, capture_output=True)
    committed = ROOT / "cluster" / "wire"
    for fresh in sorted(tmp_path.glob("worker_pb2*")):
        assert fresh.read_text() == (committed / fresh.name).read_text(), \
            f"{fresh.name} is stale: run `python proto/generate.py`"


def request(n: int = 5, start: int = 7, n_draft: int = 0, **kw) -> StepRequest:
    return StepRequest(seq=1, start=start, tokens=list(range(100, 100 + n)),
                       sampling=kw.pop("sampling", SamplingParams()), n_draft=n_draft,
                       step_seed=42, step_id=9, **kw)


def reassemble(messages: list[pb.ForwardMessage]) -> Hop:
    assembler = HopAssembler()
    hops = [assembler.add(pb.ForwardMessage.FromString(m.SerializeToString()))
            for m in messages]
    assert all(h is None for h in hops[:-1])
    assert hops[-1] is not None
    return hops[-1]


def test_long_prefill_is_chunked_under_the_limit_and_reassembled_exactly():
    n, n_embd = 700, 1536  # 4.3 MB of f32 hidden states: one message would be too big
    hidden = np.random.default_rng(0).standard_normal((n, n_embd)).astype(np.float32)
    messages = hop_to_wire(Hop(request(n), hidden))
    assert len(messages) == -(-hidden.nbytes // CHUNK_BYTES) > 1
    assert all(m.ByteSize() < MAX_MESSAGE_BYTES for m in messages)
    hop = reassemble(messages)
    assert hop.request == request(n)
    assert hop.hidden is not None and np.array_equal(hop.hidden, hidden)


def test_f16_on_the_wire_halves_the_bytes():
    hidden = np.linspace(-3, 3, 4 * 64, dtype=np.float32).reshape(4, 64)
    (msg,) = hop_to_wire(Hop(request(4), hidden), f16=True)
    assert len(msg.hidden) == hidden.nbytes // 2
    assert np.allclose(reassemble([msg]).hidden, hidden, atol=2e-3)


def test_sampled_steps_carry_the_draft_distributions():
    dists = [SparseDist(np.array([5, 9]), np.array([0.25, 0.75])), SparseDist.point(3)]
    r = request(3, n_draft=2, sampling=SamplingParams(temperature=0.8, top_p=0.9, top_k=40),
                draft_dists=dists)
    back = reassemble(hop_to_wire(Hop(r))).request
    assert back.sampling == SamplingParams(temperature=0.8, top_k=40, top_p=0.9)
    assert [d.ids.tolist() for d in back.draft_dists] == [[5, 9], [3]]
    assert back.draft_dists[0].probs.tolist() == [0.25, 0.75]


def test_results_round_trip_with_logits():
    logits = np.arange(6, dtype=np.float32).reshape(2, 3)
    result = StepResult(seq=2, step_id=4, accepted=[11], next_token=12, top2_gaps=[0.5, 1.0],
                        logits=logits)
    back = result_from_wire(pb.ForwardReply.FromString(
        result_to_wire(result, 3.0).SerializeToString()))
    assert (back.seq, back.step_id, back.accepted, back.next_token) == (2, 4, [11], 12)
    assert back.logits is not None and np.array_equal(back.logits, logits)


def bad(**changes) -> pb.ForwardMessage:
    (msg,) = hop_to_wire(Hop(request(4), np.zeros((4, 8), np.float32)))
    for key, value in changes.items():
        if isinstance(value, list):
            del getattr(msg, key)[:]
            getattr(msg, key).extend(value)
        else:
            setattr(msg, key, value)
    return msg


@pytest.mark.parametrize("changes, words", [
    ({"hidden": b"\0" * 100}, "bytes"),
    ({"positions": [7, 8, 10, 11]}, "contiguous"),
    ({"positions": [7, 8, 9]}, "positions"),
    ({"n_draft": 4}, "draft"),
    ({"n_embd": 0}, "hidden"),
    ({"positions": []}, "positions"),
])
def test_malformed_messages_are_refused(changes, words):
    with pytest.raises(InvalidForward, match=words):
        HopAssembler().add(bad(**changes))


def test_a_chunk_without_its_head_is_refused():
    messages = hop_to_wire(Hop(request(700), np.zeros((700, 1536), np.float32)))
    with pytest.raises(InvalidForward, match="first chunk"):
        HopAssembler().add(messages[1])
