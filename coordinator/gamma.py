"""Adaptive draft length: choose γ that maximises expected tokens per second.

Per draft position k the controller estimates α_k = P(guess k accepted | guesses
1..k−1 accepted), and it measures what a draft token and a pipeline step cost. Then

    E[tokens](γ) = 1 + Σ_{k=1..γ} Π_{j≤k} α_j        time(γ) = γ·t_draft + t_verify(γ)

and γ = argmax E/time over [gamma_min, gamma_max], with t_verify(γ) = a + b·γ fitted to
the observed steps. Everything is a deterministic function of the observations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class GammaConfig:
    gamma_min: int = 1
    gamma_max: int = 16
    fixed: int | None = None  # a constant γ: no adaptation
    initial: int = 4  # γ before any step has been timed
    prior_alpha: float = 0.6  # α_1 before evidence; α_k's prior is the estimate of α_{k−1}
    prior_weight: float = 2.0  # pseudo-observations behind each prior
    decay: float = 0.97  # forgetting per observation (effective memory ≈ 1/(1−decay) steps)
    # Prior slope of t_verify, as a fraction of its intercept; it decides b while every
    # step had the same γ. Between a GPU (≈0.02, bandwidth-bound) and this CPU (≈1.4:
    # ANCHORS.md, verify of 1 token 53 ms, of 6 tokens 208 ms).
    prior_slope: float = 0.25
    explore_every: int = 16  # every n-th step tries γ+1 (0: never), so deeper α and b get data

    def __post_init__(self) -> None:
        if not 0 <= self.gamma_min <= self.gamma_max:
            raise ValueError(f"need 0 ≤ gamma_min ≤ gamma_max, got "
                             f"{self.gamma_min}..{self.gamma_max}")
        if self.fixed is not None and self.fixed < 0:
            raise ValueError(f"fixed γ must be ≥ 0, got {self.fixed}")
        if not 0 < self.decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {self.decay}")


def expected_tokens(alphas: list[float] | np.ndarray, gamma: int) -> float:
    """Tokens one step emits: accepted guesses plus the correction or bonus token."""
    return 1.0 + float(np.sum(np.cumprod(np.asarray(alphas[:gamma], dtype=np.float64))))


def best_gamma(alphas: list[float] | np.ndarray, t_draft: float, t_verify_a: float,
               t_verify_b: float, gamma_min: int, gamma_max: int) -> int:
    """argmax over γ of E[tokens](γ) / (γ·t_draft + a + b·γ); the smallest γ on ties."""
    gammas = np.arange(gamma_min, gamma_max + 1)
    cum = np.concatenate([[0.0], np.cumsum(np.cumprod(np.asarray(alphas[:gamma_max],
                                                                 dtype=np.float64)))])
    tokens = 1.0 + cum[gammas]
    time = np.maximum(gammas * (t_draft + t_verify_b) + t_verify_a, 1e-12)
    rate = tokens / time
    return int(gammas[int(np.argmax(rate >= rate.max() * (1 - 1e-9)))])


@dataclass
class AcceptanceStats:
    """Decayed counts per position of guesses tested and accepted."""

    prior_alpha: float
    prior_weight: float
    decay: float
    tested: list[float] = field(default_factory=list)
    accepted: list[float] = field(default_factory=list)

    def observe(self, n_proposed: int, n_accepted: int) -> None:
        # Guess k is tested only when guesses 1..k−1 were accepted.
        n_tested = min(n_proposed, n_accepted + 1)
        while len(self.tested) < n_tested:
            self.tested.append(0.0)
            self.accepted.append(0.0)
        for k in range(n_tested):
            self.tested[k] = self.tested[k] * self.decay + 1.0
            self.accepted[k] = self.accepted[k] * self.decay + (k < n_accepted)

    def alphas(self, n: int) -> list[float]:
        """α_1..α_n; an untested position inherits the estimate of the one before."""
        out, prior = [], self.prior_alpha
        for k in range(n):
            tested = self.tested[k] if k < len(self.tested) else 0.0
            accepted = self.accepted[k] if k < len(self.accepted) else 0.0
            prior = (accepted + self.prior_weight * prior) / (tested + self.prior_weight)
            out.append(prior)
        return out


@dataclass
class VerifyCostFit:
    """t_verify(γ) = a + b·γ by decayed least squares, with a ridge pull b → ρ·a."""

    decay: float
    prior_slope: float
    prior_weight: float = 1.0
    sums: np.ndarray = field(default_factory=lambda: np.zeros(5))  # w, wx, wxx, wy, wxy

    def observe(self, gamma: int, seconds: float) -> None:
        x = float(gamma)
        self.sums = self.sums * self.decay + np.array([1.0, x, x * x, seconds, x * seconds])

    @property
    def n(self) -> float:
        return float(self.sums[0])

    def coefficients(self) -> tuple[float, float]:
        w, wx, wxx, wy, wxy = self.sums
        rho, lam = self.prior_slope, self.prior_weight
        # Normal equations of Σ w(y − a − bx)² + λ(b − ρa)².
        lhs = np.array([[w + lam * rho * rho, wx - lam * rho], [wx - lam * rho, wxx + lam]])
        a, b = np.linalg.solve(lhs, np.array([wy, wxy]))
        return max(float(a), 0.0), max(float(b), 0.0)

    def seconds(self, gamma: int) -> float:
        a, b = self.coefficients()
        return a + b * gamma


class GammaController:
    """Picks the next draft length from what the previous steps showed."""

    def __init__(self, config: GammaConfig | None = None, draft_cost_prior: float = 0.0) -> None:
        self.config = config or GammaConfig()
        c = self.config
        self.acceptance = AcceptanceStats(c.prior_alpha, c.prior_weight, c.decay)
        self.verify_cost = VerifyCostFit(c.decay, c.prior_slope)
        self._draft_s = draft_cost_prior  # decayed sum of draft seconds …
        self._draft_n = 0.0  # … and of draft tokens
        self.steps = 0

    @property
    def draft_cost(self) -> float:
        """Seconds per draft token (mean over the decayed window)."""
        return self._draft_s / self._draft_n if self._draft_n else self._draft_s

    def observe(self, n_proposed: int, n_accepted: int, draft_s: float,
                verify_s: float) -> None:
        d = self.config.decay
        self.steps += 1
        self.acceptance.observe(n_proposed, n_accepted)
        self.verify_cost.observe(n_proposed, verify_s)
        if n_proposed > 0:
            self._draft_s = (self._draft_s * d if self._draft_n else 0.0) + draft_s
            self._draft_n = self._draft_n * d + n_proposed

    def best(self) -> int:
        """The γ that maximises expected tokens per second under the current estimates."""
        c = self.config
        if c.fixed is not None:
            return c.fixed
        if self.verify_cost.n == 0:
            return min(max(c.initial, c.gamma_min), c.gamma_max)
        a, b = self.verify_cost.coefficients()
        return best_gamma(self.acceptance.alphas(c.gamma_max), self.draft_cost, a, b,
                          c.gamma_min, c.gamma_max)

    def next_gamma(self) -> int:
        gamma = self.best()
        c = self.config
        if c.fixed is None and c.explore_every and self.steps % c.explore_every \
                == c.explore_every - 1:
            gamma = min(gamma + 1, c.gamma_max)
        return gamma

    def snapshot(self) -> dict[str, object]:
        """The estimates behind the choice, JSON-serialisable (for stats and logs)."""
        a, b = self.verify_cost.coefficients()
        n = self.config.gamma_max
        return {"gamma": self.best(), "alphas": [round(x, 4) for x in self.acceptance.alphas(n)],
                "draft_ms": round(1000 * self.draft_cost, 4),
                "verify_ms_a": round(1000 * a, 4), "verify_ms_b": round(1000 * b, 4)}
