"""The draft model drafter: same guesses as the model run straight, KV kept in step."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from gguf import GGUFWriter

from cluster.errors import SpecshardError
from cluster.sampling import SamplingParams, SparseDist, filtered_probs
from coordinator.speculation.draft import (
    DraftConfig,
    DraftModel,
    check_vocab,
    common_prefix,
    draft_dist,
)
from coordinator.speculation.drafting import DraftRequest
from tests.tiny_gguf import write_tiny_model

GAMMA = 6
PROMPT_TEXT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


@pytest.fixture(scope="module")
def drafter(demo_draft: Path) -> Iterator[DraftModel]:
    d = DraftModel(DraftConfig(demo_draft, n_ctx=512, n_seq_max=3))
    yield d
    d.close()


@pytest.fixture(scope="module")
def reference(demo_draft: Path) -> Iterator[llama_cpp.Llama]:
    llm = llama_cpp.Llama(str(demo_draft), n_ctx=512, n_threads=2, verbose=False)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def prompt(reference: llama_cpp.Llama) -> list[int]:
    return reference.tokenize(PROMPT_TEXT.encode())


def straight(llm: llama_cpp.Llama, context: list[int], n: int) -> list[int]:
    """Greedy continuation by llama-cpp-python's own high-level API."""
    llm.reset()
    out: list[int] = []
    for token in llm.generate(context, temp=0.0, top_k=1):
        out.append(int(token))
        if len(out) == n:
            return out
    return out


GREEDY = SamplingParams()


def ask(context: list[int], seq: int = 0, gamma: int = GAMMA,
        sampling: SamplingParams = GREEDY, seed: int = 0) -> DraftRequest:
    return DraftRequest(seq, context, gamma, sampling, np.random.default_rng(seed))


def greedy(drafter: DraftModel, context: list[int], seq: int = 0, gamma: int = GAMMA
           ) -> list[int]:
    return drafter.propose([ask(context, seq, gamma)])[0].tokens


@pytest.mark.slow
def test_greedy_guesses_are_the_draft_models_own_greedy_tokens(
        drafter: DraftModel, reference: llama_cpp.Llama, prompt: list[int]) -> None:
    assert greedy(drafter, prompt) == straight(reference, prompt, GAMMA)


@pytest.mark.slow
def test_rollback_keeps_the_cache_consistent(
        drafter: DraftModel, reference: llama_cpp.Llama, prompt: list[int],
        demo_draft: Path) -> None:
    first = greedy(drafter, prompt)
    # The target took two guesses and then chose something else: the draft's cache holds
    # guesses it must forget.
    diverged = [*prompt, *first[:2], (first[2] + 1) % 1000]
    again = greedy(drafter, diverged)
    assert drafter.decoded[0] == [*diverged, *again[:-1]]
    fresh = DraftModel(DraftConfig(demo_draft, n_ctx=512))
    try:
        assert again == greedy(fresh, diverged)
    finally:
        fresh.close()
    assert again == straight(reference, diverged, GAMMA)


@pytest.mark.slow
def test_all_guesses_accepted_then_the_bonus_token(
        drafter: DraftModel, reference: llama_cpp.Llama, prompt: list[int]) -> None:
    first = greedy(drafter, prompt)
    bonus = straight(reference, [*prompt, *first], 1)
    context = [*prompt, *first, *bonus]
    assert greedy(drafter, context) == straight(reference, context, GAMMA)


@pytest.mark.slow
def test_sampled_guesses_carry_the_filtered_distributions(
        drafter: DraftModel, prompt: list[int]) -> None:
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9)
    (a,) = drafter.propose([ask(prompt, sampling=params, seed=5)])
    (b,) = drafter.propose([ask(prompt, sampling=params, seed=5)])
    assert a.tokens == b.tokens  # same seed, same draft
    assert len(a.dists) == GAMMA
    for token, dist in zip(a.tokens, a.dists, strict=True):
        assert dist.prob(token) > 0 and dist.ids.size <= 20
        assert dist.probs.sum() == pytest.approx(1.0)
    # top-k 20 < dist_top: the first distribution is the filter applied to the whole row.
    row = drafter._sync({0: prompt})[0]
    expected = filtered_probs(row, params)
    assert a.dists[0].ids.tolist() == expected.ids.tolist()
    np.testing.assert_allclose(a.dists[0].probs, expected.probs)


def test_draft_dist_keeps_the_likeliest_tokens_renormalised() -> None:
    row = np.random.default_rng(0).normal(0, 2, 1000)
    params = SamplingParams(temperature=1.0)
    cut, full = draft_dist(row, params, 50), filtered_probs(row, params)
    top = np.argsort(-full.probs)[:50]
    assert sorted(cut.ids.tolist()) == sorted(full.ids[top].tolist())
    want = dict(zip(full.ids[top].tolist(), full.probs[top] / full.probs[top].sum(),
                    strict=True))
    np.testing.assert_allclose(cut.probs, [want[i] for i in cut.ids.tolist()])
    assert draft_dist(row, params, 0).ids.size == 1000
    assert draft_dist(row, SamplingParams(), 50) == SparseDist.point(int(np.argmax(row)))


@pytest.mark.slow
def test_gamma_is_capped_by_the_draft_context(demo_draft: Path) -> None:
    small = DraftModel(DraftConfig(demo_draft, n_ctx=32))
    try:
        n = small.n_ctx  # llama.cpp may round the context up
        # 4 free positions hold 4 decoded guesses: the 5th needs no position of its own.
        assert len(greedy(small, list(range(100, 100 + n - 4)), gamma=8)) == 5
        assert greedy(small, list(range(100, 100 + n + 1)), gamma=8) == []
    finally:
        small.close()


@pytest.mark.slow
def test_sequences_drafted_together_get_their_own_guesses(
        drafter: DraftModel, reference: llama_cpp.Llama, prompt: list[int]) -> None:
    """Three slots in one batched call — different contexts, different γ — each get what
    the draft model alone would guess (greedy: the same argmax, except at a near tie)."""
    other = reference.tokenize(b"class Stack:\n    def push(self, item):\n")
    third = [*prompt, 13]
    asks = [ask(prompt, 0, 6), ask(other, 1, 3), ask(third, 2, 4)]
    drafts = drafter.propose(asks)
    for a, d in zip(asks, drafts, strict=True):
        assert d.tokens == straight(reference, a.context, a.gamma)
    for seq in range(3):
        drafter.release(seq)
        assert drafter.decoded[seq] == []


@pytest.mark.slow
def test_check_vocab_accepts_the_demo_pair(demo_target: Path, demo_draft: Path) -> None:
    check_vocab(demo_target, demo_draft)


@pytest.mark.slow
def test_check_vocab_refuses_a_model_without_a_vocabulary(demo_target: Path,
                                                          tmp_path: Path) -> None:
    tiny = write_tiny_model(tmp_path / "tiny.gguf")
    with pytest.raises(SpecshardError, match="vocabulary types"):
        check_vocab(demo_target, tiny)


def vocab_file(path: Path, tokens: list[str], bos: int = 1, eos: int = 2) -> Path:
    writer = GGUFWriter(str(path), "qwen2")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    writer.add_tensor("dummy", np.zeros(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


TOKENS = [f"tok{i}" for i in range(300)]


def test_check_vocab_same_vocabulary_passes(tmp_path: Path) -> None:
    check_vocab(vocab_file(tmp_path / "t.gguf", TOKENS), vocab_file(tmp_path / "d.gguf", TOKENS))


def test_check_vocab_ignores_the_first_special_ids_and_small_size_gaps(tmp_path: Path) -> None:
    draft = ["other"] * 5 + TOKENS[5:200]  # 100 fewer tokens, ids < 5 differ
    check_vocab(vocab_file(tmp_path / "t.gguf", TOKENS), vocab_file(tmp_path / "d.gguf", draft))


def test_check_vocab_refuses_a_different_token_text(tmp_path: Path) -> None:
    draft = [*TOKENS[:150], "changed", *TOKENS[151:]]
    with pytest.raises(SpecshardError, match="token 150"):
        check_vocab(vocab_file(tmp_path / "t.gguf", TOKENS),
                    vocab_file(tmp_path / "d.gguf", draft))


def test_check_vocab_refuses_a_large_size_gap(tmp_path: Path) -> None:
    with pytest.raises(SpecshardError, match="at most 128"):
        check_vocab(vocab_file(tmp_path / "t.gguf", TOKENS),
                    vocab_file(tmp_path / "d.gguf", TOKENS[:171]))


def test_check_vocab_refuses_other_special_tokens(tmp_path: Path) -> None:
    with pytest.raises(SpecshardError, match="eos_token_id"):
        check_vocab(vocab_file(tmp_path / "t.gguf", TOKENS),
                    vocab_file(tmp_path / "d.gguf", TOKENS, eos=3))


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 3, 4]) == 3
    assert common_prefix([1, 2, 3], [1, 5, 3]) == 1
    assert common_prefix([], [1]) == 0
