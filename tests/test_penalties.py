"""min-p, the repetition penalties and logit bias, on the last stage and in the draft.

Speculative sampling stays exact with them (χ² against the target's own two-token
distribution: the guess at row i is penalised by the guesses before it, on both sides);
a wrong rule that forgets that is caught. Greedy decoding with penalties through a real
two-worker ring gives llama-cpp-python's own sampler's tokens (`Llama.generate`), with
and without the draft model.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from cluster.errors import SpecshardError
from cluster.judge import judge
from cluster.messages import Slice
from cluster.sampling import SamplingParams, SparseDist, filtered_probs, sample, transform
from coordinator.engine.frontend import Generation
from coordinator.engine.request import GenerationRequest
from coordinator.ring.builder import BuiltRing
from coordinator.service import EngineOptions, start_engine
from coordinator.speculation.draft import DraftModel, draft_dist
from coordinator.speculation.drafting import Drafter
from coordinator.speculation.gamma import FREE_DRAFT, GammaConfig
from coordinator.tokenizer import Tokenizer
from tests.test_sampling import chi2_pvalue

N_VOCAB, N_DRAWS, MIN_P = 12, 20_000, 1e-3
BASE = np.random.default_rng(11)
P_LOGITS = BASE.normal(0, 1.5, N_VOCAB).astype(np.float32)
Q_LOGITS = BASE.normal(0, 1.5, N_VOCAB).astype(np.float32)
HISTORY = [3, 3, 7, 1]  # the sequence before the step: its last token is pending
PARAMS = SamplingParams(temperature=0.8, min_p=0.05, presence_penalty=1.5, repeat_last_n=-1)


def row_after(logits: np.ndarray, token: int) -> np.ndarray:
    """A row that depends on the token before it, as a real model's would."""
    return (np.roll(logits, token + 1) + 0.3 * np.sin(np.arange(N_VOCAB) * (token + 1))
            ).astype(np.float32)


def step(guesses: list[int], seed: int) -> list[int]:
    """One verification on the last stage: the slice holds the pending token and the
    guesses; the stage holds the sequence's tokens (HISTORY + guesses)."""
    rows = [P_LOGITS] + [row_after(P_LOGITS, g) for g in guesses]
    q_rows = [Q_LOGITS] + [row_after(Q_LOGITS, g) for g in guesses[:-1]]
    dists = [filtered_probs(transform(q, PARAMS, [*HISTORY, *guesses[:i]]), PARAMS)
             for i, q in enumerate(q_rows)]
    piece = Slice(0, len(HISTORY) - 1, [HISTORY[-1], *guesses], PARAMS, len(guesses), dists,
                  step_seed=seed)
    return judge(piece, np.stack(rows), [*HISTORY, *guesses]).tokens


def first_two(n_guesses: int, forget_guesses: bool = False, n: int = N_DRAWS) -> np.ndarray:
    """The first two tokens of n independent generations, speculating n_guesses a step
    (a second step without guesses when the first emitted one token). `forget_guesses`:
    the draft penalises its second guess by HISTORY only (a wrong rule)."""
    rng = np.random.default_rng(2024)
    counts = np.zeros((N_VOCAB, N_VOCAB), dtype=np.int64)
    q0 = filtered_probs(transform(Q_LOGITS, PARAMS, HISTORY), PARAMS)
    for seed in range(n):
        guesses = [sample(q0, rng)]
        if n_guesses == 2:
            seen = HISTORY if forget_guesses else [*HISTORY, guesses[0]]
            q1 = filtered_probs(transform(row_after(Q_LOGITS, guesses[0]), PARAMS, seen),
                                PARAMS)
            guesses.append(sample(q1, rng))
        # forgetting, the target side forgets too: its row 1 sees HISTORY only
        out = step_forgetting(guesses, seed) if forget_guesses else step(guesses, seed)
        if len(out) < 2:
            out = [*out, *judge(Slice(0, len(HISTORY), out, PARAMS, step_seed=seed + 1),
                                row_after(P_LOGITS, out[0])[None], [*HISTORY, *out]).tokens]
        counts[out[0], out[1]] += 1
    return counts


def step_forgetting(guesses: list[int], seed: int) -> list[int]:
    """A last stage that penalises every row by the tokens before the step only."""
    rows = [P_LOGITS] + [row_after(P_LOGITS, g) for g in guesses]
    q_rows = [Q_LOGITS] + [row_after(Q_LOGITS, g) for g in guesses[:-1]]
    dists = [filtered_probs(transform(q, PARAMS, HISTORY), PARAMS) for q in q_rows]
    rows = [transform(r, PARAMS, HISTORY) for r in rows]
    bare = SamplingParams(temperature=PARAMS.temperature, min_p=PARAMS.min_p)
    piece = Slice(0, len(HISTORY) - 1, [HISTORY[-1], *guesses], bare, len(guesses), dists,
                  step_seed=seed)
    return judge(piece, np.stack(rows)).tokens


def target_two() -> np.ndarray:
    """The target's own distribution of its first two tokens, penalties applied."""
    p0 = filtered_probs(transform(P_LOGITS, PARAMS, HISTORY), PARAMS).dense(N_VOCAB)
    joint = np.zeros((N_VOCAB, N_VOCAB))
    for t in np.flatnonzero(p0):
        p1 = filtered_probs(transform(row_after(P_LOGITS, int(t)), PARAMS, [*HISTORY, int(t)]),
                            PARAMS).dense(N_VOCAB)
        joint[t] = p0[t] * p1
    return joint


@pytest.mark.parametrize("n_guesses", [1, 2])
def test_speculative_sampling_with_min_p_temperature_and_presence_penalty_is_exact(
        n_guesses: int) -> None:
    want = target_two()
    assert (want > 0).sum() < want.size  # min_p cut something
    assert chi2_pvalue(first_two(n_guesses).ravel(), want.ravel()) > MIN_P


def test_the_chi2_test_catches_guesses_not_penalising_the_next_row() -> None:
    counts, want = first_two(2, forget_guesses=True, n=5000).ravel(), target_two().ravel()
    outside = counts[want == 0].sum()  # min-p's cut moved with the missing penalty
    assert outside > 0 or chi2_pvalue(counts, want) < MIN_P


def test_penalties_follow_llama_cpp() -> None:
    """The arithmetic of src/llama-sampler.cpp: repeat ÷ (× below 0), then − count ×
    frequency − presence, over the last n tokens from `penalty_from` on."""
    row = np.array([2.0, -1.0, 0.5, 3.0], np.float32)
    params = SamplingParams(repeat_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25,
                            repeat_last_n=3, penalty_from=1)
    got = transform(row, params, [3, 0, 1, 1, 2])  # window: [1, 1, 2] (token 3 is too old)
    assert got.tolist() == [2.0, -1.0 * 2 - 2 * 0.5 - 0.25, 0.5 / 2 - 0.5 - 0.25, 3.0]
    assert transform(row, params, [0, 0], end=1) is not row  # the window is empty …
    assert np.array_equal(transform(row, params, [0, 0], end=1), row)  # … nothing changes
    assert transform(row, SamplingParams(), [0, 1]) is row


def test_logit_bias_of_minus_100_bans_a_token() -> None:
    logits = np.array([[0.0, 9.0, 8.5, 1.0]], np.float32)
    banned = SamplingParams(logit_bias=((1, -100.0),))
    assert judge(Slice(0, 0, [5], banned), logits.copy()).next_token == 2
    sampled = SamplingParams(temperature=1.0, logit_bias=((1, -100.0),))
    seen = {judge(Slice(0, 0, [5], sampled, step_seed=s), logits.copy()).next_token
            for s in range(300)}
    assert 1 not in seen and 2 in seen


def test_sampling_settings_are_checked() -> None:
    for bad in ({"min_p": 1.5}, {"presence_penalty": 3.0}, {"repeat_penalty": 0.0},
                {"repeat_last_n": -2}, {"logprobs": 21}):
        with pytest.raises(SpecshardError):
            SamplingParams(**bad)  # type: ignore[arg-type]


# --- greedy with penalties = llama-cpp-python's sampler, through a real ring -------------

N_CTX, N_TOKENS, NEAR_TIE = 1024, 40, 0.5
PENALTIES = {"repeat_penalty": 1.3, "frequency_penalty": 0.4, "presence_penalty": 0.6}
PROMPTS = ("Write a Python function that checks whether a string is a palindrome.",
           "List the planets of the solar system, one per line, with one fact each.",
           "Write a haiku about rain, then explain it.")


@pytest.fixture(scope="module")
def tokenizer(demo_target: Path) -> Tokenizer:
    return Tokenizer(demo_target)


@pytest.fixture(scope="module")
def prompts(tokenizer: Tokenizer) -> list[list[int]]:
    return [tokenizer.encode(tokenizer.chat_prompt([{"role": "user", "content": text}]))
            for text in PROMPTS]


@pytest.fixture(scope="module")
def reference(demo_target: Path, prompts: list[list[int]]) -> list[list[int]]:
    """llama-cpp-python's own sampler: Llama.generate with the same penalties over the
    last 64 generated tokens (its window starts after the prompt)."""
    llm = llama_cpp.Llama(str(demo_target), n_ctx=N_CTX, n_batch=512, n_threads=2,
                          last_n_tokens_size=64, verbose=False)
    try:
        out = []
        for prompt in prompts:
            llm.reset()
            tokens: list[int] = []
            for token in llm.generate(prompt, temp=0.0, **PENALTIES):  # type: ignore[arg-type]
                tokens.append(int(token))
                if len(tokens) == N_TOKENS:
                    break
            out.append(tokens)
        return out
    finally:
        llm.close()


def generate(ring: BuiltRing, tokenizer: Tokenizer, prompt: list[int],
             sampling: SamplingParams, drafter: Drafter | None = None) -> Generation:
    engine = start_engine(ring, tokenizer, "test", drafter,
                          EngineOptions(gamma=GammaConfig(fixed=4)), costs=FREE_DRAFT)
    try:
        return engine.generate(GenerationRequest(prompt, N_TOKENS, sampling, ignore_eos=True,
                                                 with_gaps=True))
    finally:
        engine.close()


def penalised(prompt: list[int]) -> SamplingParams:
    return SamplingParams(repeat_last_n=64, penalty_from=len(prompt), **PENALTIES)


@pytest.fixture(scope="module")
def without_draft(ring: BuiltRing, tokenizer: Tokenizer, prompts: list[list[int]]
                  ) -> list[Generation]:
    return [generate(ring, tokenizer, prompt, penalised(prompt)) for prompt in prompts]


@pytest.mark.slow
def test_greedy_with_penalties_equals_llama_generate(
        ring: BuiltRing, tokenizer: Tokenizer, prompts: list[list[int]],
        reference: list[list[int]], without_draft: list[Generation]) -> None:
    assert [g.tokens for g in without_draft] == reference
    plain = generate(ring, tokenizer, prompts[0], SamplingParams())
    assert plain.tokens != reference[0]  # the penalties changed the text


@pytest.mark.slow
def test_greedy_with_penalties_and_the_draft_equals_llama_generate(
        ring: BuiltRing, tokenizer: Tokenizer, drafter: DraftModel,
        prompts: list[list[int]], reference: list[list[int]],
        without_draft: list[Generation]) -> None:
    """Speculation verifies batches of rows (other kernels than one row): a first
    difference is allowed only where the plain run's top-2 margin is a near tie, as in
    tests/test_speculative.py."""
    accepted = 0
    for prompt, want, plain in zip(prompts, reference, without_draft, strict=True):
        got = generate(ring, tokenizer, prompt, penalised(prompt), drafter)
        accepted += sum(got.stats.accepted)
        i = next((k for k, (a, b) in enumerate(zip(got.tokens, want, strict=True))
                  if a != b), None)
        if i is None:
            continue
        gaps = plain.top2_gaps  # the margins the target decided by, penalties applied
        assert gaps[i] < NEAR_TIE, f"token {i} differs where the margin is {gaps[i]:.3g}"
        warnings.warn(f"first difference at token {i}, a near tie ({gaps[i]:.3g})",
                      stacklevel=1)
    assert accepted > 0


def test_the_draft_penalises_its_guess_by_the_guesses_before_it() -> None:
    """draft_dist with the sequence so far: a token guessed before is penalised."""
    row = np.array([5.0, 4.9, 0.0], np.float32)
    params = SamplingParams(presence_penalty=1.0)
    assert draft_dist(row, params, 2, [1]).ids.tolist() == [0]
    assert draft_dist(row, params, 2, [0]).ids.tolist() == [1]
    assert isinstance(draft_dist(row, SamplingParams(), 2), SparseDist)
