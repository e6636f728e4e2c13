"""Slots that remember: a finished sequence's caches stay on every stage, and the next
request that starts with the same tokens computes only the rest (docs/scheduler.md,
"Prompt reuse")."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster.stage_cut import split_at
from coordinator.engine.core import State
from coordinator.engine.frontend import Engine, Generation
from coordinator.engine.request import GenerationRequest
from coordinator.engine.sequence import Sequence
from coordinator.ring.builder import build_ring
from coordinator.service import EngineOptions, start_engine
from coordinator.speculation.drafting import common_prefix
from coordinator.speculation.gamma import FREE_DRAFT
from coordinator.tokenizer import Tokenizer
from tests.near_ties import same_but_at_near_ties

SYSTEM = ("You are a careful assistant for a Python code base. Answer briefly, with code "
          "when it helps. " * 6)


@pytest.fixture(scope="module")
def tiny_engine(tiny_chat_model: Path) -> Iterator[Engine]:
    built = build_ring(tiny_chat_model, stages=2, ctx=1024, parallel=2, threads=1)
    engine = start_engine(built, Tokenizer(tiny_chat_model), "tiny", costs=FREE_DRAFT)
    try:
        yield engine
    finally:
        engine.close()
        built.close()


def chat(engine: Engine, turns: list[str], answers: list[list[int]]) -> list[int]:
    """The prompt of the conversation so far: the system prompt, the user turns and the
    answers given, as a chat client resends it every turn."""
    tok = engine.tokenizer
    messages = [{"role": "system", "content": SYSTEM}]
    for i, turn in enumerate(turns):
        messages.append({"role": "user", "content": turn})
        if i < len(answers):
            messages.append({"role": "assistant", "content": tok.decode(answers[i])})
    return tok.encode(tok.chat_prompt(messages))


def counter(engine: Engine, name: str) -> float:
    for line in engine.metrics.render().decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in the metrics")


def generate(engine: Engine, prompt: list[int], n: int = 12, cache: bool = True
             ) -> Generation:
    return engine.generate(GenerationRequest(prompt, n, ignore_eos=True, with_gaps=True,
                                             cache_prompt=cache))


def started(engine: Engine, request: GenerationRequest, timeout: float = 120) -> Sequence:
    """Submit `request` and return once its first event (a token) came."""
    events: list[object] = []
    seq = engine.submit(request, events.append)
    deadline = time.monotonic() + timeout
    while not events:
        assert time.monotonic() < deadline, "no first token"
        time.sleep(0.005)
    return seq


def test_the_next_turn_computes_only_its_new_tokens(tiny_engine: Engine) -> None:
    first_prompt = chat(tiny_engine, ["What is a list?"], [])
    first = generate(tiny_engine, first_prompt)
    assert first.stats.n_cached_tokens == 0
    second_prompt = chat(tiny_engine, ["What is a list?", "And a dict?"], [first.tokens])
    shared = common_prefix(first_prompt + first.tokens, second_prompt)
    computed = counter(tiny_engine, "specshard_prompt_tokens_computed_total")
    second = generate(tiny_engine, second_prompt)
    # Every shared token the caches hold (all but the last answer token, never computed).
    assert second.stats.n_cached_tokens == min(shared, len(first_prompt) + 12 - 1)
    assert second.stats.n_cached_tokens > len(first_prompt) - 1
    assert counter(tiny_engine, "specshard_prompt_tokens_computed_total") - computed == \
        len(second_prompt) - second.stats.n_cached_tokens
    cold = generate(tiny_engine, second_prompt, cache=False)
    assert cold.stats.n_cached_tokens == 0


def test_a_warm_slot_is_not_evicted_while_an_empty_one_is_free(tiny_chat_model: Path
                                                                ) -> None:
    built = build_ring(tiny_chat_model, stages=1, ctx=1024, parallel=2, threads=1)
    engine = start_engine(built, Tokenizer(tiny_chat_model), "tiny", costs=FREE_DRAFT)
    try:
        a = chat(engine, ["Tell me about sets."], [])
        generate(engine, a)  # one slot warm, the other empty
        generate(engine, engine.tokenizer.encode("Something else entirely, " * 5))
        again = generate(engine, a)  # the empty slot was taken, not this one
        assert again.stats.n_cached_tokens == len(a) - 1
        assert len(engine.core.cached) == 2
    finally:
        engine.close()
        built.close()


def test_a_request_takes_the_lowest_empty_slot(tiny_chat_model: Path) -> None:
    """Without prompt caching every finished slot is empty again: the next request takes
    the lowest one (decoding sequences in consecutive slots share a pass over a stage's
    weights), not the least recently used."""
    built = build_ring(tiny_chat_model, stages=1, ctx=1024, parallel=3, threads=1)
    engine = start_engine(built, Tokenizer(tiny_chat_model), "tiny", costs=FREE_DRAFT,
                          options=EngineOptions(cache_prompt=False))
    try:
        for question in ("Tell me about sets.", "And lists?", "And dicts?"):
            generate(engine, chat(engine, [question], []))
        assert list(engine.core._used) == [0] and not engine.core.cached
    finally:
        engine.close()
        built.close()


def test_a_returning_conversation_decodes_next_to_the_running_one(tiny_chat_model: Path
                                                                   ) -> None:
    """Slots 0-2 hold idle conversations A, B, D; C decodes in slot 3. A's next turn
    reuses A's cache but decodes in slot 2, next to C (one pass over a stage's weights
    for both, not two): D's cache moves to slot 1 (B's, the least recently used) and A's
    prefix is copied from slot 0, in one batch, on both stages. Every answer is the
    cold one but at near ties, and D's next turn still finds its cache. Over gRPC: the
    move is a slice without tokens that copies."""
    from coordinator.placement.local import LocalWorkers

    tokenizer = Tokenizer(tiny_chat_model)
    workers = LocalWorkers(2).start()
    try:
        built = build_ring(tiny_chat_model, workers=workers, ctx=1024, parallel=4,
                           threads=1, split=split_at(4, [2]))
    except BaseException:
        workers.stop()
        raise
    engine = start_engine(built, tokenizer, "tiny", costs=FREE_DRAFT)
    core = engine.core
    try:
        a, b, d, c = (tokenizer.encode(text * 12) for text in (
            "Tell me about sets. ", "Lists are ordered? ", "Dicts map keys. ",
            "A long story: "))
        first = {name: generate(engine, p) for name, p in (("a", a), ("b", b), ("d", d))}
        assert sorted(core.cached) == [0, 1, 2]
        long_run = started(engine, GenerationRequest(c, 600, ignore_eos=True))
        assert core.running.get(3) is long_run
        moves = counter(engine, "specshard_cache_moves_total")
        a2 = a + first["a"].tokens + tokenizer.encode(" And frozensets?")
        held_a = len(a) + 12 - 1  # the last answer token was never computed
        turn = generate(engine, a2)
        assert not long_run.done  # A's turn decoded beside C throughout
        assert turn.stats.n_cached_tokens == held_a
        assert counter(engine, "specshard_cache_moves_total") - moves == 1
        assert core.cached[2][:len(a2)] == a2  # A's turn ran in slot 2
        assert core.cached[1] == d + first["d"].tokens[:11]  # D moved into B's slot
        assert not any(common_prefix(held, b) >= len(b) for held in core.cached.values())
        engine.cancel(long_run)
        again = generate(engine, d)
        assert again.stats.n_cached_tokens == len(d) - 1
        same_but_at_near_ties(again, first["d"])
        same_but_at_near_ties(turn, generate(engine, a2, cache=False))
    finally:
        engine.close()
        built.close()
        workers.stop()


def test_a_cache_in_the_way_moves_to_an_empty_slot_not_over_a_warm_one(
        tiny_chat_model: Path) -> None:
    """C decodes in slot 0 and A, done, is idle in slot 1, next to it; slots 2 and 3 are
    empty. A new request D decodes in slot 1, next to C: A's cache moves to the empty
    slot 2 (not evicted), and A's next request still finds it."""
    tokenizer = Tokenizer(tiny_chat_model)
    built = build_ring(tiny_chat_model, stages=2, ctx=1024, parallel=4, threads=1)
    engine = start_engine(built, tokenizer, "tiny", costs=FREE_DRAFT)
    core = engine.core
    try:
        a, d, c = (tokenizer.encode(text * 12) for text in (
            "Tell me about sets. ", "Dicts map keys. ", "A long story: "))
        long_run = started(engine, GenerationRequest(c, 600, ignore_eos=True,
                                                     cache_prompt=False))
        assert core.running.get(0) is long_run
        first_a = generate(engine, a)
        assert list(core.cached) == [1]
        moves = counter(engine, "specshard_cache_moves_total")
        first_d = generate(engine, d)
        assert not long_run.done  # D decoded beside C throughout
        assert counter(engine, "specshard_cache_moves_total") - moves == 1
        assert core.cached == {1: d + first_d.tokens[:11], 2: a + first_a.tokens[:11]}
        engine.cancel(long_run)
        again = generate(engine, a)
        assert again.stats.n_cached_tokens == len(a) - 1
        same_but_at_near_ties(again, first_a)
    finally:
        engine.close()
        built.close()


def test_reused_prefix_gives_the_cold_answer_but_at_near_ties(demo_target: Path) -> None:
    """The same cache state gives the same answer; a reused prefix (computed in other
    batches) may move a greedy token only at a near tie of the cold run."""
    built = build_ring(demo_target, stages=1, ctx=1024, parallel=2, threads=2)
    engine = start_engine(built, Tokenizer(demo_target), "demo", costs=FREE_DRAFT,
                          options=EngineOptions(prefill_chunk=64))
    try:
        first = generate(engine, chat(engine, ["Write a Python function that adds two "
                                               "numbers."], []), n=24)
        prompt = chat(engine, ["Write a Python function that adds two numbers.",
                               "Now make it add three."], [first.tokens])
        warm = generate(engine, prompt, n=24)
        cold = generate(engine, prompt, n=24, cache=False)
        assert warm.stats.n_cached_tokens > 50 and cold.stats.n_cached_tokens == 0
        at = same_but_at_near_ties(warm, cold)
        print(f"warm and cold agree on {at if at is not None else len(cold.tokens)} tokens")
    finally:
        engine.close()
        built.close()


def test_a_worker_killed_between_turns_drops_the_cache_and_the_turn_is_right(
        demo_target: Path) -> None:
    from coordinator.placement.local import LocalWorkers

    tokenizer = Tokenizer(demo_target)
    workers = LocalWorkers(2).start()
    built = build_ring(demo_target, workers=workers, ctx=1024, parallel=2, threads=1,
                       split=split_at(28, [14]))
    engine = start_engine(built, tokenizer, "demo", costs=FREE_DRAFT)
    try:
        first = generate(engine, chat(engine, ["Name a sorting algorithm."], []), n=16)
        prompt = chat(engine, ["Name a sorting algorithm.", "Why that one?"],
                      [first.tokens])
        cold = generate(engine, prompt, n=16, cache=False)
        generate(engine, chat(engine, ["Name a sorting algorithm."], []), n=16)
        assert engine.core.cached
        pid = workers.pids()[1]
        assert pid is not None
        workers.procs[1].kill()
        workers.procs[1].wait()
        deadline = time.monotonic() + 120  # the watcher notices, the ring is rebuilt
        while engine.core.epoch == 0 or engine.core.state is not State.RUNNING:
            assert time.monotonic() < deadline, "the ring was not rebuilt"
            time.sleep(0.2)
        assert not engine.core.cached  # the idle slots' caches went with the ring
        after = generate(engine, prompt, n=16)
        assert after.stats.n_cached_tokens == 0
        assert after.tokens == cold.tokens  # the cold path, computed the same way
    finally:
        engine.close()
        built.close()


def test_over_http_turn_two_reports_its_cached_tokens(tiny_chat_model: Path) -> None:
    """The real openai client, as a chat client sends a conversation: usage's
    `prompt_tokens_details.cached_tokens` and /metrics say turn 2 computed only its new
    tokens; `cache_prompt: false` computes them all."""
    import httpx

    from coordinator.api.templates import ChatOptions
    from tests.chat_server import chat_server

    with chat_server(tiny_chat_model, ChatOptions()) as server:
        client = server.client()
        messages = [{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": "What is a list?"}]
        first = client.chat.completions.create(model="", messages=messages,  # type: ignore[arg-type]
                                               max_tokens=8, temperature=0)
        assert first.usage is not None and first.usage.prompt_tokens_details is not None
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        messages += [{"role": "assistant", "content": first.choices[0].message.content or ""},
                     {"role": "user", "content": "And a dict?"}]

        def computed() -> float:
            text = httpx.get(server.url + "/metrics", timeout=30).text
            return next(float(line.split()[-1]) for line in text.splitlines()
                        if line.startswith("specshard_prompt_tokens_computed_total "))

        before = computed()
        second = client.chat.completions.create(model="", messages=messages,  # type: ignore[arg-type]
                                                max_tokens=8, temperature=0)
        assert second.usage is not None and second.usage.prompt_tokens_details is not None
        cached = second.usage.prompt_tokens_details.cached_tokens
        assert cached >= first.usage.prompt_tokens - 1
        assert computed() - before == second.usage.prompt_tokens - cached
        cold = client.chat.completions.create(model="", messages=messages,  # type: ignore[arg-type]
                                              max_tokens=8, temperature=0,
                                              extra_body={"cache_prompt": False})
        assert cold.usage is not None and cold.usage.prompt_tokens_details is not None
        assert cold.usage.prompt_tokens_details.cached_tokens == 0


def histogram(engine: Engine, name: str) -> tuple[float, float]:
    total = count = 0.0
    for line in engine.metrics.render().decode().splitlines():
        if line.startswith(name + "_sum "):
            total = float(line.split()[-1])
        elif line.startswith(name + "_count "):
            count = float(line.split()[-1])
    return total, count


def test_staggered_requests_decode_together(tiny_chat_model: Path) -> None:
    """Eight requests arriving one after another (as HTTP clients send them) all decode
    together: over the phase where all eight decode, a micro-batch carries ≥ 0.9 × 8 ÷ 2
    decode rows (2 micro-batches in flight over 2 workers), of consecutive slots — one
    pass over a stage's weights, where streams that began in turn used to alternate
    between the micro-batches (slots 0, 2, 4, 6: four passes)."""
    from coordinator.placement.local import LocalWorkers

    tokenizer = Tokenizer(tiny_chat_model)
    with LocalWorkers(2) as workers:
        built = build_ring(tiny_chat_model, workers=workers, ctx=1024, parallel=8,
                           threads=1, split=split_at(4, [2]))
        engine = start_engine(built, tokenizer, "tiny", costs=FREE_DRAFT)
        counts = [0] * 8
        try:
            assert engine.core.config.micro_batches == 2
            for i in range(8):
                prompt = tokenizer.encode(f"Question {i}: " + "why? " * (8 + 4 * i))

                def count(event: object, i: int = i) -> None:
                    counts[i] += len(getattr(event, "token_ids", []))

                engine.submit(GenerationRequest(prompt, 400, ignore_eos=True), count)
                time.sleep(0.05)
            deadline = time.monotonic() + 120
            while min(counts) < 1:
                assert time.monotonic() < deadline
                time.sleep(0.005)
            start = histogram(engine, "specshard_batch_decode_rows")
            passes0 = histogram(engine, "specshard_batch_decode_passes")
            while min(counts) < 150:
                assert time.monotonic() < deadline
                time.sleep(0.005)
            end = histogram(engine, "specshard_batch_decode_rows")
            passes1 = histogram(engine, "specshard_batch_decode_passes")
            assert max(counts) < 400  # all eight were decoding throughout
            rows = (end[0] - start[0]) / (end[1] - start[1])
            assert rows >= 0.9 * 8 / 2, rows
            passes = (passes1[0] - passes0[0]) / (passes1[1] - passes0[1])
            assert passes <= 1.1, passes
        finally:
            engine.drain(0)
            engine.close()
            built.close()


class GatedRebuild:
    """Rebuilds an in-process ring (empty caches), once the test lets it."""

    def __init__(self, model: Path, ring: object) -> None:
        self.model, self.rings, self.gate = model, [ring], threading.Event()

    def rebuild(self, sink: Any) -> Any:
        from coordinator.ring.local_ring import LocalRing

        assert self.gate.wait(120)
        self.rings[-1].close()  # type: ignore[attr-defined]
        ring = LocalRing.load(self.model, split_at(4, [2]), n_ctx=1024, n_seq_max=2,
                              n_threads=1)
        ring.connect(sink)
        self.rings.append(ring)
        return ring


def test_a_sequence_ended_while_the_ring_is_rebuilt_leaves_no_cache(tiny_chat_model: Path
                                                                    ) -> None:
    """A rebuilt ring holds only what was replayed: a request cancelled during recovery
    must not leave its slot marked as holding its tokens (the soak test found a later
    request starting at position 24 of an empty cache)."""
    from coordinator.engine.core import EngineCore, FromRing
    from coordinator.engine.scheduler import SchedulerConfig
    from coordinator.ring.contract import RingLost

    tokenizer = Tokenizer(tiny_chat_model)
    built = build_ring(tiny_chat_model, ctx=1024, parallel=2, threads=1,
                       split=split_at(4, [2]))
    rebuild = GatedRebuild(tiny_chat_model, built.ring)
    core = EngineCore(built.ring, tokenizer, SchedulerConfig(micro_batches=2),
                      rebuilder=rebuild)
    engine = Engine(core, tokenizer, "tiny")
    prompt = tokenizer.encode("Tell me a long story about a ring of stages. " * 3)
    try:
        seq = started(engine, GenerationRequest(prompt, 500, ignore_eos=True))
        deadline = time.monotonic() + 60
        core.post(FromRing(core.epoch, RingLost("a worker vanished (test)")))
        while core.state is not State.RECOVERING:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        engine.cancel(seq)
        while not seq.done:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        rebuild.gate.set()
        while core.state is not State.RUNNING:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert core.cached == {}
        again = generate(engine, prompt)
        assert again.stats.n_cached_tokens == 0 and len(again.tokens) == 12
    finally:
        rebuild.gate.set()
        engine.close()
        rebuild.rings[-1].close()  # type: ignore[attr-defined]
