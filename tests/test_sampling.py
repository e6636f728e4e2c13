"""The verification rule reproduces the target's filtered distribution: χ² tests.

Each case draws 20 000 (draft, verify) rounds with synthetic logits and compares the
first emitted token's histogram with `filtered_probs(target_logits, params)`. A
deliberately wrong rule run through the same test must fail it, so the test has power.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from scipy.stats import chisquare

from cluster.judge import judge, top2_gap
from cluster.messages import Slice
from cluster.sampling import SamplingParams, SparseDist, filtered_probs, sample
from cluster.verify import Verdict, verify

N_VOCAB, N_DRAWS, MIN_P = 12, 20_000, 1e-3
BASE = np.random.default_rng(7)
P_LOGITS = BASE.normal(0, 1.5, N_VOCAB)
DRAFTS = {
    "close": P_LOGITS + BASE.normal(0, 0.2, N_VOCAB),
    "far": BASE.normal(0, 1.5, N_VOCAB)[::-1].copy(),
}
PARAMS = [SamplingParams(temperature=t) for t in (0.5, 1.0, 1.5)] + \
    [SamplingParams(temperature=1.0, top_p=p) for p in (0.9, 0.5)] + \
    [SamplingParams(temperature=1.0, top_k=4), SamplingParams(temperature=0.7, top_k=5, top_p=0.8)]
Rule = Callable[..., Verdict]


def next_logits(logits: np.ndarray, token: int) -> np.ndarray:
    """A row that depends on the previous guess, as a real model's would."""
    return np.roll(logits, token + 1) + 0.3 * np.sin(np.arange(N_VOCAB) * (token + 1))


def draft_dist(kind: str, logits: np.ndarray, params: SamplingParams) -> SparseDist:
    if kind == "point":  # an n-gram guess, here the target's least likely token
        return SparseDist.point(int(np.argmin(logits)))
    return filtered_probs(logits, params)


def first_tokens(params: SamplingParams, kind: str, n_guesses: int, rule: Rule = verify,
                 n: int = N_DRAWS) -> np.ndarray:
    """First emitted token of n independent steps of `n_guesses` guesses."""
    draft_rng, verify_rng = np.random.default_rng(12345), np.random.default_rng(54321)
    q_logits = P_LOGITS if kind == "point" else DRAFTS[kind]
    q1 = draft_dist(kind, q_logits, params)
    # What depends on the first guess, worked out once per token.
    q2 = {t: draft_dist(kind, next_logits(q_logits, t), params) for t in range(N_VOCAB)}
    p_next = {t: next_logits(P_LOGITS, t) for t in range(N_VOCAB)}
    counts = np.zeros(N_VOCAB, dtype=np.int64)
    for g0 in q1.ids[draft_rng.choice(q1.ids.size, size=n, p=q1.probs)]:
        guesses, dists, rows = [int(g0)], [q1], [P_LOGITS, p_next[int(g0)]]
        if n_guesses == 2:
            guesses.append(sample(q2[guesses[0]], draft_rng))
            dists.append(q2[guesses[0]])
            rows.append(p_next[guesses[1]])
        verdict = rule(np.stack(rows), guesses, dists, params, verify_rng)
        counts[(verdict.accepted or [verdict.next_token])[0]] += 1
    return counts


def chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """χ² goodness of fit, bins expected to hold < 5 draws pooled into one."""
    assert counts[probs == 0].sum() == 0, "a token outside the filtered support was emitted"
    expected = probs * counts.sum()
    rare = (expected < 5) & (probs > 0)
    obs = counts[(probs > 0) & ~rare].tolist()
    exp = expected[(probs > 0) & ~rare].tolist()
    if rare.any():
        obs.append(counts[rare].sum())
        exp.append(expected[rare].sum())
    if len(obs) < 2:
        return 1.0
    return float(chisquare(obs, exp).pvalue)


def target(params: SamplingParams) -> np.ndarray:
    return filtered_probs(P_LOGITS, params).dense(N_VOCAB)


@pytest.mark.parametrize("params", PARAMS, ids=repr)
@pytest.mark.parametrize("kind", ["close", "far", "point"])
def test_one_guess_matches_target(params: SamplingParams, kind: str) -> None:
    assert chi2_pvalue(first_tokens(params, kind, 1), target(params)) > MIN_P


@pytest.mark.parametrize("params", PARAMS[1::2], ids=repr)
@pytest.mark.parametrize("kind", ["close", "far", "point"])
def test_two_guesses_first_token_matches_target(params: SamplingParams, kind: str) -> None:
    assert chi2_pvalue(first_tokens(params, kind, 2), target(params)) > MIN_P


def always_accept(logits: np.ndarray, draft: list[int], dists: list[SparseDist],
                  params: SamplingParams, rng: np.random.Generator) -> Verdict:
    return Verdict(list(draft), int(np.argmax(logits[-1])))


def forget_residual(logits: np.ndarray, draft: list[int], dists: list[SparseDist],
                    params: SamplingParams, rng: np.random.Generator) -> Verdict:
    """The classic mistake: on rejection resample from p instead of from max(0, p − q)."""
    p = filtered_probs(logits[0], params)
    if rng.random() * dists[0].prob(draft[0]) < p.prob(draft[0]):
        return Verdict([draft[0]], 0)
    return Verdict([], sample(p, rng))


@pytest.mark.parametrize("rule", [always_accept, forget_residual])
def test_the_chi2_test_catches_a_wrong_rule(rule: Rule) -> None:
    params = SamplingParams(temperature=1.0)
    assert chi2_pvalue(first_tokens(params, "far", 1, rule), target(params)) < MIN_P


def shared_seed_first_tokens(spawn: bool) -> np.ndarray:
    """Draft from default_rng(seed) (or a child of it) and verify with default_rng(seed)."""
    params = SamplingParams(temperature=1.0)
    q = filtered_probs(DRAFTS["far"], params)
    counts = np.zeros(N_VOCAB, dtype=np.int64)
    for seed in range(N_DRAWS):
        draft_rng = np.random.default_rng(seed)
        guess = sample(q, draft_rng.spawn(1)[0] if spawn else draft_rng)
        verdict = verify(np.stack([P_LOGITS, P_LOGITS]), [guess], [q], params,
                         np.random.default_rng(seed))
        counts[(verdict.accepted or [verdict.next_token])[0]] += 1
    return counts


def test_a_draft_sharing_the_verifiers_random_stream_is_biased() -> None:
    """Draft sampling and verification must not read the same uniforms.

    coordinator/engine/generate.py hands the drafter default_rng(step_seed) and the last worker
    verifies with default_rng(step_seed): the acceptance test then reads the very number
    that chose the guess, and the output drifts from the target. A spawned child stream
    (what ModelDrafter uses) is independent again.
    """
    target_probs = target(SamplingParams(temperature=1.0))
    assert chi2_pvalue(shared_seed_first_tokens(spawn=False), target_probs) < MIN_P
    assert chi2_pvalue(shared_seed_first_tokens(spawn=True), target_probs) > MIN_P


def greedy(rows: np.ndarray, guesses: list[int], dists: list[SparseDist] | None = None
           ) -> tuple[list[int], int]:
    """The production greedy verdict (`judge`) on a slice with these guesses."""
    piece = Slice(0, 0, [7, *guesses], n_draft=len(guesses), draft_dists=dists or [])
    result = judge(piece, rows)
    return result.accepted, result.next_token


def test_greedy_accepts_while_guesses_are_the_argmax() -> None:
    rows = np.array([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
    assert greedy(rows, [1, 0]) == ([1, 0], 2)  # both kept, bonus from the last row


def test_greedy_stops_at_the_first_miss_with_the_targets_choice() -> None:
    rows = np.array([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
    assert greedy(rows, [1, 2]) == ([1], 0)
    assert greedy(rows, [2, 0]) == ([], 1)


def test_greedy_ignores_draft_distributions() -> None:
    rows = np.array([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    wrong = [SparseDist.point(2)]  # wrong on purpose: greedy never reads them
    assert greedy(rows, [1], wrong) == ([1], 0)


def test_verify_refuses_mismatched_rows_and_greedy() -> None:
    with pytest.raises(ValueError):
        verify(np.zeros((2, 3)), [1], [], SamplingParams(temperature=1.0),
               np.random.default_rng(0))
    with pytest.raises(ValueError):
        verify(np.zeros((3, 3)), [1], [SparseDist.point(1)], SamplingParams(temperature=1.0),
               np.random.default_rng(0))
    with pytest.raises(ValueError, match="greedy"):
        verify(np.zeros((2, 3)), [1], [], SamplingParams(), np.random.default_rng(0))


def test_a_point_mass_guess_is_kept_with_the_targets_probability() -> None:
    params = SamplingParams(temperature=1.0)
    p = filtered_probs(P_LOGITS, params)
    guess = int(p.ids[0])
    rng = np.random.default_rng(3)
    kept = sum(bool(verify(np.stack([P_LOGITS, P_LOGITS]), [guess], [SparseDist.point(guess)],
                           params, rng).accepted) for _ in range(4000))
    assert abs(kept / 4000 - p.prob(guess)) < 4 * np.sqrt(0.25 / 4000)


@pytest.mark.parametrize("writeable", [True, False])
def test_top2_gap_is_the_margin_over_the_runner_up_and_leaves_the_row(writeable: bool
                                                                     ) -> None:
    rng = np.random.default_rng(5)
    for _ in range(50):
        row = rng.normal(size=int(rng.integers(2, 300))).astype(np.float32)
        row[rng.integers(row.size)] = row.max()  # ties too: a margin of 0
        before = row.copy()
        row.flags.writeable = writeable
        ordered = np.sort(before)
        assert top2_gap(row) == pytest.approx(float(ordered[-1] - ordered[-2]), abs=0)
        assert np.array_equal(row, before)
    assert top2_gap(np.array([1.5], np.float32)) == float("inf")
