"""The scheduler's rules, on sequences in given states (no model needed)."""

from __future__ import annotations

import pytest

from cluster.llama.context import decode_passes
from coordinator.engine.request import GenerationRequest
from coordinator.engine.scheduler import Planned, SchedulerConfig, schedule
from coordinator.engine.sequence import Sequence

CPU = (0.085, 0.056)  # a, b seconds: every row costs (this 2-core machine, 2 workers)
GPU = (0.017, 0.0002)  # a call reads the weights, a row costs almost nothing


def seq(slot: int, prompt: int, generated: int = 0, arrived: float = 0.0) -> Sequence:
    s = Sequence(GenerationRequest(list(range(1, prompt + 1)), 64), lambda _e: None,
                 None)  # type: ignore[arg-type]  # the output is not used here
    s.slot, s.arrived = slot, arrived
    if generated:  # decoding: all but the last decided token are in the caches
        s.tokens += [7] * generated
        s.n_computed = s.n_sent = len(s.tokens) - 1
    return s


def no_draft(_seq: Sequence, _room: int, _at_least: int) -> int:
    return 0


def shapes(plan: list[Planned]) -> list[tuple[int, int, int]]:
    return [(p.seq.slot, p.n_tokens, p.gamma) for p in plan]


def test_a_lone_prompt_goes_in_prefill_chunks():
    prompt = seq(0, 600)
    config = SchedulerConfig(prefill_chunk=256, micro_batches=2, row_cost=CPU)
    first = schedule([prompt], config, no_draft)
    assert shapes(first) == [(0, 256, 0)] and not first[0].judge
    prompt.n_sent = 256  # in flight: the next chunk goes right behind it
    assert shapes(schedule([prompt], config, no_draft)) == [(0, 256, 0)]
    prompt.n_sent = 512
    last = schedule([prompt], config, no_draft)
    assert shapes(last) == [(0, 88, 0)] and last[0].judge


def test_decoding_sequences_split_over_the_micro_batches_by_slot():
    running = [seq(i, 10, generated=1) for i in (5, 0, 3, 1, 7, 2, 6, 4)]
    plan = schedule(running, SchedulerConfig(micro_batches=2), no_draft)
    assert shapes(plan) == [(i, 1, 0) for i in range(4)]
    for s in running[:1] + running[2:4] + running[5:6]:  # slots 5, 3, 1, 2 … in flight
        s.flying = 1
    # One lane at a time, the one with the most ready: slots 4, 6, 7 (slot 0 waits for
    # 1, 2, 3); a batch of 0, 4, 6, 7 would be three passes over the weights.
    config = SchedulerConfig(micro_batches=2)
    assert [p.seq.slot for p in schedule(running, config, no_draft)] == [4, 6, 7]
    for s in running:  # 4, 6, 7 in flight, the rest back: lane 0 goes whole
        s.flying = int(s.slot in (4, 6, 7))
    assert [p.seq.slot for p in schedule(running, config, no_draft)] == [0, 1, 2, 3]


def test_sequences_that_began_decoding_in_turn_come_together_by_slot():
    """Streams starting one after another alternate between the micro-batches (0, 2, 4,
    6 and 1, 3, 5, 7): the lanes bring consecutive slots together within a round."""
    running = [seq(i, 10, generated=1) for i in range(8)]
    config = SchedulerConfig(micro_batches=2)
    for s in running:
        s.flying = s.slot % 2  # the odd ones in flight, the even ones back
    first = [p.seq.slot for p in schedule(running, config, no_draft)]
    assert first == [0, 2]  # lane 0's ready ones; 4 and 6 wait for 5 and 7
    for s in running:
        s.flying = int(s.slot in first)
    assert [p.seq.slot for p in schedule(running, config, no_draft)] == [4, 5, 6, 7]
    for s in running:
        s.flying = int(s.slot >= 4)
    assert [p.seq.slot for p in schedule(running, config, no_draft)] == [0, 1, 2, 3]


@pytest.mark.parametrize("cost, stall, most", [(CPU, 2.0, 2), (GPU, 2.0, 2), (GPU, 3.0, 89),
                                               (CPU, 1.5, 1), (GPU, 1.5, 1)])
def test_a_prompt_rides_with_decode_rows_as_far_as_the_streams_can_wait(cost, stall, most):
    """Prompt rows are a call of their own (another read of the weights on a GPU): a
    batch with them lasts at most max_stall decode-only batches — or, when even one
    row would break that, it carries one row: a prompt is never starved."""
    streams = [seq(i, 10, generated=3) for i in range(4)]
    prompt = seq(4, 2048)
    config = SchedulerConfig(prefill_chunk=256, micro_batches=2, row_cost=cost,
                             max_stall=stall)
    plan = schedule([*streams, prompt], config, no_draft)
    assert shapes(plan) == [(0, 1, 0), (1, 1, 0), (4, most, 0)]
    if most > 1:
        assert config.cost([p.rows for p in plan]) <= stall * config.cost([1, 1])


def test_without_costs_rows_alone_bound_a_mixed_batch():
    streams = [seq(i, 10, generated=3) for i in range(2)]
    config = SchedulerConfig(max_batch_tokens=40, prefill_chunk=256, micro_batches=1)
    plan = schedule([*streams, seq(2, 500)], config, no_draft)
    assert sum(p.rows for p in plan) == 40


def test_guesses_even_out_the_rows_where_calls_cost_more_than_rows():
    streams = [seq(i, 10, generated=3) for i in range(3)]
    wanted = {0: 4, 1: 1, 2: 0}

    def gamma_of(s: Sequence, room: int, at_least: int) -> int:
        return min(max(wanted[s.slot], at_least), room)

    gpu = schedule(streams, SchedulerConfig(row_cost=GPU), gamma_of)
    assert [p.rows for p in gpu] == [5, 5, 5]  # one call instead of three
    cpu = schedule(streams, SchedulerConfig(row_cost=CPU), gamma_of)
    assert [p.gamma for p in cpu] == [4, 1, 0]  # extra rows would cost more


def test_a_sequence_waiting_for_its_verdict_is_not_scheduled():
    s = seq(0, 10, generated=2)
    s.flying = 1
    assert schedule([s], SchedulerConfig(), no_draft) == []


def running_ahead(slot: int, depth: int = 2) -> Sequence:
    """A decoding sequence with one window in flight that ends with a link."""
    s = seq(slot, 10, generated=2)
    s.depth, s.flying, s.linked, s.ahead = depth, 1, True, [5, 6, 9]
    return s


def test_a_stream_alone_runs_ahead_of_its_verdict_from_the_link():
    s = running_ahead(0)
    plan = schedule([s], SchedulerConfig(micro_batches=2), lambda *_: 3)
    assert [(p.ahead, p.n_tokens, p.gamma, p.judge) for p in plan] == [(True, 1, 3, True)]
    assert s.front == len(s.tokens) + 2  # the next window starts at the link (9)
    s.flying = 2  # as deep as it may go
    assert schedule([s], SchedulerConfig(micro_batches=2), lambda *_: 3) == []


def test_a_first_window_carries_a_link_only_where_a_window_may_follow_it():
    alone = seq(0, 10, generated=2)
    alone.depth = 2
    assert [p.link for p in schedule([alone], SchedulerConfig(micro_batches=2),
                                     lambda *_: 3)] == [True]
    pair = [seq(0, 10, generated=2), seq(1, 10, generated=2)]
    for s in pair:
        s.depth = 2
    full = schedule(pair, SchedulerConfig(micro_batches=2), lambda *_: 3)
    assert full and not any(p.link for p in full)  # the ring is full: a link is wasted
    alone.depth = 1
    assert not schedule([alone], SchedulerConfig(micro_batches=2), lambda *_: 3)[0].link


def test_nobody_runs_ahead_when_the_streams_fill_the_ring_or_no_room_is_left():
    pair = [running_ahead(0), running_ahead(1)]
    assert schedule(pair, SchedulerConfig(micro_batches=2), lambda *_: 3) == []
    assert len(schedule(pair, SchedulerConfig(micro_batches=3), lambda *_: 3)) == 1
    assert schedule([running_ahead(0)], SchedulerConfig(micro_batches=2),
                    lambda *_: -1) == []  # max_tokens or the context: no room
    unlinked = running_ahead(0)
    unlinked.linked = False  # its last window drew a bonus token: wait for it
    assert schedule([unlinked], SchedulerConfig(micro_batches=2), lambda *_: 3) == []


def test_prompts_arriving_beside_few_streams_fill_the_batch_they_will_make():
    """The stall bound is the batch the stream will make with the short prompts arriving
    beside it (8 over 2 micro-batches: 4 decode rows), and prompts that finish in the
    batch may stretch it to FINISHING × max_stall: they get 2a + 15b of rows, where a
    bound by the stream's own 1-row batch left them one row; a long prompt beside the
    stream (many chunks from its first token) still gets one."""
    stream = seq(0, 10, generated=3)
    prompts = [seq(i, 100, arrived=float(i)) for i in range(1, 8)]
    config = SchedulerConfig(micro_batches=2, row_cost=CPU)
    plan = schedule([stream, *prompts], config, no_draft)
    assert shapes(plan)[0] == (0, 1, 0)
    a, b = CPU
    # 4 × (a + 4b) − (a + b) − a = 2a + 15b
    assert sum(p.rows for p in plan[1:]) == int((2 * a + 15 * b) / b + 1e-9) == 18
    assert config.cost([p.rows for p in plan]) <= 4 * config.cost([1] * 4) + 1e-9
    assert config.cost([p.rows for p in plan]) > 2 * config.cost([1] * 4)
    lone = schedule([stream, seq(1, 2048)], config, no_draft)
    assert shapes(lone) == [(0, 1, 0), (1, 1, 0)]
    # its last chunk finishes in the batch: 4 × (a + b) − (a + b) − a = 2a + 3b, not b
    last = seq(1, 2048)
    last.n_sent = last.n_computed = 2048 - 200
    assert shapes(schedule([stream, last], config, no_draft)) == [(0, 1, 0), (1, 6, 0)]


def test_decode_passes_count_runs_of_consecutive_slots_per_row_count():
    """llama.cpp's ubatches for one KV stream per slot: a run of consecutive slots with
    one row count is one pass over the weights (bench/slot_runs.py measures them)."""
    assert decode_passes([1] * 4, [0, 1, 2, 3], 512) == 1
    assert decode_passes([1] * 4, [0, 2, 4, 6], 512) == 4
    assert decode_passes([1] * 4, [5, 4, 0, 1], 512) == 2  # 0-1 and 4-5
    assert decode_passes([1, 1, 5], [0, 1, 2], 512) == 2  # slot 2's window: a call of its own
    assert decode_passes([5, 5], [3, 4], 8) == 2  # n_batch 8: 5 + 5 rows are two calls
