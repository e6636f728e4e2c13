"""The cutter on tiny random-weight models: shapes, renumbering, metadata, tied head."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from cluster.errors import SpecshardError
from cluster.model_info import inspect_model
from cluster.stage_cut import DUMMY_VOCAB, cut_stage, even_split, split_at
from tests.tiny_gguf import N_EMBD, N_VOCAB, write_tiny_model


def tensors(path: Path) -> dict[str, np.ndarray]:
    return {t.name: np.array(t.data) for t in GGUFReader(path).tensors}


def field(path: Path, key: str) -> object:
    return GGUFReader(path).fields[key].contents()


def test_middle_stage_renumbers_blocks_and_copies_bytes(tiny_model: Path, tmp_path: Path):
    out = cut_stage(tiny_model, 1, 3, out=tmp_path / "mid.gguf")
    full, stage = tensors(tiny_model), tensors(out)
    blocks = sorted({n.split(".")[1] for n in stage if n.startswith("blk.")})
    assert blocks == ["0", "1"]
    for name, data in stage.items():
        if name.startswith("blk."):
            _, index, rest = name.split(".", 2)
            assert np.array_equal(data, full[f"blk.{int(index) + 1}.{rest}"]), name
    assert np.array_equal(stage["output_norm.weight"], full["output_norm.weight"])
    assert stage["token_embd.weight"].shape == (DUMMY_VOCAB, N_EMBD)
    assert not stage["token_embd.weight"].any()
    assert "output.weight" not in stage


def test_stage_metadata(tiny_model: Path, tmp_path: Path):
    out = cut_stage(tiny_model, 1, 3, out=tmp_path / "mid.gguf")
    assert field(out, "qwen2.block_count") == 2
    assert field(out, "qwen2.vocab_size") == DUMMY_VOCAB
    assert field(out, "tokenizer.ggml.model") == "none"
    assert field(out, "general.tiny_marker") == "copied-to-every-stage"
    assert field(out, "qwen2.embedding_length") == N_EMBD
    assert (field(out, "specshard.stage.begin"), field(out, "specshard.stage.end")) == (1, 3)
    info = inspect_model(out)
    assert (info.n_layer, info.n_vocab) == (2, DUMMY_VOCAB)


@pytest.mark.parametrize("tied", [False, True])
def test_last_stage_carries_the_real_lm_head_as_token_embd(tmp_path: Path, tied: bool):
    model = write_tiny_model(tmp_path / "m.gguf", tied=tied)
    out = cut_stage(model, 2, 4, out=tmp_path / "last.gguf")
    full, stage = tensors(model), tensors(out)
    head = full["token_embd.weight" if tied else "output.weight"]
    assert np.array_equal(stage["token_embd.weight"], head)
    assert "output.weight" not in stage
    assert field(out, "qwen2.vocab_size") == N_VOCAB


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_other_supported_architectures(tmp_path: Path, arch: str):
    model = write_tiny_model(tmp_path / f"{arch}.gguf", arch=arch)
    out = cut_stage(model, 0, 2, out=tmp_path / "s.gguf")
    assert field(out, f"{arch}.block_count") == 2
    if arch == "qwen3":
        assert "blk.1.attn_q_norm.weight" in tensors(out)


def test_unsupported_architecture_is_refused(tmp_path: Path):
    model = write_tiny_model(tmp_path / "gemma.gguf", arch="gemma")
    with pytest.raises(SpecshardError, match="architecture 'gemma' is not supported"):
        cut_stage(model, 0, 2)


@pytest.mark.parametrize("layers", [(0, 5), (3, 3), (-1, 2)])
def test_out_of_bounds_range_is_refused(tiny_model: Path, layers: tuple[int, int]):
    with pytest.raises(SpecshardError, match="out of bounds"):
        cut_stage(tiny_model, *layers)


def test_cut_is_cached_by_model_identity_and_range(tmp_path: Path):
    a = write_tiny_model(tmp_path / "a.gguf", seed=1)
    first = cut_stage(a, 0, 2)
    mtime = first.stat().st_mtime_ns
    assert cut_stage(a, 0, 2) == first and first.stat().st_mtime_ns == mtime
    assert cut_stage(a, 2, 4) != first
    (tmp_path / "b").mkdir()
    same_shape_other_weights = write_tiny_model(tmp_path / "b" / "a.gguf", seed=2)
    assert cut_stage(same_shape_other_weights, 0, 2) != first


def test_splits():
    assert [(s.begin, s.end) for s in even_split(28, 2)] == [(0, 14), (14, 28)]
    assert [(s.begin, s.end) for s in split_at(28, [9, 19])] == [(0, 9), (9, 19), (19, 28)]
    with pytest.raises(SpecshardError):
        even_split(4, 5)
