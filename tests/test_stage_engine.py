"""The stage engine on real llama.cpp: exactness across cuts, batches of several
sequences, validation, truncation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cluster.errors import InvalidForward
from cluster.llama.stage import Stage, StageConfig
from cluster.messages import Slice
from cluster.stage_cut import cut_stage

PROMPT = [3, 17, 42, 5, 88, 61, 9, 23, 70, 14]


def load(model: Path, begin: int, end: int, n_seq_max: int = 1, n_batch: int = 512) -> Stage:
    path = cut_stage(model, begin, end)
    return Stage(StageConfig(path, model if begin == 0 else None, n_ctx=64,
                             n_seq_max=n_seq_max, n_threads=1, n_batch=n_batch))


def every_row(seq: int, start: int, tokens: list[int]) -> Slice:
    """A slice whose every row is judged (n_draft = all but one): all its logits back."""
    return Slice(seq, start, tokens, n_draft=len(tokens) - 1)


def run(stages: list[Stage], slices: list[Slice]) -> list[np.ndarray]:
    out = stages[0].forward(slices)
    for stage in stages[1:]:
        assert isinstance(out, np.ndarray)
        out = stage.forward(slices, out)
    assert isinstance(out, list)
    return out


@pytest.mark.parametrize("tied", [False, True])
def test_two_stages_equal_one_bit_for_bit(tmp_path: Path, tied: bool):
    from tests.tiny_gguf import write_tiny_model

    model = write_tiny_model(tmp_path / "m.gguf", tied=tied)
    whole = run([load(model, 0, 4)], [every_row(0, 0, PROMPT)])[0]
    split = run([load(model, 0, 1), load(model, 1, 4)], [every_row(0, 0, PROMPT)])[0]
    assert whole.shape == (len(PROMPT), 96)
    assert np.abs(whole - split).max() == 0.0
    assert np.abs(whole).max() > 0  # real logits, not zeros


def test_hidden_states_have_one_row_per_token(tiny_model: Path):
    first = load(tiny_model, 0, 2)
    hidden = first.forward([Slice(0, 0, PROMPT)])
    assert isinstance(hidden, np.ndarray)
    assert hidden.shape == (len(PROMPT), 64) and hidden.dtype == np.float32
    assert first.length(0) == len(PROMPT)


def test_only_judged_rows_come_back(tiny_model: Path):
    stage = load(tiny_model, 0, 4, n_seq_max=2)
    chunk = Slice(0, 0, PROMPT, judge=False)
    step = Slice(1, 0, PROMPT[:4], n_draft=2)  # the last pending token and 2 guesses
    out = run([stage], [chunk, step])
    assert [len(rows) for rows in out] == [0, 3]


def test_truncate_then_recompute_gives_the_same_logits(tiny_model: Path):
    stage = load(tiny_model, 0, 4)
    before = run([stage], [every_row(0, 0, PROMPT)])[0]
    stage.truncate(0, 6)
    assert stage.length(0) == 6
    again = run([stage], [every_row(0, 6, PROMPT[6:])])[0]
    assert np.array_equal(before[6:], again)
    # a start before the end drops the rest first: the draft-rollback path
    redo = run([stage], [every_row(0, 8, PROMPT[8:])])[0]
    assert np.array_equal(before[8:], redo)


def test_sequences_are_independent(tiny_model: Path):
    stage = load(tiny_model, 0, 4, n_seq_max=2)
    alone = run([stage], [every_row(0, 0, PROMPT)])[0]
    run([stage], [every_row(1, 0, PROMPT[::-1])])
    stage.truncate(0, 0)
    assert np.array_equal(run([stage], [every_row(0, 0, PROMPT)])[0], alone)


@pytest.mark.parametrize("n_batch", [512, 4])
def test_a_batch_of_sequences_gives_each_its_own_rows(tiny_model: Path, n_batch: int):
    """Slices of unequal lengths, out of sequence order, split into pieces when n_batch
    is small: every row lands where it belongs (llama.cpp would reorder them)."""
    lengths = {2: 7, 0: 1, 3: 3, 1: 1}
    prompts = {seq: [(seq * 13 + i * 7) % 90 + 1 for i in range(n)]
               for seq, n in lengths.items()}
    solo_stages = [load(tiny_model, 0, 2, 4, n_batch), load(tiny_model, 2, 4, 4, n_batch)]
    solo = {seq: run(solo_stages, [every_row(seq, 0, p)])[0] for seq, p in prompts.items()}
    stages = [load(tiny_model, 0, 2, 4, n_batch), load(tiny_model, 2, 4, 4, n_batch)]
    together = run(stages, [every_row(seq, 0, p) for seq, p in prompts.items()])
    for (seq, p), rows in zip(prompts.items(), together, strict=True):
        assert rows.shape == (len(p), 96)
        # Other batch shapes round differently: close, not bit-equal. A misplaced row
        # would be another token's logits entirely (differences of order 1).
        np.testing.assert_allclose(rows, solo[seq], atol=1e-3)
        assert all(s.length(seq) == len(p) for s in stages)


@pytest.mark.parametrize("make, message", [
    (lambda s: ([Slice(0, 0, [1, 2])], np.zeros((2, 63), np.float32)), "hidden states hold"),
    (lambda s: ([Slice(0, 5, [1, 2])], np.zeros((2, 64), np.float32)), "must continue"),
    (lambda s: ([Slice(3, 0, [1, 2])], np.zeros((2, 64), np.float32)), "unknown sequence"),
    (lambda s: ([Slice(0, 0, [1] * (s.n_ctx_seq + 1))],
                np.zeros((s.n_ctx_seq + 1, 64), np.float32)), "exceed the context"),
    (lambda s: ([Slice(0, 0, [1]), Slice(0, 0, [2])], np.zeros((2, 64), np.float32)),
     "twice"),
    (lambda s: ([Slice(0, 0, [1, 2], n_draft=2)], np.zeros((2, 64), np.float32)),
     "draft guesses"),
    (lambda s: ([Slice(0, 0, [1])], None), "takes hidden states"),
])
def test_invalid_forward_changes_nothing(tiny_model: Path, make, message: str):
    first, second = load(tiny_model, 0, 2, 2), load(tiny_model, 2, 4, 2)
    piece = Slice(0, 0, PROMPT[:2], n_draft=1)
    hidden = first.forward([piece])
    reference = second.forward([piece], hidden)
    second.truncate(0, 0)
    slices, rows = make(second)
    with pytest.raises(InvalidForward, match=message):
        second.forward(slices, rows)
    assert second.length(0) == 0 and second.length(1) == 0
    again = second.forward([piece], hidden)
    assert isinstance(again, list) and isinstance(reference, list)
    assert np.array_equal(again[0], reference[0])


def test_truncating_beyond_the_end_is_refused(tiny_model: Path):
    stage = load(tiny_model, 0, 4)
    with pytest.raises(InvalidForward, match="cannot truncate"):
        stage.truncate(0, 3)


def test_borrowed_logits_equal_copies_until_the_next_decode(tiny_model: Path):
    """`borrow=True` (the worker's path) returns llama.cpp's own buffer for a batch decoded
    in one call: the same values as the copies, overwritten by the next decode."""
    first, second = load(tiny_model, 0, 2, 2), load(tiny_model, 2, 4, 2)
    slices = [every_row(0, 0, PROMPT[:3]), Slice(1, 0, PROMPT[3:6], n_draft=1)]  # one call
    hidden = first.forward(slices)
    copied = second.forward(slices, hidden)
    second.truncate(0, 0)
    second.truncate(1, 0)
    borrowed = second.forward(slices, hidden, borrow=True)
    assert isinstance(copied, list) and isinstance(borrowed, list)
    assert [b.shape for b in borrowed] == [(3, 96), (2, 96)]
    for b, c in zip(borrowed, copied, strict=True):
        assert not b.flags.owndata and c.flags.owndata
        assert np.array_equal(b, c)
    kept = borrowed[0].copy()
    second.forward([Slice(0, 3, [PROMPT[3]])], first.forward([Slice(0, 3, [PROMPT[3]])]),
                   borrow=True)
    assert not np.array_equal(borrowed[0], kept)  # a view: the next decode wrote over it


def test_a_batch_of_several_calls_is_copied_even_when_borrowed(tiny_model: Path):
    first = load(tiny_model, 0, 2, n_batch=4)
    second = load(tiny_model, 2, 4, n_batch=4)
    piece = every_row(0, 0, PROMPT[:6])  # two calls of 4 and 2 rows
    out = second.forward([piece], first.forward([piece]), borrow=True)
    assert isinstance(out, list) and out[0].shape == (6, 96) and out[0].flags.owndata


def test_a_move_and_a_copy_into_the_moved_slot_run_in_slice_order(tiny_model: Path):
    """The engine moves an idle cache out of a slot and copies a prefix into that slot in
    one batch (docs/scheduler.md, "Placement"): copies run first, in slice order, and
    validation counts a copy's source as what the copies before it left there."""
    stages = [load(tiny_model, 0, 2, n_seq_max=3), load(tiny_model, 2, 4, n_seq_max=3)]
    other = [11, 12, 13, 14, 15, 16]
    run(stages, [Slice(0, 0, PROMPT), Slice(1, 0, other)])
    # Slot 1's cache moves to slot 2; slot 1 then takes slot 2's first 4 positions (what
    # slot 1 held) and continues; slot 0 continues as it was.
    got = run(stages, [Slice(2, len(other), [], copy_from=1),
                       Slice(1, 4, [77, 78], copy_from=2, n_draft=1),
                       every_row(0, len(PROMPT), [7])])
    fresh = [load(tiny_model, 0, 2, n_seq_max=1), load(tiny_model, 2, 4, n_seq_max=1)]
    want = run(fresh, [every_row(0, 0, [*other[:4], 77, 78])])[0]
    assert np.abs(got[1] - want[4:]).max() < 1e-4
    assert [s.length(2) for s in stages] == [len(other)] * 2
    after = run(stages, [every_row(2, len(other), [5])])[0]
    alone = run(fresh, [every_row(0, 4, [other[4], other[5], 5])])[0]
    assert np.abs(after - alone[-1:]).max() < 1e-4
