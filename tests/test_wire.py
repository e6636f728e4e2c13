"""The wire contract: generated code is current, conversions round-trip, bad shapes fail."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cluster.errors import InvalidForward
from cluster.messages import Activations, Batch, BatchResult, LoadSpec, SeqResult, Slice
from cluster.rope import RopeParams
from cluster.sampling import SamplingParams, SparseDist
from cluster.wire import worker_pb2 as pb
from cluster.wire_convert import (
    CHUNK_BYTES,
    MESSAGE_LIMIT,
    BatchAssembler,
    batch_to_wire,
    load_from_wire,
    load_to_wire,
    max_logit_rows,
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


def batch(n: int = 5, start: int = 7, n_draft: int = 0, **kw) -> Batch:
    """Two sequences: `n` rows of sequence 1, then 2 rows of sequence 3."""
    first = Slice(seq=1, start=start, tokens=list(range(100, 100 + n)),
                  sampling=kw.pop("sampling", SamplingParams()), n_draft=n_draft,
                  step_seed=42, **kw)
    return Batch(9, [first, Slice(seq=3, start=0, tokens=[5, 6], judge=False)])


def reassemble(messages: list[pb.ForwardMessage]) -> Activations:
    assembler = BatchAssembler()
    out = [assembler.add(pb.ForwardMessage.FromString(m.SerializeToString()))
           for m in messages]
    assert all(a is None for a in out[:-1])
    assert out[-1] is not None
    return out[-1]


def test_a_large_batch_is_chunked_under_the_limit_and_reassembled_exactly():
    b = batch(698)  # 700 rows × 1536 × 4 = 4.3 MB of hidden states: over one chunk
    hidden = np.random.default_rng(0).standard_normal((700, 1536)).astype(np.float32)
    messages = batch_to_wire(Activations(b, hidden))
    assert len(messages) == -(-hidden.nbytes // CHUNK_BYTES) > 1
    assert all(m.ByteSize() < CHUNK_BYTES + (1 << 16) for m in messages)
    back = reassemble(messages)
    assert back.batch == b
    assert back.hidden is not None and np.array_equal(back.hidden, hidden)


def test_f16_on_the_wire_halves_the_bytes():
    hidden = np.linspace(-3, 3, 7 * 64, dtype=np.float32).reshape(7, 64)
    (msg,) = batch_to_wire(Activations(batch(5), hidden), f16=True)
    assert len(msg.hidden) == hidden.nbytes // 2
    back = reassemble([msg]).hidden
    assert back is not None and np.allclose(back, hidden, atol=2e-3)


def test_sampled_slices_carry_the_draft_distributions():
    dists = [SparseDist(np.array([5, 9]), np.array([0.25, 0.75])), SparseDist.point(3)]
    b = batch(3, n_draft=2, sampling=SamplingParams(temperature=0.8, top_p=0.9, top_k=40),
              draft_dists=dists)
    back = reassemble(batch_to_wire(Activations(b))).batch.slices[0]
    assert back.sampling == SamplingParams(temperature=0.8, top_k=40, top_p=0.9)
    assert [d.ids.tolist() for d in back.draft_dists] == [[5, 9], [3]]
    assert back.draft_dists[0].probs.tolist() == [0.25, 0.75]


def test_a_link_and_its_distribution_cross_the_wire_and_a_verdict_may_draw_nothing():
    dists = [SparseDist.point(3), SparseDist(np.array([5, 9]), np.array([0.25, 0.75]))]
    b = batch(3, n_draft=1, sampling=SamplingParams(temperature=0.8), draft_dists=dists,
              link=9)
    back = reassemble(batch_to_wire(Activations(b))).batch.slices
    assert back[0].link == 9 and back[0].guesses == [102, 9] and back[1].link == -1
    assert [d.ids.tolist() for d in back[0].draft_dists] == [[3], [5, 9]]
    whole = SeqResult(seq=1, accepted=[102, 9], next_token=-1, top2_gaps=[1.0, 2.0])
    reply = result_from_wire(pb.ForwardReply.FromString(
        result_to_wire(BatchResult(9, [whole]), 1.0).SerializeToString()))
    assert reply.results[0].tokens == [102, 9]  # the link accepted: no token after it
    assert not reply.results[0].breaks_chain


def test_a_chain_and_a_skipped_verdict_cross_the_wire():
    b = batch(3, n_draft=1, link=9, chain=2**52 + 5)
    back = reassemble(batch_to_wire(Activations(b))).batch.slices
    assert back[0].chain == 2**52 + 5 and back[1].chain == -1
    results = [SeqResult(seq=1, accepted=[], next_token=-1, top2_gaps=[], skipped=True),
               SeqResult(seq=2, accepted=[4], next_token=7, top2_gaps=[1.0, 1.0])]
    reply = result_from_wire(pb.ForwardReply.FromString(
        result_to_wire(BatchResult(9, results), 1.0).SerializeToString()))
    assert [r.skipped for r in reply.results] == [True, False]
    assert [r.breaks_chain for r in reply.results] == [True, True]  # skipped; drew a token


def test_results_round_trip_with_logits():
    logits = np.arange(6, dtype=np.float32).reshape(2, 3)
    result = BatchResult(4, [SeqResult(seq=2, accepted=[11], next_token=12,
                                       top2_gaps=[0.5, 1.0], logits=logits),
                             SeqResult(seq=5, accepted=[], next_token=1, top2_gaps=[2.0])])
    back = result_from_wire(pb.ForwardReply.FromString(
        result_to_wire(result, 3.0).SerializeToString()))
    first, second = back.results
    assert back.batch_id == 4
    assert (first.seq, first.accepted, first.next_token) == (2, [11], 12)
    assert first.logits is not None and np.array_equal(first.logits, logits)
    assert (second.seq, second.tokens, second.logits) == (5, [1], None)


def test_logit_rows_a_reply_may_carry_fit_the_message_limit():
    n = max_logit_rows(152064)  # QwQ's vocabulary
    assert 4 * 152064 * n < MESSAGE_LIMIT and n >= 16  # a verify pass of γ = 15 fits


def bad(**changes) -> pb.ForwardMessage:
    (msg,) = batch_to_wire(Activations(batch(4), np.zeros((6, 8), np.float32)))
    head = msg.slices[0]
    for key, value in changes.items():
        target = msg if key in ("hidden", "n_embd", "dtype", "n_chunks") else head
        if isinstance(value, list):
            del getattr(target, key)[:]
            getattr(target, key).extend(value)
        else:
            setattr(target, key, value)
    return msg


@pytest.mark.parametrize("changes, words", [
    ({"hidden": b"\0" * 100}, "bytes"),
    ({"tokens": [7, 8, 9]}, "bytes"),
    ({"n_draft": 4}, "draft"),
    ({"n_embd": 0}, "hidden"),
    ({"dtype": 7}, "dtype"),
    ({"n_chunks": 1000}, "chunks"),
    ({"tokens": [], "judge": True}, "only truncates"),
    ({"link": 5, "judge": False}, "link guess"),  # no judged row to judge it at
])
def test_malformed_messages_are_refused(changes, words):
    with pytest.raises(InvalidForward, match=words):
        BatchAssembler().add(bad(**changes))


def test_a_chunk_without_its_head_is_refused():
    messages = batch_to_wire(Activations(batch(698), np.zeros((700, 1536), np.float32)))
    with pytest.raises(InvalidForward, match="first chunk"):
        BatchAssembler().add(messages[1])


def test_every_sampling_setting_and_the_rope_values_cross_the_wire():
    sampling = SamplingParams(temperature=0.6, top_k=20, top_p=0.95, min_p=0.05,
                              presence_penalty=1.5, frequency_penalty=-0.5,
                              repeat_penalty=1.1, repeat_last_n=-1, penalty_from=7,
                              logit_bias=((3, -100.0), (8, 2.5)), logprobs=0)
    assert reassemble(batch_to_wire(Activations(batch(2, sampling=sampling)))).batch \
        .slices[0].sampling == sampling
    plain = reassemble(batch_to_wire(Activations(batch(2)))).batch.slices[0].sampling
    assert plain == SamplingParams() and plain.logprobs is None and not plain.transforms
    rope = RopeParams(scaling="yarn", freq_base=1e6, freq_scale=0.25, yarn_orig_ctx=32768,
                      yarn_ext_factor=1.0, yarn_attn_factor=1.0, yarn_beta_fast=32.0,
                      yarn_beta_slow=1.0)
    spec = LoadSpec("demo", 0, 14, rope=rope)
    assert load_from_wire(load_to_wire(spec)) == spec
    assert load_from_wire(load_to_wire(LoadSpec("demo", 0, 14))).rope is None
    bad = load_to_wire(spec)
    bad.rope.scaling = "ntk"
    with pytest.raises(InvalidForward, match="rope scaling is one of"):
        load_from_wire(bad)
