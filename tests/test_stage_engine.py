"""The stage engine on real llama.cpp: exactness across cuts, validation, truncation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cluster.errors import InvalidForward
from cluster.stage_cut import cut_stage
from worker.stage import Stage, StageConfig

PROMPT = np.array([3, 17, 42, 5, 88, 61, 9, 23, 70, 14])


def load(model: Path, begin: int, end: int, n_seq_max: int = 1) -> Stage:
    path = cut_stage(model, begin, end)
    return Stage(StageConfig(path, model if begin == 0 else None, n_ctx=64,
                             n_seq_max=n_seq_max, n_threads=1))


def run(stages: list[Stage], tokens: np.ndarray, start: int = 0, seq: int = 0) -> np.ndarray:
    rows = list(range(len(tokens)))
    out = stages[0].forward(seq, start, tokens=tokens, logit_rows=rows)
    for stage in stages[1:]:
        out = stage.forward(seq, start, hidden=out, logit_rows=rows)
    return out


@pytest.mark.parametrize("tied", [False, True])
def test_two_stages_equal_one_bit_for_bit(tmp_path: Path, tied: bool):
    from tests.tiny_gguf import write_tiny_model

    model = write_tiny_model(tmp_path / "m.gguf", tied=tied)
    whole = run([load(model, 0, 4)], PROMPT)
    split = run([load(model, 0, 1), load(model, 1, 4)], PROMPT)
    assert whole.shape == (len(PROMPT), 96)
    assert np.abs(whole - split).max() == 0.0
    assert np.abs(whole).max() > 0  # real logits, not zeros


def test_hidden_states_have_one_row_per_token(tiny_model: Path):
    first = load(tiny_model, 0, 2)
    hidden = first.forward(0, 0, tokens=PROMPT)
    assert hidden.shape == (len(PROMPT), 64) and hidden.dtype == np.float32
    assert first.length(0) == len(PROMPT)


def test_truncate_then_recompute_gives_the_same_logits(tiny_model: Path):
    stage = load(tiny_model, 0, 4)
    before = run([stage], PROMPT)
    stage.truncate(0, 6)
    assert stage.length(0) == 6
    again = run([stage], PROMPT[6:], start=6)
    assert np.array_equal(before[6:], again)
    # a start before the end drops the rest first: the draft-rollback path
    redo = run([stage], PROMPT[8:], start=8)
    assert np.array_equal(before[8:], redo)


def test_sequences_are_independent(tiny_model: Path):
    stage = load(tiny_model, 0, 4, n_seq_max=2)
    alone = run([stage], PROMPT, seq=0)
    run([stage], PROMPT[::-1].copy(), seq=1)
    stage.truncate(0, 0)
    assert np.array_equal(run([stage], PROMPT, seq=0), alone)


@pytest.mark.parametrize("call, message", [
    (lambda s: s.forward(0, 0, hidden=np.zeros((2, 63), np.float32)), "hidden states hold"),
    (lambda s: s.forward(0, 5, hidden=np.zeros((2, 64), np.float32)), "must continue"),
    (lambda s: s.forward(3, 0, hidden=np.zeros((2, 64), np.float32)), "unknown sequence"),
    (lambda s: s.forward(0, 0, hidden=np.zeros((s.n_ctx_seq + 1, 64), np.float32)),
     "exceed the context"),
    (lambda s: s.forward(0, 0, tokens=np.array([1])), "first stage only"),
    (lambda s: s.truncate(0, 3), "cannot truncate"),
])
def test_invalid_forward_changes_nothing(tiny_model: Path, call, message: str):
    first, second = load(tiny_model, 0, 2), load(tiny_model, 2, 4)
    hidden = first.forward(0, 0, tokens=PROMPT[:2])
    reference = second.forward(0, 0, hidden=hidden, logit_rows=[1])
    second.truncate(0, 0)
    with pytest.raises(InvalidForward, match=message):
        call(second)
    assert second.length(0) == 0
    assert np.array_equal(second.forward(0, 0, hidden=hidden, logit_rows=[1]), reference)
