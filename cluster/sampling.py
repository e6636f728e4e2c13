"""Sampling parameters and the filtered distributions both draft and target use.

The same transforms (logit bias, then the repetition penalties over the sequence's own
tokens) and filters (top-k, top-p, min-p, temperature) are applied to the draft's and
the target's logits, position by position, so speculative sampling reproduces the
target's filtered distribution exactly (Leviathan et al. 2023, applied to the filtered
pair). The order and arithmetic are llama.cpp's (src/llama-sampler.cpp; the chain of
common/sampling.cpp: logit bias, penalties, top-k, top-p, min-p, temperature).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cluster.errors import SpecshardError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 → greedy
    top_k: int = 0  # 0 → off
    top_p: float = 1.0  # 1 → off
    seed: int | None = None
    min_p: float = 0.0  # keep tokens with p ≥ min_p · p_max; 0 → off
    presence_penalty: float = 0.0  # subtracted once from a token seen in the window
    frequency_penalty: float = 0.0  # subtracted per occurrence in the window
    repeat_penalty: float = 1.0  # a seen token's logit ÷ (> 0) or × (≤ 0) this; 1 → off
    repeat_last_n: int = 64  # the window: the last n tokens; -1 → all; 0 → no penalties
    # Positions before this do not count toward the penalties: 0 counts the prompt too (as
    # llama-server does); the prompt's length counts generated tokens only (as
    # llama-cpp-python's Llama.generate does).
    penalty_from: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    # The verdict carries each emitted token's logprob and the `logprobs` likeliest
    # tokens' (None: no logprobs). Not a sampling setting, but it travels with them.
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise SpecshardError(f"temperature must be ≥ 0, got {self.temperature}")
        if self.top_k < 0:
            raise SpecshardError(f"top_k must be ≥ 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise SpecshardError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise SpecshardError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise SpecshardError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not (self.repeat_penalty > 0 and np.isfinite(self.repeat_penalty)):
            raise SpecshardError(f"repeat_penalty must be > 0, got {self.repeat_penalty}")
        if self.repeat_last_n < -1:
            raise SpecshardError(f"repeat_last_n must be ≥ -1, got {self.repeat_last_n}")
        if self.penalty_from < 0:
            raise SpecshardError(f"penalty_from must be ≥ 0, got {self.penalty_from}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise SpecshardError(f"top_logprobs must be in [0, 20], got {self.logprobs}")
        for token, bias in self.logit_bias:
            if token < 0 or not np.isfinite(bias) and bias != -np.inf:
                raise SpecshardError(f"logit_bias: token {token} with bias {bias}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    @property
    def penalized(self) -> bool:
        return self.repeat_last_n != 0 and (self.repeat_penalty != 1.0 or
                                            self.presence_penalty != 0.0 or
                                            self.frequency_penalty != 0.0)

    @property
    def transforms(self) -> bool:
        """The logits change before the filters (penalties or a logit bias)."""
        return self.penalized or bool(self.logit_bias)


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


def transform(logits: np.ndarray, params: SamplingParams, tokens: Sequence[int],
              end: int | None = None) -> np.ndarray:
    """The logits after the logit bias and the penalties, as llama.cpp computes them (f32).

    `tokens` are the sequence's tokens by position; the row is the one predicting
    position `end` (default: after all of them), so tokens[:end] precede it. The window
    is the last `repeat_last_n` of those at positions ≥ `penalty_from`. Returns `logits`
    itself when nothing changes, else a new array.
    """
    if not params.transforms:
        return logits
    out = np.array(logits, dtype=np.float32)
    for token, bias in params.logit_bias:
        if token < out.size:
            out[token] += np.float32(bias)
    end = len(tokens) if end is None else end
    if params.penalized:
        n = end if params.repeat_last_n < 0 else params.repeat_last_n
        window = tokens[max(params.penalty_from, end - n, 0):end]
        if len(window):
            ids, counts = np.unique(np.asarray(window, dtype=np.int64), return_counts=True)
            ids, counts = ids[ids < out.size], counts[ids < out.size]
            values = out[ids]
            if params.repeat_penalty != 1.0:
                r = np.float32(params.repeat_penalty)
                values = np.where(values <= 0, values * r, values / r).astype(np.float32)
            values = values - (counts.astype(np.float32) * np.float32(params.frequency_penalty)
                               + np.float32(params.presence_penalty))
            out[ids] = values
    return out


def filtered_probs(logits: np.ndarray, params: SamplingParams) -> SparseDist:
    """The distribution a sampler with these parameters draws from, as a sparse dist.

    Filters in llama.cpp's default order: top-k, then top-p on the untempered
    distribution, then min-p (p ≥ min_p · p_max, i.e. logit ≥ max + log min_p), then
    temperature on what is left (common/sampling.cpp). `logits` are already transformed
    (`transform`) where the request asks for penalties or a bias.
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
    if params.min_p > 0:
        kept = raw[ids]
        floor = np.float32(np.float32(kept.max()) + np.float32(np.log(np.float32(params.min_p))))
        ids = ids[kept >= floor]
    return SparseDist(ids.astype(np.int64), _softmax(raw[ids] / params.temperature))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def sample(dist: SparseDist, rng: np.random.Generator) -> int:
    if dist.ids.size == 1:
        return int(dist.ids[0])
    return int(dist.ids[rng.choice(dist.ids.size, p=dist.probs)])
