"""The stage technique on the real demo target: cutting changes nothing, bit for bit."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from cluster.gguf_file import read_header
from cluster.llama.ggml import row_to_float
from cluster.messages import Batch, Slice
from cluster.model_info import TokenEmbedding
from cluster.stage_cut import split_at
from coordinator.ring.local_ring import LocalRing
from coordinator.tokenizer import Tokenizer

pytestmark = pytest.mark.slow
SPLITS = {1: [], 2: [14], 3: [9, 19]}
N_TOKENS = 32


def greedy_run(model: Path, prompt: list[int], points: list[int]) -> tuple[np.ndarray, list[int]]:
    ring = LocalRing.load(model, split_at(28, points), n_ctx=512, n_threads=2)
    try:
        logits = ring.logits(Batch(0, [Slice(0, 0, prompt)]))[0][0][-1]
        tokens = [int(np.argmax(logits))]
        while len(tokens) < N_TOKENS:
            step = Slice(0, len(prompt) + len(tokens) - 1, [tokens[-1]])
            row = ring.logits(Batch(0, [step]))[0][0][-1]
            tokens.append(int(np.argmax(row)))
        return logits, tokens
    finally:
        ring.close()


@pytest.fixture(scope="module")
def prompt(demo_target: Path) -> list[int]:
    tokenizer = Tokenizer(demo_target)
    return tokenizer.encode(tokenizer.chat_prompt(
        [{"role": "user", "content": "Write a Python function that merges two sorted lists."}]))


@pytest.fixture(scope="module")
def runs(demo_target: Path, prompt: list[int]) -> dict[int, tuple[np.ndarray, list[int]]]:
    return {n: greedy_run(demo_target, prompt, points) for n, points in SPLITS.items()}


@pytest.mark.parametrize("n_stages", [2, 3])
def test_staged_logits_equal_one_stage(runs, n_stages: int):
    one, many = runs[1][0], runs[n_stages][0]
    assert np.abs(one - many).max() == 0.0


@pytest.mark.parametrize("n_stages", [2, 3])
def test_staged_greedy_tokens_equal_one_stage(runs, n_stages: int):
    assert len(runs[1][1]) == N_TOKENS
    assert runs[n_stages][1] == runs[1][1]


def test_one_stage_equals_llama_cpp_on_the_uncut_model(runs, demo_target: Path, prompt):
    """Embedding lookup in Python + stage file = llama.cpp on the original file."""
    llm = llama_cpp.Llama(str(demo_target), n_ctx=512, n_batch=512, n_threads=2,
                          logits_all=False, verbose=False)
    try:
        llm.eval(prompt)  # flags only the last row for output, as the last stage does
        reference = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()
    finally:
        llm.close()
    assert np.abs(reference - runs[1][0]).max() == 0.0
    assert int(np.argmax(reference)) == runs[1][1][0]


@pytest.mark.parametrize("model", ["demo_target", "demo_draft"])
def test_ggml_row_dequantizer_gives_numpys_values(model: str, request):
    """The first stage embeds with ggml's own to_float: the same floats as gguf's numpy
    dequantize, for one row (a decode step) and many, repeats included."""
    header = read_header(request.getfixturevalue(model))
    fast, slow = TokenEmbedding(header, row_to_float), TokenEmbedding(header)
    assert fast._to_float is not None and slow._to_float is None
    rng = np.random.default_rng(0)
    for ids in ([0], [fast.n_vocab - 1], rng.integers(0, fast.n_vocab, 300).tolist() + [7, 7]):
        got = fast.lookup(np.asarray(ids))
        assert got.shape == (len(ids), fast.n_embd) and got.dtype == np.float32
        assert np.array_equal(got, slow.lookup(np.asarray(ids)))
