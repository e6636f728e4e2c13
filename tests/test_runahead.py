"""Run-ahead speculation: several verify windows of one sequence in flight.

A window ends with a link — a guess for the position after its last row, judged there —
and the next window, sent before the verdict, starts with it. A verdict that breaks the
chain makes the windows behind it stale: their verdicts are dropped and the next window
starts where the verdict left off (every stage drops a slice's positions from its start
on). Greedy must give plain decoding's text but at near ties; sampling must keep the
target's distribution (the χ² tests below, on the last stage's own judge).
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cluster.judge import judge
from cluster.messages import Batch, Slice
from cluster.sampling import SamplingParams, SparseDist, filtered_probs, sample, transform
from cluster.stage_cut import split_at
from coordinator.engine.frontend import Generation
from coordinator.engine.request import GenerationRequest
from coordinator.ring.builder import BuiltRing
from coordinator.ring.contract import BatchDone, RingEvent
from coordinator.service import EngineOptions, start_engine
from coordinator.speculation.draft import DraftModel
from coordinator.speculation.drafting import Draft, Drafter, DraftRequest
from coordinator.speculation.gamma import FREE_DRAFT, GammaConfig
from coordinator.speculation.ngram import NgramDrafter
from coordinator.tokenizer import Tokenizer
from tests.conftest import local_ring
from tests.test_penalties import P_LOGITS, PARAMS, Q_LOGITS, row_after
from tests.test_sampling import chi2_pvalue
from tests.test_speculative import (
    CODE_PROMPTS,
    EDIT_PROMPT,
    GREEDY,
    RecordProperty,
    chat,
    check_same,
)

pytestmark = pytest.mark.slow
N_CTX = 1024
N_TOKENS = 64
HISTORY = [3, 3, 7, 1]
N_VOCAB, N_DRAWS, MIN_P = len(P_LOGITS), 20_000, 1e-3


@pytest.fixture(scope="module")
def tokenizer(demo_target: Path) -> Tokenizer:
    return Tokenizer(demo_target)


@pytest.fixture(scope="module")
def three(demo_target: Path) -> Iterator[BuiltRing]:
    """The demo target on three local gRPC workers."""
    with local_ring(demo_target, split_at(28, [9, 19]), N_CTX) as built:
        yield built


def run(ring: BuiltRing, tokenizer: Tokenizer, prompt: list[int], drafter: Drafter | None,
        gamma: GammaConfig, n: int = N_TOKENS, sampling: SamplingParams = GREEDY,
        keep: list[int] | None = None) -> Generation:
    """One generation through a fresh engine on the loaded ring (micro-batches = stages).
    `keep`: filled with the slot whose caches hold the answer when it ends."""
    engine = start_engine(ring, tokenizer, "test", drafter, EngineOptions(gamma=gamma),
                          costs=FREE_DRAFT)
    try:
        done = engine.generate(GenerationRequest(prompt, n, sampling, ignore_eos=True,
                                                 with_gaps=True))
        if keep is not None:
            keep.extend(engine.core.cached)
        # /metrics counts what the request's stats do (one request per engine).
        shown = {line.split()[0]: float(line.split()[1])
                 for line in engine.metrics.render().decode().splitlines()
                 if line.startswith("specshard_windows_")}
        assert shown["specshard_windows_stale_total"] == done.stats.stale_windows
        assert shown["specshard_windows_skipped_total"] == done.stats.skipped_windows
        return done
    finally:
        engine.close()


@pytest.fixture(scope="module")
def plain(ring: BuiltRing, tokenizer: Tokenizer) -> dict[str, Generation]:
    """Plain greedy decoding, per prompt, on two workers (the reference for both rings:
    only batch shapes differ between them, as between plain and speculative runs)."""
    return {text: run(ring, tokenizer, chat(tokenizer, text), None, GammaConfig())
            for text in (EDIT_PROMPT, CODE_PROMPTS[0])}


# --- greedy: plain decoding's text ----------------------------------------------------

@pytest.mark.parametrize("workers", [2, 3])
@pytest.mark.parametrize("draft", ["ngram", "model"])
def test_run_ahead_greedy_equals_plain_decoding(
        workers: int, draft: str, ring: BuiltRing, three: BuiltRing, drafter: DraftModel,
        tokenizer: Tokenizer, plain: dict[str, Generation],
        record_property: RecordProperty) -> None:
    built = ring if workers == 2 else three
    text = EDIT_PROMPT if draft == "ngram" else CODE_PROMPTS[0]
    drafts: Drafter = NgramDrafter() if draft == "ngram" else drafter
    got = run(built, tokenizer, chat(tokenizer, text), drafts,
              GammaConfig(fixed=3, depth=workers))
    stats = got.stats
    record_property("stats", stats.as_dict())
    assert len(got.tokens) == N_TOKENS
    assert stats.ahead_windows > 0  # windows went out before the verdicts they continue
    # Every stale window followed a verdict of the last worker's that broke its chain:
    # that worker skipped it (early cancellation), however many stages it crossed.
    assert stats.skipped_windows == stats.stale_windows
    assert sum(stats.accepted) > 0
    check_same(plain[text], got, f"run-ahead, {draft}, {workers} workers", record_property)


# --- after rejections with windows in flight, the caches are a synchronous run's -------

class PositionScramble:
    """Guesses the plain run's next tokens, those at some positions swapped for others —
    chosen by the position alone, so a synchronous run and a run-ahead run send the same
    windows (a run-ahead window after a whole acceptance starts with the link, which
    is the bonus token the synchronous run draws there) and are rejected at the same
    places, while run-ahead windows go stale behind every rejection."""

    def __init__(self, reference: list[int], prompt_len: int, n_vocab: int) -> None:
        self.reference, self.prompt_len, self.n_vocab = reference, prompt_len, n_vocab

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        out = []
        for r in requests:
            done = len(r.context) - self.prompt_len
            tokens = [t if (done + i) % 5 != 3 else (t + 7) % self.n_vocab
                      for i, t in enumerate(self.reference[done:done + r.gamma])]
            out.append(Draft(tokens, [SparseDist.point(t) for t in tokens]))
        return out

    def release(self, seq: int) -> None:
        pass

    def close(self) -> None:
        pass


def next_logits(ring: BuiltRing, slot: int, tokens: list[int]) -> np.ndarray:
    """The target's logits after `tokens`, from what `slot`'s caches hold of them (the
    last token is computed again at its position; nothing before it)."""
    answers: queue.Queue[RingEvent] = queue.Queue()
    ring.ring.connect(answers.put)
    ring.ring.submit(Batch(10**9, [Slice(slot, len(tokens) - 1, tokens[-1:],
                                         return_logits=True)]))
    event = answers.get(timeout=120)
    assert isinstance(event, BatchDone)
    logits = event.result.results[0].logits
    assert logits is not None
    ring.ring.submit(Batch(10**9 + 1, [Slice(slot, 0, [], judge=False)]))  # clear the slot
    assert isinstance(answers.get(timeout=120), BatchDone)
    return logits[0]


def test_after_rejections_with_windows_in_flight_the_caches_match_a_synchronous_run(
        ring: BuiltRing, tokenizer: Tokenizer, plain: dict[str, Generation],
        record_property: RecordProperty) -> None:
    prompt = chat(tokenizer, CODE_PROMPTS[0])
    reference = plain[CODE_PROMPTS[0]].tokens
    drafts = PositionScramble(reference, len(prompt), tokenizer.n_vocab)
    runs, logits = [], []
    for depth in (1, 2):
        slot: list[int] = []
        got = run(ring, tokenizer, prompt, drafts, GammaConfig(fixed=3, depth=depth),
                  keep=slot)
        runs.append(got)
        assert len(slot) == 1
        logits.append(next_logits(ring, slot[0], [*prompt, *got.tokens[:-1]]))
    sync, ahead = runs
    record_property("stats", ahead.stats.as_dict())
    assert sync.stats.ahead_windows == 0 and sync.stats.stale_windows == 0
    assert ahead.stats.stale_windows >= 5  # rejections with a window behind them
    # Early cancellation: the last worker broke each of those chains itself and skipped
    # every stale window (it never computed them; the caches still match below).
    assert ahead.stats.skipped_windows == ahead.stats.stale_windows
    # The same windows were judged, so the same tokens (not only up to near ties) …
    assert ahead.tokens == sync.tokens
    assert ahead.stats.steps == sync.stats.steps
    # … and every stage holds the same K/V: the next token's logits agree.
    assert int(np.argmax(logits[0])) == int(np.argmax(logits[1]))
    assert float(np.max(np.abs(logits[0] - logits[1]))) < 1e-3


# --- sampling: a link is judged exactly ----------------------------------------------

def first_two_with_link(n_guesses: int, n: int = N_DRAWS) -> np.ndarray:
    """The first two tokens of n generations whose first window judges `n_guesses`
    guesses among its rows and a link after them (drawn from the draft, as the next
    window's first row), with QwQ-style sampling (temperature, min_p, presence)."""
    rng = np.random.default_rng(2025)
    counts = np.zeros((N_VOCAB, N_VOCAB), dtype=np.int64)
    for seed in range(n):
        guesses: list[int] = []
        dists = []
        for i in range(n_guesses + 1):
            q_row = Q_LOGITS if i == 0 else row_after(Q_LOGITS, guesses[-1])
            q = filtered_probs(transform(q_row, PARAMS, [*HISTORY, *guesses]), PARAMS)
            dists.append(q)
            guesses.append(sample(q, rng))
        rows = [P_LOGITS] + [row_after(P_LOGITS, g) for g in guesses[:n_guesses]]
        piece = Slice(0, len(HISTORY) - 1, [HISTORY[-1], *guesses[:n_guesses]], PARAMS,
                      n_guesses, dists, step_seed=seed, link=guesses[n_guesses])
        out = judge(piece, np.stack(rows), [*HISTORY, *guesses[:n_guesses]]).tokens
        if len(out) < 2:
            out = [*out, *judge(Slice(0, len(HISTORY), out, PARAMS, step_seed=seed + 1),
                                row_after(P_LOGITS, out[0])[None], [*HISTORY, *out]).tokens]
        counts[out[0], out[1]] += 1
    return counts


def target_two() -> np.ndarray:
    p0 = filtered_probs(transform(P_LOGITS, PARAMS, HISTORY), PARAMS).dense(N_VOCAB)
    joint = np.zeros((N_VOCAB, N_VOCAB))
    for t in np.flatnonzero(p0):
        p1 = filtered_probs(transform(row_after(P_LOGITS, int(t)), PARAMS,
                                      [*HISTORY, int(t)]), PARAMS).dense(N_VOCAB)
        joint[t] = p0[t] * p1
    return joint


@pytest.mark.parametrize("n_guesses", [0, 1])
def test_a_link_is_judged_with_the_rejection_rule(n_guesses: int) -> None:
    assert PARAMS.temperature == 0.8
    assert chi2_pvalue(first_two_with_link(n_guesses).ravel(), target_two().ravel()) > MIN_P


def test_the_chi2_test_catches_a_link_accepted_without_the_rule() -> None:
    """A last stage that takes the link as decided (no rejection rule) is caught."""
    rng = np.random.default_rng(5)
    counts = np.zeros((N_VOCAB, N_VOCAB), dtype=np.int64)
    for seed in range(5000):
        q = filtered_probs(transform(Q_LOGITS, PARAMS, HISTORY), PARAMS)
        link = sample(q, rng)
        second = judge(Slice(0, len(HISTORY), [link], PARAMS, step_seed=seed),
                       row_after(P_LOGITS, link)[None], [*HISTORY, link]).tokens[0]
        counts[link, second] += 1
    counts, want = counts.ravel(), target_two().ravel()
    assert counts[want == 0].sum() > 0 or chi2_pvalue(counts, want) < MIN_P


def test_seeded_sampling_with_run_ahead_repeats(ring: BuiltRing, drafter: DraftModel,
                                                tokenizer: Tokenizer) -> None:
    sampling = SamplingParams(temperature=0.8, seed=77)
    prompt = chat(tokenizer, CODE_PROMPTS[2])
    first, again = (run(ring, tokenizer, prompt, drafter, GammaConfig(fixed=3, depth=2),
                        32, sampling) for _ in range(2))
    assert first.stats.ahead_windows > 0
    assert again.tokens == first.tokens and len(first.tokens) == 32
