"""Draft length: the γ that maximises expected tokens per second, decided deterministically.

Per draft position k a sequence's own history estimates α_k = P(guess k accepted |
guesses 1..k−1 accepted). The costs are measured once, when the engine starts
(`DraftCosts`): a draft token t_d, and a verify pass t_v(γ) = a + b·γ. Then

    E[tokens](γ) = 1 + Σ_{k=1..γ} Π_{j≤k} α_j        rate(γ) = E(γ) / (γ·t_d + a + b·γ)

and γ = argmax rate over 0..gamma_max, where γ = 0 (no draft) has rate 1/a. Nothing
here reads a clock: a sequence's γ follows from its tokens, so a request decoded alone
gives the same batches — and the same text — run after run and across a worker loss
(docs/scheduler.md, "Determinism"). When drafting does not pay, γ is 0 except for a probe
every `probe_every` steps, which keeps α's estimates alive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

PRIOR_ALPHA = 0.6  # α_1 before evidence; α_k's prior is the estimate of α_{k−1}
PRIOR_WEIGHT = 2.0  # pseudo-observations behind each prior
DECAY = 0.97  # forgetting per observation (effective memory ≈ 1/(1−decay) steps)


@dataclass(frozen=True)
class GammaConfig:
    gamma_max: int = 16
    fixed: int | None = None  # a constant γ: no adaptation
    prior_alpha: float = PRIOR_ALPHA
    prior_weight: float = PRIOR_WEIGHT
    decay: float = DECAY
    # While γ = 0, every n-th step tries γ = 1 (0: never). A probe costs one extra verify
    # row and a draft catch-up; 32 keeps that under ~3% on a CPU (bench/spec.py).
    probe_every: int = 32

    def __post_init__(self) -> None:
        if not 0 <= self.gamma_max <= 16:
            raise ValueError(f"gamma_max must be in 0..16, got {self.gamma_max}")
        if self.fixed is not None and not 0 <= self.fixed <= 16:
            raise ValueError(f"a fixed γ must be in 0..16, got {self.fixed}")
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
    """Decayed counts per position of guesses tested and accepted: one sequence's history."""

    prior_alpha: float = PRIOR_ALPHA
    prior_weight: float = PRIOR_WEIGHT
    decay: float = DECAY
    tested: list[float] = field(default_factory=list)
    accepted: list[float] = field(default_factory=list)

    @classmethod
    def for_config(cls, config: GammaConfig) -> AcceptanceStats:
        return cls(config.prior_alpha, config.prior_weight, config.decay)

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


def _two_digits(x: float) -> float:
    """Round to 2 significant digits: timing noise between runs then rarely moves γ."""
    if x <= 0:
        return 0.0
    return round(x, 1 - int(math.floor(math.log10(x))))


@dataclass(frozen=True)
class DraftCosts:
    """Seconds per draft token, and of a verify pass of γ+1 tokens (a + b·γ)."""

    draft: float
    verify_a: float
    verify_b: float

    @classmethod
    def measured(cls, draft: float, verify_1: float, verify_n: float, n: int) -> DraftCosts:
        """From the time of one draft token and of verify passes of 1 and n tokens."""
        b = max(verify_n - verify_1, 0.0) / max(n - 1, 1)
        return cls(_two_digits(draft), _two_digits(verify_1), _two_digits(b))

    def as_dict(self) -> dict[str, float]:
        return {"draft_ms": round(1000 * self.draft, 3),
                "verify_ms_a": round(1000 * self.verify_a, 3),
                "verify_ms_b": round(1000 * self.verify_b, 3)}


# An acceptance that good drafts reach on code (the demo pair: 0.88 at the first
# position, docs/speculative.md): if drafting would not pay even then, it is not tried.
OPTIMISTIC_ALPHA = 0.95

# Before anything is measured (and for drafters that cost nothing, like n-gram lookup):
# a GPU-like verify pass whose extra rows are nearly free (docs/architecture.md, "On a GPU").
FREE_DRAFT = DraftCosts(draft=0.0, verify_a=1.0, verify_b=0.02)


@dataclass(frozen=True)
class GammaPolicy:
    config: GammaConfig = GammaConfig()
    costs: DraftCosts = FREE_DRAFT

    def new_stats(self) -> AcceptanceStats:
        return AcceptanceStats.for_config(self.config)

    def choose(self, stats: AcceptanceStats, step: int) -> int:
        """γ for a sequence's `step`-th decode step, given its acceptance history."""
        c = self.config
        if c.fixed is not None:
            return c.fixed
        if c.gamma_max == 0:
            return 0
        k = self.costs
        gamma = best_gamma(stats.alphas(c.gamma_max), k.draft, k.verify_a, k.verify_b, 0,
                           c.gamma_max)
        if gamma == 0 and c.probe_every and step % c.probe_every == c.probe_every - 1 \
                and self.could_pay():
            return 1
        return gamma

    def could_pay(self) -> bool:
        """Whether drafting would pay at a high acceptance. If not, no probe: a probe
        costs a verify row and the draft's catch-up on everything since the last one
        (on the CPU here: adaptive γ 18% slower than no draft, bench/spec.py, until
        probes were skipped where they could not pay)."""
        k, c = self.costs, self.config
        return best_gamma([OPTIMISTIC_ALPHA] * c.gamma_max, k.draft, k.verify_a,
                          k.verify_b, 0, c.gamma_max) > 0
