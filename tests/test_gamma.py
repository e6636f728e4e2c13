from __future__ import annotations

import numpy as np
import pytest

from coordinator.speculation.gamma import (
    AcceptanceStats,
    DraftCosts,
    GammaConfig,
    GammaPolicy,
    best_gamma,
    expected_tokens,
    rates,
)


def run(policy: GammaPolicy, alphas: list[float], steps: int, seed: int = 0,
        stats: AcceptanceStats | None = None) -> list[int]:
    """A sequence's steps with a simulated drafter of conditional acceptance α_k."""
    rng = np.random.default_rng(seed)
    stats = stats or policy.new_stats()
    chosen = []
    for step in range(steps):
        gamma = policy.choose(stats, step)
        chosen.append(gamma)
        n_acc = 0
        while n_acc < gamma and rng.random() < alphas[min(n_acc, len(alphas) - 1)]:
            n_acc += 1
        stats.observe(gamma, n_acc)
    return chosen


# A GPU: a verify pass of a few more tokens costs little (docs/architecture.md, "On a GPU").
GPU = DraftCosts(draft=0.0005, verify_a=0.035, verify_b=0.0005)
# This CPU: verify grows like the batch (docs/architecture.md, "Numbers": 53 ms for 1
# token, 208 for 6).
CPU = DraftCosts(draft=0.018, verify_a=0.053, verify_b=0.031)


def test_expected_tokens_matches_the_geometric_closed_form() -> None:
    alpha = 0.7
    for gamma in (0, 1, 5, 12):
        closed = (1 - alpha ** (gamma + 1)) / (1 - alpha)  # docs/architecture.md
        assert expected_tokens([alpha] * 16, gamma) == pytest.approx(closed)


def test_expected_tokens_uses_conditional_rates_per_position() -> None:
    assert expected_tokens([0.5, 0.5, 0.0, 1.0], 4) == pytest.approx(1 + 0.5 + 0.25)


def test_best_gamma_is_the_brute_force_argmax() -> None:
    rng = np.random.default_rng(1)
    for _ in range(50):
        alphas = rng.uniform(0.2, 0.99, 16)
        t_draft, a, b = rng.uniform(0, 0.01), rng.uniform(0.01, 0.05), rng.uniform(0, 0.02)
        rates = {g: expected_tokens(alphas, g) / (g * (t_draft + b) + a) for g in range(1, 17)}
        assert best_gamma(alphas, t_draft, a, b, 1, 16) == max(rates, key=rates.__getitem__)


def test_cheap_verification_and_high_acceptance_want_long_drafts() -> None:
    assert best_gamma([0.95] * 16, 0.0005, 0.035, 0.0005, 1, 16) >= 10
    # A CPU: verify grows like the batch (docs/architecture.md, "Numbers": 53 ms for 1
    # token, 208 for 6).
    assert best_gamma([0.7] * 16, 0.018, 0.022, 0.031, 1, 16) == 1
    assert best_gamma([0.7] * 16, 0.018, 0.022, 0.031, 0, 16) == 0


def test_acceptance_is_estimated_per_position_conditionally() -> None:
    stats = AcceptanceStats(prior_alpha=0.5, prior_weight=1e-6, decay=1.0)
    for _ in range(10):
        stats.observe(3, 3)  # all accepted
    for _ in range(10):
        stats.observe(3, 1)  # second guess rejected: the third was never tested
    a1, a2, a3 = stats.alphas(3)
    assert a1 == pytest.approx(1.0)
    assert a2 == pytest.approx(0.5)
    assert a3 == pytest.approx(1.0)  # tested 10 times, accepted 10 times


def test_an_untested_position_inherits_the_estimate_before_it() -> None:
    stats = AcceptanceStats(prior_alpha=0.5, prior_weight=2.0, decay=1.0)
    for _ in range(50):
        stats.observe(2, 2)
    alphas = stats.alphas(5)
    assert alphas[2] == pytest.approx(alphas[1])
    assert alphas[4] == pytest.approx(alphas[1]) and alphas[1] > 0.95


def test_forgetting_follows_a_change_of_acceptance() -> None:
    stats = AcceptanceStats(prior_alpha=0.5, prior_weight=2.0, decay=0.9)
    for _ in range(100):
        stats.observe(1, 1)
    assert stats.alphas(1)[0] > 0.9
    for _ in range(40):
        stats.observe(1, 0)
    assert stats.alphas(1)[0] < 0.15  # the prior's pseudo-counts are all that is left


def test_costs_are_measured_to_two_significant_digits() -> None:
    costs = DraftCosts.measured(draft=0.0123456, verify_1=0.05312, verify_n=0.21049, n=6)
    assert (costs.draft, costs.verify_a) == (0.012, 0.053)
    assert costs.verify_b == pytest.approx(0.031)  # (0.21049 − 0.05312) ÷ 5, rounded
    # run-to-run noise of a few percent rarely moves them
    again = DraftCosts.measured(draft=0.0124, verify_1=0.0532, verify_n=0.2100, n=6)
    assert again == costs


def test_fixed_mode_never_adapts() -> None:
    assert set(run(GammaPolicy(GammaConfig(fixed=3), CPU), [0.99], 40)) == {3}


def test_long_drafts_on_a_gpu_like_cost_and_none_on_a_cpu_like_one() -> None:
    gpu = run(GammaPolicy(costs=GPU), [0.9], steps=300)
    cpu = run(GammaPolicy(costs=CPU), [0.6], steps=300)
    assert np.median(gpu[-100:]) >= 8
    assert np.median(cpu) == 0  # drafting does not pay: off …
    assert set(cpu) == {0, 1} and cpu.count(1) == 300 // 32  # … but for a probe every 32


def test_no_probes_where_drafting_cannot_pay() -> None:
    # A draft token costing half a verify pass, each extra row as much as the first:
    # even at α = 0.95 a guess costs more than it brings.
    costly = DraftCosts(draft=0.035, verify_a=0.068, verify_b=0.057)
    assert not GammaPolicy(costs=costly).could_pay()
    assert set(run(GammaPolicy(costs=costly), [0.9], 200)) == {0}
    assert GammaPolicy(costs=CPU).could_pay() and GammaPolicy(costs=GPU).could_pay()


def test_gamma_zero_without_probes_when_asked() -> None:
    assert set(run(GammaPolicy(GammaConfig(probe_every=0), CPU), [0.6], 100)) == {0}


def test_probes_find_that_drafting_pays_when_acceptance_is_high() -> None:
    # A cheap draft whose guesses are nearly always right pays even on a CPU-like verify.
    costs = DraftCosts(draft=0.002, verify_a=0.053, verify_b=0.012)
    chosen = run(GammaPolicy(GammaConfig(probe_every=4), costs), [0.98], 200)
    assert chosen[0] == 0 or chosen[0] > 0  # the prior decides the start
    assert np.median(chosen[-50:]) >= 2


def test_shorter_drafts_when_acceptance_drops() -> None:
    policy = GammaPolicy(costs=GPU)
    stats = policy.new_stats()
    before = run(policy, [0.9], 200, stats=stats)
    after = run(policy, [0.2], 200, seed=1, stats=stats)
    assert np.median(after[-50:]) < np.median(before[-50:])


def test_gamma_is_a_function_of_the_history_only() -> None:
    runs = [run(GammaPolicy(costs=GPU), [0.8, 0.7], 100) for _ in range(2)]
    assert runs[0] == runs[1]


def test_config_is_checked() -> None:
    with pytest.raises(ValueError):
        GammaConfig(gamma_max=17)
    with pytest.raises(ValueError):
        GammaConfig(fixed=-1)
    with pytest.raises(ValueError):
        GammaConfig(decay=0.0)


def stats_with(alpha: float, steps: int = 200) -> AcceptanceStats:
    """A history of `steps` windows of 8 guesses each accepted with probability α."""
    stats = AcceptanceStats()
    rng = np.random.default_rng(3)
    for _ in range(steps):
        accepted = 0
        while accepted < 8 and rng.random() < alpha:
            accepted += 1
        stats.observe(8, accepted)
    return stats


def test_run_ahead_is_chosen_where_it_beats_synchronous_speculation() -> None:
    """Stages idle between one stream's windows: with cheap drafting and acceptance,
    windows run ahead on every stage; a costly draft that is mostly rejected keeps one
    window in flight; `--spec-depth` is taken as given, up to the stages."""
    cheap = GammaPolicy(GammaConfig(), DraftCosts(draft=0.0, verify_a=0.2, verify_b=0.04))
    assert cheap.depth(stats_with(0.8), stages=2) == 2
    assert cheap.depth(stats_with(0.8), stages=3) == 3
    assert cheap.depth(stats_with(0.8), stages=1) == 1
    costly = GammaPolicy(GammaConfig(), DraftCosts(draft=0.1, verify_a=0.2, verify_b=0.04))
    assert costly.depth(stats_with(0.1), stages=2) == 1
    fixed = GammaPolicy(GammaConfig(depth=3), costly.costs)
    assert fixed.depth(stats_with(0.1), stages=2) == 2  # no more windows than stages
    # Running ahead, γ is chosen for the pipelined rate: never longer than synchronous.
    deep = cheap.choose(stats_with(0.8), 10, depth=2)
    assert deep <= cheap.choose(stats_with(0.8), 10, depth=1)


def test_run_ahead_rates_match_the_formula() -> None:
    alphas, d, a, b = [0.9, 0.8, 0.7, 0.6], 0.01, 0.2, 0.04
    got = rates(alphas, d, a, b, 3, depth=2)
    for gamma in range(4):
        whole = float(np.prod(alphas[:gamma + 1]))
        tokens = 1 + sum(float(np.prod(alphas[:k + 1])) for k in range(gamma))
        window = (a + b * gamma) / 2 + (gamma + 1) * d
        assert got[gamma] == pytest.approx(tokens / (window * (1 + (1 - whole))))
