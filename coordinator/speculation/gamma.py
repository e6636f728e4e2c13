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

Run-ahead (depth D > 1, docs/scheduler.md "Run-ahead windows"): with S stages a window
of γ rows takes about t_v(γ)/S on each, and a window is followed by the next before its
verdict. Drafting it ((γ+1)·t_d: γ guesses and a link) shares the first box with stage
0 — the coordinator's core, or its GPU — so it adds to that stage's time. A window
judges γ guesses and a link; it is useful when every window before it was accepted
whole, P(γ) = Π_{j≤γ+1} α_j. After a rejection, the D − 1 windows behind it are stale.
Per useful window:

    rate_D(γ) = E(γ) / ((o·t_v(γ)/S + (γ+1)·t_d) · (1 + (1 − P(γ))·(D − 1)))

where o (`DraftCosts.overlap`) is measured at start: what a window sent right behind
another adds, over t_v/S (1 on boxes of their own; more on cores that slow each other).

D = S when the best rate_S beats the best synchronous rate(γ), else 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

SPEC_DEPTH_HELP = ("verify windows of one sequence in flight (run-ahead speculation; 1: "
                   "synchronous; default: chosen by the measured costs)")
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
    depth: int | None = None  # run-ahead windows in flight; None: chosen by the costs

    def __post_init__(self) -> None:
        if not 0 <= self.gamma_max <= 16:
            raise ValueError(f"gamma_max must be in 0..16, got {self.gamma_max}")
        if self.fixed is not None and not 0 <= self.fixed <= 16:
            raise ValueError(f"a fixed γ must be in 0..16, got {self.fixed}")
        if not 0 < self.decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {self.decay}")
        if self.depth is not None and not 1 <= self.depth <= 8:
            raise ValueError(f"the speculation depth must be in 1..8, got {self.depth}")


def expected_tokens(alphas: list[float] | np.ndarray, gamma: int) -> float:
    """Tokens one step emits: accepted guesses plus the correction or bonus token."""
    return 1.0 + float(np.sum(np.cumprod(np.asarray(alphas[:gamma], dtype=np.float64))))


def rates(alphas: list[float] | np.ndarray, t_draft: float, t_verify_a: float,
          t_verify_b: float, gamma_max: int, depth: int = 1, overlap: float = 1.0
          ) -> np.ndarray:
    """Expected tokens per second for γ = 0..gamma_max, synchronous (depth 1) or with
    `depth` windows in flight over as many stages (the module's formulas)."""
    gammas = np.arange(gamma_max + 1)
    a = np.asarray(alphas[:gamma_max + 1], dtype=np.float64)
    a = np.concatenate([a, np.full(gamma_max + 1 - a.size, a[-1] if a.size else 0.0)])
    whole = np.cumprod(a)  # P(guesses 1..k+1 all accepted), k = 0..gamma_max
    tokens = 1.0 + np.concatenate([[0.0], np.cumsum(whole[:gamma_max])])[gammas]
    verify = gammas * t_verify_b + t_verify_a
    if depth == 1:
        return tokens / np.maximum(gammas * t_draft + verify, 1e-12)
    window = overlap * verify / depth + (gammas + 1) * t_draft
    return tokens / np.maximum(window * (1 + (1 - whole[gammas]) * (depth - 1)), 1e-12)


def best_gamma(alphas: list[float] | np.ndarray, t_draft: float, t_verify_a: float,
               t_verify_b: float, gamma_min: int, gamma_max: int, depth: int = 1,
               overlap: float = 1.0) -> int:
    """argmax over γ of the expected rate (`rates`); the smallest γ on ties."""
    rate = rates(alphas, t_draft, t_verify_a, t_verify_b, gamma_max, depth,
                 overlap)[gamma_min:]
    return gamma_min + int(np.argmax(rate >= rate.max() * (1 - 1e-9)))


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
    # What a window sent right behind another costs, over the stage-time t_v/S a
    # perfect pipeline would add: 1 where stages run on boxes of their own; more where
    # they slow each other computing at once (cores sharing a chip), or hops add.
    overlap: float = 1.0

    @classmethod
    def measured(cls, draft: float, verify_1: float, verify_n: float, n: int,
                 overlap: float = 1.0) -> DraftCosts:
        """From the time of one draft token, of verify passes of 1 and n tokens, and
        what a second pass of n right behind the first added, over its stage-time."""
        b = max(verify_n - verify_1, 0.0) / max(n - 1, 1)
        return cls(_two_digits(draft), _two_digits(verify_1), _two_digits(b),
                   _two_digits(max(overlap, 1.0)))

    def as_dict(self) -> dict[str, float]:
        return {"draft_ms": round(1000 * self.draft, 3),
                "verify_ms_a": round(1000 * self.verify_a, 3),
                "verify_ms_b": round(1000 * self.verify_b, 3),
                "overlap": self.overlap}


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

    def choose(self, stats: AcceptanceStats, step: int, depth: int = 1) -> int:
        """γ for a sequence's `step`-th decode step, given its acceptance history and
        the windows it keeps in flight."""
        c = self.config
        if c.fixed is not None:
            return c.fixed
        if c.gamma_max == 0:
            return 0
        k = self.costs
        gamma = best_gamma(stats.alphas(c.gamma_max + 1), k.draft, k.verify_a, k.verify_b,
                           0, c.gamma_max, depth, k.overlap)
        if gamma == 0 and depth == 1 and c.probe_every and \
                step % c.probe_every == c.probe_every - 1 and self.could_pay():
            return 1
        return gamma

    def depth(self, stats: AcceptanceStats, stages: int) -> int:
        """Windows in flight for a sequence's next chain: `--spec-depth`, or `stages`
        when running ahead is expected to be faster than speculating synchronously."""
        c = self.config
        if c.depth is not None:
            return min(c.depth, stages)
        if stages < 2:
            return 1
        k, alphas = self.costs, stats.alphas(c.gamma_max + 1)
        top = c.fixed if c.fixed is not None else c.gamma_max
        low = c.fixed if c.fixed is not None else 0
        sync = rates(alphas, k.draft, k.verify_a, k.verify_b, top)[low:].max()
        ahead = rates(alphas, k.draft, k.verify_a, k.verify_b, top, stages,
                      k.overlap)[low:].max()
        return stages if ahead > sync else 1

    def could_pay(self) -> bool:
        """Whether drafting would pay at a high acceptance. If not, no probe: a probe
        costs a verify row and the draft's catch-up on everything since the last one
        (on the CPU here: adaptive γ 18% slower than no draft, bench/spec.py, until
        probes were skipped where they could not pay)."""
        k, c = self.costs, self.config
        return best_gamma([OPTIMISTIC_ALPHA] * c.gamma_max, k.draft, k.verify_a,
                          k.verify_b, 0, c.gamma_max) > 0
