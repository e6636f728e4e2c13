"""The C capture computes what the Python capture does, bit for bit, and fails safely.

The parity tests run the demo target as pipelines of 2 and 3 stages twice — the non-last
stages once with each capture, the last stage shared — and compare every hidden state
byte for byte and every greedy token, which must also be the 1-stage (uncut) model's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

import cluster.llama.stage as stage_module
from cluster.errors import SpecshardError
from cluster.llama.capture import make_capture
from cluster.llama.stage import Stage, StageConfig
from cluster.messages import Slice
from cluster.model_info import KvType
from cluster.stage_cut import StageSpec, cut_stage, split_at

REPO = Path(__file__).resolve().parent.parent
N_LAYER, N_SEQ = 28, 3  # the demo target's blocks; sequences per stage
_rng = np.random.default_rng(0)
# A prompt of a few dozen tokens, then two more of other lengths batched together.
PROMPTS = {seq: [int(t) for t in _rng.integers(100, 30_000, n)]
           for seq, n in ((0, 30), (1, 12), (2, 5))}
N_SOLO, N_BATCHED = 8, 2  # single-token decodes of sequence 0, then of all three at once


def load(model: Path, spec: StageSpec, kind: str, kv: KvType = KvType.F16) -> Stage:
    with mock.patch.dict(os.environ, {"SPECSHARD_CAPTURE": kind}):
        stage = Stage(StageConfig(cut_stage(model, spec.begin, spec.end),
                                  model if spec.is_first else None, n_ctx=128,
                                  n_seq_max=N_SEQ, type_k=kv, type_v=kv,
                                  flash_attn=kv is not KvType.F16))
    assert stage.capture is None or stage.capture.kind == kind  # this box has a compiler
    return stage


def trace(stages: list[Stage]) -> tuple[list[np.ndarray], list[int]]:
    """Every non-last stage's hidden states and every greedy token of the workload."""
    for stage in stages:
        for seq in range(N_SEQ):
            stage.truncate(seq, 0)
    hidden_states: list[np.ndarray] = []
    tokens: list[int] = []
    lengths = dict.fromkeys(PROMPTS, 0)

    def step(pending: dict[int, list[int]]) -> dict[int, int]:
        slices = [Slice(seq, lengths[seq], ids) for seq, ids in pending.items()]
        out: np.ndarray | list[np.ndarray] | None = None
        for stage in stages:
            out = stage.forward(slices, out if isinstance(out, np.ndarray) else None)
            if isinstance(out, np.ndarray):
                hidden_states.append(out)
        assert isinstance(out, list)
        greedy = {s.seq: int(np.argmax(rows[-1])) for s, rows in zip(slices, out, strict=True)}
        for seq, ids in pending.items():
            lengths[seq] += len(ids)
        tokens.extend(greedy.values())
        return greedy

    last = step({0: PROMPTS[0]})
    last |= step({1: PROMPTS[1], 2: PROMPTS[2]})
    for _ in range(N_SOLO):
        last[0] = step({0: [last[0]]})[0]
    for _ in range(N_BATCHED):
        last = step({seq: [token] for seq, token in last.items()})
    return hidden_states, tokens


def assert_same_bits(c: list[np.ndarray], python: list[np.ndarray]) -> None:
    assert len(c) == len(python) > 0
    for a, b in zip(c, python, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype == np.float32
        assert a.tobytes() == b.tobytes()


def close(stages: list[Stage]) -> None:
    for stage in stages:
        stage.close()


@pytest.fixture(scope="module")
def uncut_tokens(demo_target: Path) -> list[int]:
    whole = load(demo_target, StageSpec(0, N_LAYER, N_LAYER), "c")  # last: no capture
    try:
        return trace([whole])[1]
    finally:
        whole.close()


@pytest.mark.slow
@pytest.mark.parametrize("points", [[14], [9, 19]], ids=["2 stages", "3 stages"])
def test_c_and_python_capture_agree(demo_target: Path, uncut_tokens: list[int],
                                    points: list[int]) -> None:
    *inner, last_spec = split_at(N_LAYER, points)
    last = load(demo_target, last_spec, "c")
    c = [load(demo_target, spec, "c") for spec in inner]
    python = [load(demo_target, spec, "python") for spec in inner]
    try:
        c_hidden, c_tokens = trace([*c, last])
        py_hidden, py_tokens = trace([*python, last])
    finally:
        close([*c, *python, last])
    assert_same_bits(c_hidden, py_hidden)
    assert c_tokens == py_tokens == uncut_tokens


@pytest.mark.slow
def test_c_and_python_capture_agree_with_q8_0_kv_and_flash_attention(
        demo_target: Path) -> None:
    first, last_spec = split_at(N_LAYER, [14])
    last = load(demo_target, last_spec, "c")
    c = load(demo_target, first, "c", KvType.Q8_0)
    python = load(demo_target, first, "python", KvType.Q8_0)
    try:
        c_hidden, c_tokens = trace([c, last])
        py_hidden, py_tokens = trace([python, last])
    finally:
        close([c, python, last])
    assert_same_bits(c_hidden, py_hidden)
    assert c_tokens == py_tokens


@pytest.mark.parametrize("kind", ["c", "python"])
def test_a_buffer_overflow_is_reported_not_written(tiny_model: Path, kind: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    room = 4  # rows; the batch below has 10
    monkeypatch.setattr(stage_module, "make_capture",
                        lambda name, n_embd, _max_rows: make_capture(name, n_embd, room, kind))
    stage = Stage(StageConfig(cut_stage(tiny_model, 1, 2), n_ctx=64, n_threads=1))
    try:
        assert stage.capture is not None and stage.capture.kind == kind
        buffer = stage.capture._buffer  # type: ignore[attr-defined]  # what C writes into
        buffer.fill(np.nan)
        hidden = np.ones((10, stage.n_embd), np.float32)
        with pytest.raises(SpecshardError, match=f"overflowed its capture buffer of {room} rows"):
            stage.forward([Slice(0, 0, list(range(10)))], hidden)
        assert np.isnan(buffer).all()  # nothing was copied
        assert stage.length(0) == 0  # and the KV cache was rolled back
        fits = stage.forward([Slice(0, 0, list(range(3)))], hidden[:3])
        assert isinstance(fits, np.ndarray) and fits.shape == (3, stage.n_embd)
        assert np.isfinite(fits).all()
    finally:
        stage.close()


SNIPPET = ("import logging; logging.basicConfig(); "
           "from cluster.llama.capture import make_capture; "
           "kinds = [make_capture(b'l_out-0', 8, 2).kind for _ in range(2)]; print(*kinds)")


@pytest.mark.parametrize("cc, reason", [("/nonexistent/cc", "no C compiler"),
                                        ("false", "false failed on capture.c")])
def test_without_a_compiler_the_python_capture_is_used(tmp_path: Path, cc: str,
                                                       reason: str) -> None:
    env = {**os.environ, "CC": cc, "SPECSHARD_HOME": str(tmp_path)}
    env.pop("SPECSHARD_CAPTURE", None)
    done = subprocess.run([sys.executable, "-c", SNIPPET], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120, check=True)
    assert done.stdout.split() == ["python", "python"]
    warnings = [line for line in done.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "Python fallback" in warnings[0] and reason in warnings[0]


def test_two_processes_build_the_library_once(tmp_path: Path) -> None:
    env = {**os.environ, "SPECSHARD_HOME": str(tmp_path)}
    argv = [sys.executable, "-m", "cluster.llama.capture_build"]
    builds = [subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
              for _ in range(2)]
    outputs = [b.communicate(timeout=120)[0] for b in builds]
    assert all(b.returncode == 0 for b in builds)
    assert outputs[0] == outputs[1] and outputs[0].startswith("C capture: ")
    built = sorted(p.name for p in (tmp_path / "lib").iterdir())
    assert len(built) == 2 and built[0].startswith("capture-") and built[1] == "capture.lock"


def test_an_unknown_capture_kind_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECSHARD_CAPTURE", "gpu")
    with pytest.raises(SpecshardError, match="unknown capture 'gpu'"):
        make_capture(b"l_out-0", 8, 2)
