"""Speculative decoding across two gRPC workers on the demo pair, end to end.

Greedy speculation must give the target's own greedy output. The only allowed
difference is at a near tie: a batch of γ+1 tokens runs other kernels than a batch of
one, so a top-2 logit margin below NEAR_TIE may flip; such a position is reported.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cluster.sampling import SamplingParams, SparseDist
from coordinator.engine.frontend import Generation
from coordinator.engine.request import GenerationRequest
from coordinator.ring.builder import BuiltRing
from coordinator.service import EngineOptions, start_engine
from coordinator.speculation.draft import DraftModel
from coordinator.speculation.drafting import Draft, Drafter, DraftRequest
from coordinator.speculation.gamma import FREE_DRAFT, DraftCosts, GammaConfig
from coordinator.speculation.ngram import NgramDrafter
from coordinator.tokenizer import Tokenizer
from tests.tiny_gguf import write_tiny_model

pytestmark = pytest.mark.slow
N_CTX = 1024
GREEDY = SamplingParams()
# Top-2 logit margin under which batch-shape rounding may flip the argmax. Measured by
# `python bench/batch_numerics.py` (bench/results/batch_numerics.json): feeding the same
# 64 tokens in batches of 5 instead of 1 changes every position's logits (none stays
# bit-identical; max |Δ| 0.72) and moves the top-2 margin by up to 0.34 (median 0.06).
# The 1e-2 is below that noise, so a flip there is not a bug.
NEAR_TIE = 0.5
SHORT, LONG = 64, 256
CODE_PROMPTS = (
    "Write a Python class implementing a binary search tree with insert, delete, search "
    "and in-order traversal. Include docstrings and type hints.",
    "Write a C function that parses a decimal integer from a string, with overflow checks.",
    "Write a JavaScript function that debounces another function, with a usage example.",
)
EDIT_PROMPT = """Rename the function `area` to `rectangle_area` in this code and return \
the whole file unchanged otherwise:

```python
import math


def area(width: float, height: float) -> float:
    \"\"\"The area of a rectangle.\"\"\"
    if width < 0 or height < 0:
        raise ValueError("negative side")
    return width * height


def circle(radius: float) -> float:
    return math.pi * radius * radius


if __name__ == "__main__":
    print(area(3.0, 4.0), circle(1.0))
```"""
RecordProperty = Callable[[str, object], None]


# --- the cluster, the drafter and the reference ------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(demo_target: Path) -> Tokenizer:
    return Tokenizer(demo_target)


def chat(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(tokenizer.chat_prompt([{"role": "user", "content": text}]))


def fixed(gamma: int) -> GammaConfig:
    """A fixed γ, one window in flight: synchronous speculation (tests/test_runahead.py
    runs windows ahead; the adaptive test below lets the costs decide)."""
    return GammaConfig(fixed=gamma, depth=1)


def run(ring: BuiltRing, tokenizer: Tokenizer, prompt: list[int], n: int,
        sampling: SamplingParams = GREEDY, drafter: Drafter | None = None,
        gamma: GammaConfig | None = None, costs: DraftCosts | None = None) -> Generation:
    """One generation of exactly n tokens through a fresh engine on the loaded ring."""
    gamma = gamma or GammaConfig()
    # Costs are measured only where γ depends on them: a fixed γ or no draft needs none.
    if costs is None and (drafter is None or gamma.fixed is not None):
        costs = FREE_DRAFT
    engine = start_engine(ring, tokenizer, "test", drafter, EngineOptions(gamma=gamma),
                          costs=costs)
    try:
        return engine.generate(GenerationRequest(prompt, n, sampling, ignore_eos=True,
                                                 with_gaps=True))
    finally:
        engine.close()


@pytest.fixture(scope="module")
def reference(ring: BuiltRing, tokenizer: Tokenizer) -> list[Generation]:
    """Non-speculative greedy runs; the first is long (its first SHORT tokens serve too)."""
    return [run(ring, tokenizer, chat(tokenizer, text), LONG if i == 0 else SHORT)
            for i, text in enumerate(CODE_PROMPTS)]


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where both have a token and they differ."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)


def check_same(want: Generation, got: Generation, label: str,
               record_property: RecordProperty) -> None:
    """Same tokens, or the first difference is at a near tie of the non-speculative run."""
    i = first_difference(want.tokens, got.tokens)
    if i is None:
        return
    gap = want.top2_gaps[i]
    assert gap < NEAR_TIE, (f"{label}: token {i} differs ({want.tokens[i]} → {got.tokens[i]}) "
                            f"where the top-2 logit gap is {gap:.4g}, no tie")
    note = f"{label}: first difference at token {i}, a near tie (top-2 gap {gap:.3g})"
    warnings.warn(note, stacklevel=2)
    print(note)
    record_property(f"near_tie[{label}]", {"position": i, "gap": gap})


# --- greedy speculation gives the target's output ----------------------------------------

@pytest.mark.parametrize("index", range(len(CODE_PROMPTS)))
def test_model_draft_fixed_gamma_equals_plain_decoding(
        index: int, ring: BuiltRing, drafter: DraftModel, tokenizer: Tokenizer,
        reference: list[Generation], record_property: RecordProperty) -> None:
    got = run(ring, tokenizer, chat(tokenizer, CODE_PROMPTS[index]), SHORT, drafter=drafter,
              gamma=fixed(4))
    stats = got.stats
    assert len(got.tokens) == SHORT
    # Every step offers 4 guesses but the last few, which the length budget cuts short.
    assert len(stats.proposed) == 4 and stats.proposed[3] >= stats.steps - 5
    assert stats.tokens_per_step > 1
    record_property("stats", stats.as_dict())
    check_same(reference[index], got, f"prompt {index}, γ=4", record_property)


def test_model_draft_adaptive_gamma_equals_plain_decoding_and_repeats(
        ring: BuiltRing, drafter: DraftModel, tokenizer: Tokenizer,
        reference: list[Generation], record_property: RecordProperty) -> None:
    """γ follows the sequence's own acceptance and fixed costs: a request decoded alone
    gives the same tokens, and the same γ at every step, every time. GPU-like costs (on
    this CPU's own, measured ones, drafting never pays and γ stays 0: bench/spec.py)."""
    gpu = DraftCosts(draft=0.0005, verify_a=0.035, verify_b=0.0005)
    prompt = chat(tokenizer, CODE_PROMPTS[1])
    got = run(ring, tokenizer, prompt, SHORT, drafter=drafter, costs=gpu)
    again = run(ring, tokenizer, prompt, SHORT, drafter=drafter, costs=gpu)
    assert len(got.tokens) == SHORT and sum(got.stats.proposed) > 0
    assert again.tokens == got.tokens and again.stats.proposed == got.stats.proposed
    record_property("stats", got.stats.as_dict())
    check_same(reference[1], got, "prompt 1, adaptive γ", record_property)


# --- many rejections leave every KV cache consistent -------------------------------------

class ScrambledReplay:
    """Guesses the plain run's own next tokens, a share of them swapped for others.

    A kept guess is the target's greedy choice and is accepted; a swapped one is
    rejected, at any depth of the draft, so every stage rolls back often and at varying
    depths. No draft model is paid for on two shared cores (the γ = 4 tests above roll
    the draft model back); if a stage kept a rejected position, the target's choices —
    and so the text — would leave the plain run's.
    """

    def __init__(self, reference: list[int], prompt_len: int, swap: float, seed: int,
                 n_vocab: int) -> None:
        self.reference, self.prompt_len = reference, prompt_len
        self.swap, self.n_vocab = swap, n_vocab
        self.rng = np.random.default_rng(seed)
        self.rejections = 0

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        return [self._one(len(r.context), r.gamma) for r in requests]

    def _one(self, n_context: int, gamma: int) -> Draft:
        done = n_context - self.prompt_len
        tokens = []
        for token in self.reference[done:done + gamma]:
            if self.rng.random() < self.swap:
                token = (token + int(self.rng.integers(1, 1000))) % self.n_vocab
            tokens.append(token)
        self.rejections += tokens != self.reference[done:done + gamma]
        return Draft(tokens, [SparseDist.point(t) for t in tokens])

    def release(self, seq: int) -> None:
        """Nothing is kept."""

    def close(self) -> None:
        """Nothing to free."""


def test_kv_stays_consistent_after_many_rejections(
        ring: BuiltRing, tokenizer: Tokenizer, reference: list[Generation],
        record_property: RecordProperty) -> None:
    prompt = chat(tokenizer, CODE_PROMPTS[0])
    scrambled = ScrambledReplay(reference[0].tokens, len(prompt), swap=0.5, seed=7,
                                n_vocab=tokenizer.n_vocab)
    got = run(ring, tokenizer, prompt, LONG, drafter=scrambled, gamma=fixed(3))
    stats = got.stats
    record_property("stats", stats.as_dict())
    record_property("rejections", scrambled.rejections)
    assert len(got.tokens) == LONG
    assert stats.accepted[0] / stats.proposed[0] < 0.6
    assert scrambled.rejections >= 40
    assert stats.accepted[1] > 0  # some rejections came after accepted guesses
    check_same(reference[0], got, "scrambled draft, 256 tokens", record_property)


# --- n-gram drafting on an edit of given code --------------------------------------------

def test_ngram_draft_accepts_on_an_edit_and_equals_plain_decoding(
        ring: BuiltRing, tokenizer: Tokenizer, record_property: RecordProperty) -> None:
    prompt = chat(tokenizer, EDIT_PROMPT)
    want = run(ring, tokenizer, prompt, 64)
    got = run(ring, tokenizer, prompt, 64, drafter=NgramDrafter(), gamma=fixed(6))
    record_property("stats", got.stats.as_dict())
    assert sum(got.stats.accepted) > 0
    assert got.stats.tokens_per_step > 1.5  # the answer quotes the prompt: long matches
    check_same(want, got, "n-gram edit", record_property)


# --- sampling: exactness is tested in test_sampling.py; here, that it runs and repeats ---

def test_sampling_speculation_is_valid_and_repeats_with_the_seed(
        ring: BuiltRing, drafter: DraftModel, tokenizer: Tokenizer) -> None:
    sampling = SamplingParams(temperature=0.8, seed=1234)
    prompt = chat(tokenizer, CODE_PROMPTS[2])
    first = run(ring, tokenizer, prompt, 32, sampling, drafter, fixed(4))
    again = run(ring, tokenizer, prompt, 32, sampling, drafter, fixed(4))
    assert len(first.tokens) == 32
    assert all(0 <= t < tokenizer.n_vocab for t in first.tokens)
    assert sum(first.stats.accepted) > 0
    assert again.tokens == first.tokens


# --- the command line ----------------------------------------------------------------------

def specshard(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_generate_cli_reports_speculation_stats(demo_target: Path) -> None:
    result = specshard("generate", "--model", str(demo_target), "--workers", "2",
                       "--draft", "demo", "--gamma", "4", "--spec-depth", "2", "--json",
                       "--threads", "1", "--ctx", str(N_CTX), "--max-tokens", "32",
                       "--prompt", "Write a Python function that reverses a linked list.")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)["stats"]
    assert stats["tokens_per_step"] > 1
    assert stats["acceptance_by_position"] and stats["ahead_windows"] > 0
    # 4 guesses and a link a window (run-ahead), but for the last windows, which the
    # length budget cuts short
    assert len(stats["acceptance_by_position"]) == 5 and 3 <= stats["gamma_mean"] <= 5


def test_generate_cli_refuses_a_draft_of_another_vocabulary(demo_target: Path,
                                                            tmp_path: Path) -> None:
    tiny = write_tiny_model(tmp_path / "tiny.gguf")
    result = specshard("generate", "--model", str(demo_target), "--workers", "2",
                       "--draft", str(tiny), "--gamma", "4", "--threads", "1",
                       "--ctx", str(N_CTX), "--max-tokens", "4", "--prompt", "hi")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("specshard: error: draft tiny.gguf")
    assert "vocabulary" in lines[0]
