"""Cut a stage GGUF out of a full model (docs/architecture.md, "Stages").

A stage is a whole model of its own to llama.cpp: blocks a..b-1 renumbered from 0, no
vocabulary (`tokenizer.ggml.model = "none"`, dummy tokens from `<arch>.vocab_size`), a
dummy 8-row token_embd on non-last stages, and on the last stage the real lm_head stored
as token_embd (llama.cpp ties them when output.weight is absent). Tensor bytes are
copied raw, never re-quantized.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

from gguf.constants import GGMLQuantizationType, GGUFValueType
from tqdm import tqdm

from cluster.errors import SpecshardError
from cluster.gguf_file import (
    DEFAULT_ALIGNMENT,
    GGUFHeader,
    OutTensor,
    encode_kv,
    read_header,
    write_gguf,
)
from cluster.model_info import ModelInfo, model_info
from cluster.paths import home

log = logging.getLogger(__name__)
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")
DUMMY_VOCAB = 8  # smallest head llama.cpp accepts for a stage; costs nothing


@dataclass(frozen=True)
class StageSpec:
    """Layers [begin, end) of a model with n_layer blocks."""

    begin: int
    end: int
    n_layer: int

    @property
    def is_first(self) -> bool:
        return self.begin == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.n_layer

    def __post_init__(self) -> None:
        if not 0 <= self.begin < self.end <= self.n_layer:
            raise SpecshardError(
                f"layer range {self.begin}:{self.end} is out of bounds: "
                f"the model has layers 0:{self.n_layer}")


def even_split(n_layer: int, n_stages: int) -> list[StageSpec]:
    if not 1 <= n_stages <= n_layer:
        raise SpecshardError(f"cannot split {n_layer} layers into {n_stages} stages")
    bounds = [round(i * n_layer / n_stages) for i in range(n_stages + 1)]
    return [StageSpec(a, b, n_layer) for a, b in pairwise(bounds)]


def split_at(n_layer: int, points: list[int]) -> list[StageSpec]:
    bounds = [0, *points, n_layer]
    return [StageSpec(a, b, n_layer) for a, b in pairwise(bounds)]


IDENTITY_SAMPLES = 16
IDENTITY_SAMPLE_BYTES = 1 << 16


def model_identity(header: GGUFHeader) -> str:
    """Stable id of a model file without hashing gigabytes: its header, its size, and 16
    samples of 64 KiB spread over the tensor data (two fine-tunes of one shape differ)."""
    digest = hashlib.sha256()
    size = header.path.stat().st_size
    with open(header.path, "rb") as f:
        digest.update(f.read(header.data_offset))
        span = max(size - header.data_offset - IDENTITY_SAMPLE_BYTES, 0)
        for i in range(IDENTITY_SAMPLES):
            f.seek(header.data_offset + span * i // (IDENTITY_SAMPLES - 1))
            digest.update(f.read(IDENTITY_SAMPLE_BYTES))
    digest.update(str(size).encode())
    return digest.hexdigest()[:16]


def _stage_metadata(header: GGUFHeader, info: ModelInfo, spec: StageSpec) -> list[bytes]:
    arch = info.arch
    replaced = {f"{arch}.block_count", f"{arch}.vocab_size"}
    kv = [raw for key, raw in header.raw_kv.items()
          if not key.startswith("tokenizer.") and key not in replaced
          and not key.startswith("specshard.")]
    vocab = info.n_vocab if spec.is_last else DUMMY_VOCAB
    u32 = GGUFValueType.UINT32
    return kv + [
        encode_kv(f"{arch}.block_count", u32, spec.end - spec.begin),
        encode_kv(f"{arch}.vocab_size", u32, vocab),
        encode_kv("tokenizer.ggml.model", GGUFValueType.STRING, "none"),
        encode_kv("specshard.stage.begin", u32, spec.begin),
        encode_kv("specshard.stage.end", u32, spec.end),
        encode_kv("specshard.stage.model_n_layer", u32, spec.n_layer),
    ]


def _stage_tensors(header: GGUFHeader, info: ModelInfo, spec: StageSpec) -> list[OutTensor]:
    tensors = []
    for t in header.tensors:
        match = _BLOCK.match(t.name)
        if match:
            index = int(match.group(1))
            if spec.begin <= index < spec.end:
                name = f"blk.{index - spec.begin}.{match.group(2)}"
                tensors.append(OutTensor(name, t.shape, t.type, t.n_bytes, t.offset))
        elif t.name not in ("token_embd.weight", "output.weight"):
            tensors.append(OutTensor(t.name, t.shape, t.type, t.n_bytes, t.offset))
    if spec.is_last:
        head = header.tensor("output.weight") or header.tensor("token_embd.weight")
        assert head is not None
        tensors.append(OutTensor("token_embd.weight", head.shape, head.type, head.n_bytes,
                                 head.offset))
    else:
        zeros = bytes(4 * info.n_embd * DUMMY_VOCAB)
        tensors.append(OutTensor("token_embd.weight", (info.n_embd, DUMMY_VOCAB),
                                 GGMLQuantizationType.F32, len(zeros), data=zeros))
    return tensors


def stage_path(header: GGUFHeader, spec: StageSpec) -> Path:
    folder = home() / "stages"
    folder.mkdir(parents=True, exist_ok=True)
    stem = header.path.stem
    return folder / f"{stem}-{model_identity(header)}-L{spec.begin}-{spec.end}.gguf"


def cut_stage(model: Path, begin: int, end: int, out: Path | None = None,
              progress: bool = False,
              on_bytes: Callable[[int, int], None] | None = None) -> Path:
    """Write (or find cached) the stage GGUF for layers [begin, end) of `model`.

    `on_bytes(done, total)` reports progress to a caller that is not a terminal (a
    worker streaming LoadStage progress).
    """
    header = read_header(model)
    info = model_info(header)
    spec = StageSpec(begin, end, info.n_layer)
    target = out or stage_path(header, spec)
    if out is None and target.exists():
        return target
    kv = _stage_metadata(header, info, spec)
    tensors = _stage_tensors(header, info, spec)
    align = int(header.values.get("general.alignment", DEFAULT_ALIGNMENT))  # type: ignore[call-overload]
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    total, done = sum(t.n_bytes for t in tensors), 0
    with open(partial, "wb") as dst, open(model, "rb") as src, tqdm(
        total=total, unit="B", unit_scale=True, desc=f"cut L{begin}-{end}",
        disable=not progress, leave=False,
    ) as bar:
        offsets = write_gguf(dst, kv, tensors, align)
        for tensor, offset in zip(tensors, offsets, strict=True):
            dst.seek(offset)
            if tensor.data is not None:
                dst.write(tensor.data)
            else:
                assert tensor.source_offset is not None
                src.seek(tensor.source_offset)
                left = tensor.n_bytes
                while left:
                    chunk = src.read(min(left, 1 << 24))
                    dst.write(chunk)
                    left -= len(chunk)
            bar.update(tensor.n_bytes)
            done += tensor.n_bytes
            if on_bytes:
                on_bytes(done, total)
        dst.truncate(dst.tell() + (-dst.tell() % align))
    partial.replace(target)
    log.info("stage %d:%d of %s written to %s", begin, end, model.name, target)
    return target
