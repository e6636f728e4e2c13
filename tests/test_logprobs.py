"""logprobs on the last stage: each emitted token's (accepted draft guesses included) and
the likeliest tokens', equal to one llama.cpp process's (llama-cpp-python's
`Llama.logits_to_logprobs` over its logits) within 1e-3, and intact over the wire."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from cluster.judge import judge
from cluster.llama.stage import Stage, StageConfig
from cluster.messages import BatchResult, Slice
from cluster.sampling import SamplingParams
from cluster.stage_cut import cut_stage, split_at
from cluster.wire_convert import result_from_wire, result_to_wire
from coordinator.tokenizer import Tokenizer

N_TOP, N_GUESSES = 3, 3


def test_logprobs_of_emitted_and_accepted_tokens_equal_llama_cpps(tiny_chat_model: Path
                                                                   ) -> None:
    tokenizer = Tokenizer(tiny_chat_model)
    prompt = tokenizer.encode(tokenizer.chat_prompt([{"role": "user", "content": "Hi!"}]))
    tokenizer.close()
    llm = llama_cpp.Llama(str(tiny_chat_model), n_ctx=256, n_batch=64, n_threads=1,
                          logits_all=True, verbose=False)
    try:
        llm.eval(prompt)
        guesses = []  # the greedy continuation: every guess is accepted
        for _ in range(N_GUESSES):
            guesses.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([guesses[-1]])
        # The same batches as the stages below: the prompt but its last token, then that
        # token with the guesses (llama.cpp rounds a batch as a batch).
        llm.reset()
        llm.eval(prompt[:-1])
        llm.eval([prompt[-1], *guesses])
        rows = llm.scores[len(prompt) - 1:len(prompt) + N_GUESSES].copy()
    finally:
        llm.close()
    want = llama_cpp.Llama.logits_to_logprobs(rows)

    stages = [Stage(StageConfig(cut_stage(tiny_chat_model, s.begin, s.end),
                                tiny_chat_model if s.is_first else None, n_ctx=256,
                                n_threads=1)) for s in split_at(4, [2])]
    try:
        pieces = [Slice(0, 0, prompt[:-1], judge=False),
                  Slice(0, len(prompt) - 1, [prompt[-1], *guesses],
                        SamplingParams(logprobs=N_TOP), n_draft=N_GUESSES)]
        for piece in pieces:
            out = stages[0].forward([piece])
            got = stages[1].forward([piece], out)  # type: ignore[arg-type]
        assert isinstance(got, list)
        verdict = judge(pieces[1], got[0], stages[1].tokens(0))
    finally:
        for stage in stages:
            stage.close()
    assert verdict.accepted == guesses and len(verdict.logprobs) == N_GUESSES + 1
    verdict = result_from_wire(result_to_wire(BatchResult(0, [verdict]), 0.0)).results[0]
    for i, (token, lp) in enumerate(zip(verdict.tokens, verdict.logprobs, strict=True)):
        assert lp.logprob == pytest.approx(float(want[i, token]), abs=1e-3)
        best = np.argsort(-want[i], kind="stable")[:N_TOP]
        assert [t for t, _ in lp.top] == best.tolist()
        assert [v for _, v in lp.top] == pytest.approx(want[i, best].tolist(), abs=1e-3)
        assert lp.top[0][0] == token  # greedy: the emitted token is the likeliest


def test_no_logprobs_unless_asked() -> None:
    logits = np.array([[0.0, 2.0, 1.0]], np.float32)
    assert judge(Slice(0, 0, [1]), logits).logprobs == []
    got = judge(Slice(0, 0, [1], SamplingParams(logprobs=0)), logits).logprobs
    assert len(got) == 1 and got[0].top == []
    assert got[0].logprob == pytest.approx(2.0 - np.log(np.exp([0.0, 2.0, 1.0]).sum()))
