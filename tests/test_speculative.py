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
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from cluster.messages import LoadSpec
from cluster.sampling import SamplingParams, SparseDist
from cluster.stage_cut import split_at
from coordinator.draft import DraftConfig, ModelDrafter
from coordinator.gamma import GammaConfig, GammaController
from coordinator.generate import Draft, Drafter, Generation, generate
from coordinator.grpc_pipeline import GrpcPipeline
from coordinator.launcher import LocalWorkers
from coordinator.ngram import NgramDrafter
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


def never_end(_token: int) -> bool:
    return False  # fixed lengths, so the runs compare token for token


# --- the cluster, the drafter and the reference ------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(demo_target: Path) -> Tokenizer:
    return Tokenizer(demo_target)


def chat(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(tokenizer.chat_prompt([{"role": "user", "content": text}]))


@pytest.fixture(scope="module")
def ring(demo_target: Path) -> Iterator[GrpcPipeline]:
    with LocalWorkers(2) as workers:
        pipeline = GrpcPipeline(workers.addresses, token=workers.token)
        try:
            pipeline.load([LoadSpec(str(demo_target), s.begin, s.end, n_ctx=N_CTX, n_threads=1)
                           for s in split_at(28, [14])])
            yield pipeline
        finally:
            pipeline.close()


@pytest.fixture(scope="module")
def drafter(demo_draft: Path) -> Iterator[ModelDrafter]:
    # One thread: on two cores shared with two workers, two draft threads ran 3× slower.
    d = ModelDrafter(DraftConfig(demo_draft, n_ctx=N_CTX, n_threads=1), fixed(4))
    yield d
    d.close()


def fixed(gamma: int) -> GammaController:
    return GammaController(GammaConfig(fixed=gamma))


def run(ring: GrpcPipeline, prompt: list[int], n: int, sampling: SamplingParams = GREEDY,
        drafter: Drafter | None = None) -> Generation:
    """One generation from a clean state: no KV on the workers, none in the drafter."""
    if isinstance(drafter, ModelDrafter):
        drafter.truncate(0)
    try:
        return generate(ring, prompt, n, sampling, never_end, drafter=drafter)
    finally:
        ring.reset(0)


@pytest.fixture(scope="module")
def reference(ring: GrpcPipeline, tokenizer: Tokenizer) -> list[Generation]:
    """Non-speculative greedy runs; the first is long (its first SHORT tokens serve too)."""
    return [run(ring, chat(tokenizer, text), LONG if i == 0 else SHORT)
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
        index: int, ring: GrpcPipeline, drafter: ModelDrafter, tokenizer: Tokenizer,
        reference: list[Generation], record_property: RecordProperty) -> None:
    drafter.gamma = fixed(4)
    got = run(ring, chat(tokenizer, CODE_PROMPTS[index]), SHORT, drafter=drafter)
    assert len(got.tokens) == SHORT
    # Every step offers 4 guesses but the last few, which the length budget cuts short.
    assert len(got.stats.proposed) == 4 and got.stats.proposed[3] >= got.stats.steps - 4
    assert got.stats.tokens_per_step > 1
    record_property("stats", got.stats.as_dict())
    check_same(reference[index], got, f"prompt {index}, γ=4", record_property)


def test_model_draft_adaptive_gamma_equals_plain_decoding(
        ring: GrpcPipeline, drafter: ModelDrafter, tokenizer: Tokenizer,
        reference: list[Generation], record_property: RecordProperty) -> None:
    drafter.gamma = GammaController(GammaConfig())
    got = run(ring, chat(tokenizer, CODE_PROMPTS[1]), SHORT, drafter=drafter)
    assert len(got.tokens) == SHORT and sum(got.stats.accepted) > 0
    record_property("stats", got.stats.as_dict())
    record_property("gamma", drafter.gamma.snapshot())
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

    def __init__(self, reference: list[int], prompt_len: int, gamma: int, swap: float,
                 seed: int, n_vocab: int) -> None:
        self.reference, self.prompt_len, self.gamma = reference, prompt_len, gamma
        self.swap, self.n_vocab = swap, n_vocab
        self.rng = np.random.default_rng(seed)
        self.rejections = 0

    def propose(self, context: list[int], sampling: SamplingParams,
                rng: np.random.Generator) -> Draft:
        done = len(context) - self.prompt_len
        tokens = []
        for token in self.reference[done:done + self.gamma]:
            if self.rng.random() < self.swap:
                token = (token + int(self.rng.integers(1, 1000))) % self.n_vocab
            tokens.append(token)
        return Draft(tokens, [SparseDist.point(t) for t in tokens])

    def observe(self, context: list[int], n_proposed: int, n_accepted: int,
                draft_s: float, verify_s: float) -> None:
        self.rejections += n_accepted < n_proposed


def test_kv_stays_consistent_after_many_rejections(
        ring: GrpcPipeline, tokenizer: Tokenizer, reference: list[Generation],
        record_property: RecordProperty) -> None:
    prompt = chat(tokenizer, CODE_PROMPTS[0])
    scrambled = ScrambledReplay(reference[0].tokens, len(prompt), gamma=3, swap=0.5, seed=7,
                                n_vocab=tokenizer.n_vocab)
    got = run(ring, prompt, LONG, drafter=scrambled)
    stats = got.stats.as_dict()
    record_property("stats", stats)
    record_property("rejections", scrambled.rejections)
    assert len(got.tokens) == LONG
    assert stats["acceptance_by_position"][0] < 0.6  # type: ignore[index]
    assert scrambled.rejections >= 40
    assert got.stats.accepted[1] > 0  # some rejections came after accepted guesses
    check_same(reference[0], got, "scrambled draft, 256 tokens", record_property)


# --- n-gram drafting on an edit of given code --------------------------------------------

def test_ngram_draft_accepts_on_an_edit_and_equals_plain_decoding(
        ring: GrpcPipeline, tokenizer: Tokenizer, record_property: RecordProperty) -> None:
    prompt = chat(tokenizer, EDIT_PROMPT)
    want = run(ring, prompt, 64)
    got = run(ring, prompt, 64, drafter=NgramDrafter(gamma=fixed(6)))
    record_property("stats", got.stats.as_dict())
    assert sum(got.stats.accepted) > 0
    assert got.stats.tokens_per_step > 1.5  # the answer quotes the prompt: long matches
    check_same(want, got, "n-gram edit", record_property)


# --- sampling: exactness is tested in test_sampling.py; here, that it runs and repeats ---

def test_sampling_speculation_is_valid_and_repeats_with_the_seed(
        ring: GrpcPipeline, drafter: ModelDrafter, tokenizer: Tokenizer) -> None:
    drafter.gamma = fixed(4)
    sampling = SamplingParams(temperature=0.8, seed=1234)
    prompt = chat(tokenizer, CODE_PROMPTS[2])
    first = run(ring, prompt, 32, sampling, drafter)
    again = run(ring, prompt, 32, sampling, drafter)
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
                       "--draft", "demo", "--gamma", "4", "--json", "--threads", "1",
                       "--ctx", str(N_CTX), "--max-tokens", "32",
                       "--prompt", "Write a Python function that reverses a linked list.")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)["stats"]
    assert stats["tokens_per_step"] > 1
    assert stats["acceptance_by_position"]
    # 4 guesses a step, but for the last steps, which the length budget cuts short
    assert len(stats["acceptance_by_position"]) == 4 and 3 <= stats["gamma_mean"] <= 4
    assert stats["draft_ms"] > 0 and stats["verify_ms"] > 0


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
