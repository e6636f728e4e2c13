from __future__ import annotations

import numpy as np
import pytest

from coordinator.gamma import (
    AcceptanceStats,
    GammaConfig,
    GammaController,
    VerifyCostFit,
    best_gamma,
    expected_tokens,
)


def run(controller: GammaController, alphas: list[float], t_draft: float, a: float, b: float,
        steps: int, seed: int = 0) -> list[int]:
    """Feed the controller steps of a simulated drafter with conditional acceptance α_k."""
    rng = np.random.default_rng(seed)
    chosen = []
    for _ in range(steps):
        gamma = controller.next_gamma()
        chosen.append(gamma)
        n_acc = 0
        while n_acc < gamma and rng.random() < alphas[min(n_acc, len(alphas) - 1)]:
            n_acc += 1
        controller.observe(gamma, n_acc, gamma * t_draft, a + b * gamma)
    return chosen


def test_expected_tokens_matches_the_geometric_closed_form() -> None:
    alpha = 0.7
    for gamma in (0, 1, 5, 12):
        closed = (1 - alpha ** (gamma + 1)) / (1 - alpha)  # ARCHITECTURE.md
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
    # A CPU: verify grows like the batch (ANCHORS.md: 53 ms for 1 token, 208 for 6).
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


def test_verify_cost_fit_recovers_a_line() -> None:
    fit = VerifyCostFit(decay=1.0, prior_slope=0.25)
    for gamma in [1, 2, 3, 4, 5, 6] * 10:
        fit.observe(gamma, 0.02 + 0.005 * gamma)
    a, b = fit.coefficients()
    assert a == pytest.approx(0.02, rel=0.02) and b == pytest.approx(0.005, rel=0.02)


def test_verify_cost_fit_with_one_gamma_splits_by_the_prior_slope() -> None:
    fit = VerifyCostFit(decay=1.0, prior_slope=0.25)
    for _ in range(20):
        fit.observe(4, 0.040)
    a, b = fit.coefficients()
    assert a + 4 * b == pytest.approx(0.040, rel=1e-3)
    assert b == pytest.approx(0.25 * a, rel=1e-3)


def test_fixed_mode_never_adapts() -> None:
    controller = GammaController(GammaConfig(fixed=3))
    assert set(run(controller, [0.99], 0.0, 0.03, 0.0, 40)) == {3}


def test_initial_gamma_before_any_observation() -> None:
    assert GammaController(GammaConfig(initial=6)).next_gamma() == 6
    assert GammaController(GammaConfig(initial=6, gamma_max=4)).next_gamma() == 4


def test_controller_goes_long_on_a_gpu_like_cost_and_short_on_a_cpu_like_one() -> None:
    gpu = run(GammaController(), [0.9], t_draft=0.0005, a=0.035, b=0.0005, steps=300)
    cpu = run(GammaController(), [0.6], t_draft=0.018, a=0.022, b=0.031, steps=300)
    assert np.median(gpu[-100:]) >= 8
    assert np.median(cpu[-100:]) <= 2


def test_controller_shortens_drafts_when_acceptance_drops() -> None:
    controller = GammaController()
    before = run(controller, [0.9], 0.002, 0.035, 0.002, 200)
    after = run(controller, [0.2], 0.002, 0.035, 0.002, 200, seed=1)
    assert np.median(after[-50:]) < np.median(before[-50:])


def test_controller_is_deterministic_given_observations() -> None:
    runs = [run(GammaController(), [0.8, 0.7], 0.002, 0.03, 0.003, 100) for _ in range(2)]
    assert runs[0] == runs[1]


def test_exploration_tries_one_more_now_and_then() -> None:
    controller = GammaController(GammaConfig(explore_every=4))
    for _ in range(3):
        controller.observe(2, 2, 0.002, 0.03)
    assert controller.next_gamma() == min(controller.best() + 1, 16)


def test_config_is_checked() -> None:
    with pytest.raises(ValueError):
        GammaConfig(gamma_min=5, gamma_max=2)
    with pytest.raises(ValueError):
        GammaConfig(decay=0.0)
