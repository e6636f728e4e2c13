"""Sampling parameters and the filtered distributions both draft and target use.

The same filters (top-k, top-p, temperature) are applied to the draft's and
the target's logits, so speculative sampling reproduces the target's filtered
distribution exactly (Leviathan et al. 2023, applied to the filtered pair).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cluster.errors import SpecshardError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 → greedy
    top_k: int = 0  # 0 → off
    top_p: float = 1.0  # 1 → off
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise SpecshardError(f"temperature must be ≥ 0, got {self.temperature}")
        if self.top_k < 0:
            raise SpecshardError(f"top_k must be ≥ 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise SpecshardError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass(frozen=True)
class SparseDist:
    """A distribution over a few token ids; every other id has probability 0."""

    ids: np.ndarray  # int64
    probs: np.ndarray  # float64, sums to 1

    @staticmethod
    def point(token: int) -> SparseDist:
        return SparseDist(np.array([token], dtype=np.int64), np.array([1.0]))

    def prob(self, token: int) -> float:
        hit = np.flatnonzero(self.ids == token)
        return float(self.probs[hit[0]]) if hit.size else 0.0

    def dense(self, n_vocab: int) -> np.ndarray:
        out = np.zeros(n_vocab, dtype=np.float64)
        out[self.ids] = self.probs
        return out


def filtered_probs(logits: np.ndarray, params: SamplingParams) -> SparseDist:
    """The distribution a sampler with these parameters draws from, as a sparse dist.

    Filters in llama.cpp's default order: top-k, then top-p on the untempered
    distribution, then temperature on what is left (common/sampling.cpp).
    """
    if params.greedy:
        return SparseDist.point(int(np.argmax(logits)))
    raw = logits.astype(np.float64)
    if 0 < params.top_k < raw.size:
        ids = np.argpartition(raw, -params.top_k)[-params.top_k:]
    else:
        ids = np.arange(raw.size)
    if params.top_p < 1:
        # Descending by logit, ties by id, so the cut is deterministic.
        ids = ids[np.lexsort((ids, -raw[ids]))]
        probs = _softmax(raw[ids])
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p) + 1)
        ids = ids[:keep]
    return SparseDist(ids.astype(np.int64), _softmax(raw[ids] / params.temperature))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def sample(dist: SparseDist, rng: np.random.Generator) -> int:
    if dist.ids.size == 1:
        return int(dist.ids[0])
    return int(dist.ids[rng.choice(dist.ids.size, p=dist.probs)])
