"""Shared prefixes: a prompt prefix another slot holds — a running conversation's system
prompt, or an idle slot's cache — is copied on every stage (llama.cpp's memory seq_cp)
instead of computed again (docs/scheduler.md, "Shared prefixes")."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cluster.sampling import SamplingParams
from coordinator.engine.core import State
from coordinator.engine.frontend import Engine, Generation
from coordinator.engine.request import GenerationRequest
from coordinator.ring.builder import build_ring
from coordinator.service import EngineOptions, start_engine
from coordinator.speculation.draft import DraftConfig, DraftModel
from coordinator.speculation.drafting import DraftRequest, common_prefix, draft_rng
from coordinator.speculation.gamma import FREE_DRAFT
from coordinator.tokenizer import Tokenizer
from tests.near_ties import same_but_at_near_ties

SYSTEM = ("You are a careful assistant for a Python code base. Answer briefly, with code "
          "when it helps, and name the standard library modules you use. " * 5)


def prompt(engine: Engine, question: str) -> list[int]:
    tok = engine.tokenizer
    return tok.encode(tok.chat_prompt([{"role": "system", "content": SYSTEM},
                                       {"role": "user", "content": question}]))


def counter(engine: Engine, name: str) -> float:
    for line in engine.metrics.render().decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in the metrics")


def generate(engine: Engine, tokens: list[int], n: int = 16, cache: bool = True
             ) -> Generation:
    return engine.generate(GenerationRequest(tokens, n, ignore_eos=True, with_gaps=True,
                                             cache_prompt=cache))


@pytest.fixture
def engine(tiny_chat_model: Path) -> Iterator[Engine]:
    # Chunks of 32: a 200-token prompt is sent in several batches, so a request that
    # arrives with it waits for the part it can copy.
    built = build_ring(tiny_chat_model, stages=2, ctx=1024, parallel=3, threads=1)
    engine = start_engine(built, Tokenizer(tiny_chat_model), "tiny", costs=FREE_DRAFT,
                          options=EngineOptions(prefill_chunk=32))
    try:
        yield engine
    finally:
        engine.close()
        built.close()


def test_prompts_that_arrive_together_compute_their_shared_prefix_once(engine: Engine
                                                                        ) -> None:
    asks = [prompt(engine, q) for q in ("What is a list?", "What is a dict?",
                                        "What is a set?")]
    shared = common_prefix(asks[0], asks[1])
    assert shared > 150  # the system prompt: several chunks
    copied0 = counter(engine, "specshard_prompt_tokens_copied_total")
    computed0 = counter(engine, "specshard_prompt_tokens_computed_total")
    got: list[Generation | None] = [None] * 3

    def run(i: int) -> None:
        got[i] = generate(engine, asks[i], cache=True)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    results = [g for g in got if g is not None]
    assert len(results) == 3
    cached = sorted(g.stats.n_cached_tokens for g in results)
    # One computes the system prompt; the others wait for it and copy it.
    assert cached[0] == 0 and cached[1] == cached[2] == shared, cached
    computed = counter(engine, "specshard_prompt_tokens_computed_total") - computed0
    assert computed == sum(len(p) for p in asks) - sum(cached)
    copied = counter(engine, "specshard_prompt_tokens_copied_total") - copied0
    assert copied == cached[1] + cached[2]
    cold = [generate(engine, p, cache=False) for p in asks]
    for g, c in zip(got, cold, strict=True):
        assert g is not None
        same_but_at_near_ties(g, c)
    print(f"cached {cached}, copied {copied:.0f}")


def test_a_running_conversations_system_prompt_is_copied_into_an_empty_slot(
        tiny_chat_model: Path) -> None:
    built = build_ring(tiny_chat_model, stages=2, ctx=1024, parallel=2, threads=1)
    engine = start_engine(built, Tokenizer(tiny_chat_model), "tiny", costs=FREE_DRAFT,
                          options=EngineOptions(prefill_chunk=32))
    try:
        a, b = prompt(engine, "What is a list?"), prompt(engine, "Explain generators.")
        shared = common_prefix(a, b)
        started = threading.Event()
        long_run: list[Generation] = []

        def first() -> None:
            request = GenerationRequest(a, 200, ignore_eos=True)
            long_run.append(engine.generate(request, lambda _text: started.set()))

        t = threading.Thread(target=first)
        t.start()
        assert started.wait(120)  # A decodes in slot 0: B gets the empty slot
        copied0 = counter(engine, "specshard_prompt_tokens_copied_total")
        warm = generate(engine, b)
        assert warm.stats.n_cached_tokens == shared
        assert counter(engine, "specshard_prompt_tokens_copied_total") - copied0 == shared
        t.join(120)
        assert long_run and len(long_run[0].tokens) == 200
        # The copy is the prefix as B's own computation would leave it: the same answer.
        cold = generate(engine, b, cache=False)
        assert cold.stats.n_cached_tokens == 0
        same_but_at_near_ties(warm, cold)
    finally:
        engine.close()
        built.close()


def test_an_idle_slots_system_prompt_is_copied_and_the_slot_stays_warm(
        tiny_chat_model: Path) -> None:
    built = build_ring(tiny_chat_model, stages=2, ctx=1024, parallel=2, threads=1)
    engine = start_engine(built, Tokenizer(tiny_chat_model), "tiny", costs=FREE_DRAFT)
    try:
        # A long first question: B shares under half of what A's slot holds, so B takes
        # the empty slot (A's stays warm for A's next turn) and copies the system prompt.
        a = prompt(engine, "Review this code and say what it does: " + "x = x + 1; " * 60)
        b = prompt(engine, "What is a tuple?")
        first = generate(engine, a)
        shared = common_prefix(a, b)
        assert 2 * shared < len(a) + len(first.tokens)
        second = generate(engine, b)
        assert second.stats.n_cached_tokens == shared
        again = generate(engine, a)
        assert again.stats.n_cached_tokens == len(a) - 1  # A's slot was not taken
        off = generate(engine, b + [b[-1]], cache=False)
        assert off.stats.n_cached_tokens == 0
    finally:
        engine.close()
        built.close()


def test_the_draft_model_copies_a_prefix_another_slot_holds(demo_draft: Path) -> None:
    """The draft's caches: a slot that copies another's prefix proposes what a slot that
    computed it would (same guesses, the same distributions)."""
    tok = Tokenizer(demo_draft)
    context = tok.encode(SYSTEM + " Now write a function that reverses a list.")
    other = tok.encode(SYSTEM + " Now write a class for a stack.")
    greedy = SamplingParams()

    def ask(seq: int, tokens: list[int]) -> DraftRequest:
        return DraftRequest(seq, tokens, 4, greedy, draft_rng(0))

    copying = DraftModel(DraftConfig(demo_draft, n_ctx=512, n_seq_max=2))
    fresh = DraftModel(DraftConfig(demo_draft, n_ctx=512, n_seq_max=2))
    try:
        copying.propose([ask(0, other)])
        got = copying.propose([ask(1, context)])[0]
        shared = common_prefix(other, context)
        assert copying.copied == shared and fresh.copied == 0
        assert copying.decoded[1][:shared] == context[:shared]
        want = fresh.propose([ask(1, context)])[0]
        assert got.tokens == want.tokens
        for g, w in zip(got.dists, want.dists, strict=True):
            assert np.array_equal(g.ids, w.ids)
            np.testing.assert_allclose(g.probs, w.probs, atol=2e-3)
    finally:
        copying.close()
        fresh.close()


def test_a_worker_killed_after_a_copy_replays_the_prefix_from_its_tokens(
        tiny_chat_model: Path) -> None:
    """A rebuilt ring's slots are empty: the copied prefix is replayed from its tokens,
    not copied again from a slot that no longer holds it (a replayed copy was refused and
    the ring rebuilt until recovery gave up)."""
    from coordinator.placement.local import LocalWorkers

    workers = LocalWorkers(2).start()
    built = build_ring(tiny_chat_model, workers=workers, ctx=1024, parallel=2, threads=1)
    engine = start_engine(built, Tokenizer(tiny_chat_model), "tiny", costs=FREE_DRAFT)
    try:
        # A long first question: b shares under half of what a's slot holds, so b takes
        # the empty slot and copies the system prompt from a's.
        a = prompt(engine, "Review this code and say what it does: " + "x = x + 1; " * 60)
        b = prompt(engine, "Explain generators.")
        generate(engine, a)
        copied0 = counter(engine, "specshard_prompt_tokens_copied_total")
        seen = threading.Event()
        got: list[Generation] = []

        def run() -> None:
            request = GenerationRequest(b, 64, ignore_eos=True, with_gaps=True)
            got.append(engine.generate(request, lambda _text: seen.set()))

        t = threading.Thread(target=run)
        t.start()
        assert seen.wait(120)
        workers.procs[1].kill()
        t.join(300)
        assert got, "the request did not finish"
        assert got[0].stats.n_cached_tokens == common_prefix(a, b)  # it copied
        assert counter(engine, "specshard_prompt_tokens_copied_total") - copied0 == \
            common_prefix(a, b)
        assert engine.core.epoch >= 1 and engine.core.state is State.RUNNING
        cold = generate(engine, b, n=64, cache=False)
        same_but_at_near_ties(got[0], cold)
    finally:
        engine.close()
        built.close()


def test_with_sharing_off_the_prefix_is_computed(tiny_chat_model: Path) -> None:
    """`serve --no-share-prefix`: the same requests as above, nothing copied."""
    built = build_ring(tiny_chat_model, stages=2, ctx=1024, parallel=2, threads=1)
    engine = start_engine(built, Tokenizer(tiny_chat_model), "tiny", costs=FREE_DRAFT,
                          options=EngineOptions(share_prefix=False))
    try:
        a = prompt(engine, "Review this code and say what it does: " + "x = x + 1; " * 60)
        generate(engine, a)
        second = generate(engine, prompt(engine, "What is a tuple?"))
        assert second.stats.n_cached_tokens == 0
        assert counter(engine, "specshard_prompt_tokens_copied_total") == 0
    finally:
        engine.close()
        built.close()
