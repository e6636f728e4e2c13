"""What a GGUF model is, read from its header only."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np

from cluster.errors import SpecshardError
from cluster.gguf_file import GGUFHeader, read_header

SUPPORTED_ARCHS = ("qwen2", "qwen3", "llama")
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


class KvType(str, Enum):
    """KV cache element types the planner chooses between."""

    F16 = "f16"
    Q8_0 = "q8_0"

    @property
    def bytes_per_value(self) -> float:
        # q8_0 blocks: 32 int8 values plus one f16 scale = 34 bytes (ggml-common.h)
        return 2.0 if self is KvType.F16 else 34 / 32

    @property
    def ggml_type(self) -> int:
        return 1 if self is KvType.F16 else 8  # GGML_TYPE_F16, GGML_TYPE_Q8_0


@dataclass(frozen=True)
class ModelInfo:
    """The shape of a model: enough to plan, cut and run stages."""

    path: Path
    arch: str
    name: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    n_ctx_train: int
    layer_bytes: tuple[int, ...]
    token_embd_bytes: int
    output_bytes: int  # 0 when the lm_head is tied to token_embd
    other_bytes: int  # output_norm, rope_freqs, …: copied onto every stage

    @property
    def total_bytes(self) -> int:
        return sum(self.layer_bytes) + self.token_embd_bytes + self.output_bytes \
            + self.other_bytes

    @property
    def tied_output(self) -> bool:
        return self.output_bytes == 0

    @property
    def lm_head_bytes(self) -> int:
        return self.output_bytes or self.token_embd_bytes

    def kv_bytes_per_token_layer(self, kv: KvType) -> float:
        """K and V of one token in one layer."""
        return 2 * self.n_head_kv * self.head_dim * kv.bytes_per_value

    def kv_bytes_per_token(self, kv: KvType) -> float:
        return self.n_layer * self.kv_bytes_per_token_layer(kv)


def _int(header: GGUFHeader, key: str, default: int | None = None) -> int:
    value = header.values.get(key, default)
    if value is None:
        raise SpecshardError(f"{header.path.name}: metadata key {key} is missing")
    return int(value)  # type: ignore[call-overload]


def model_info(header: GGUFHeader, require_supported: bool = True) -> ModelInfo:
    name = header.path.name
    arch = str(header.values.get("general.architecture", ""))
    if require_supported and arch not in SUPPORTED_ARCHS:
        raise SpecshardError(
            f"{name}: architecture '{arch or '?'}' is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHS)})")
    n_layer = _int(header, f"{arch}.block_count")
    n_embd = _int(header, f"{arch}.embedding_length")
    n_head = _int(header, f"{arch}.attention.head_count")
    layer_bytes = [0] * n_layer
    token_embd = output = other = 0
    for tensor in header.tensors:
        match = _BLOCK.match(tensor.name)
        if match:
            index = int(match.group(1))
            if index >= n_layer:
                raise SpecshardError(f"{name}: tensor {tensor.name} is beyond block_count")
            layer_bytes[index] += tensor.n_bytes
        elif tensor.name == "token_embd.weight":
            token_embd = tensor.n_bytes
        elif tensor.name == "output.weight":
            output = tensor.n_bytes
        else:
            other += tensor.n_bytes
    embd = header.tensor("token_embd.weight")
    vocab = header.values.get("tokenizer.ggml.tokens",
                              header.values.get(f"{arch}.vocab_size",
                                                embd.shape[1] if embd else None))
    if vocab is None:
        raise SpecshardError(f"{name}: no vocabulary size in the header")
    return ModelInfo(
        path=header.path, arch=arch, name=str(header.values.get("general.name", name)),
        n_layer=n_layer, n_embd=n_embd, n_head=n_head,
        n_head_kv=_int(header, f"{arch}.attention.head_count_kv", n_head),
        head_dim=_int(header, f"{arch}.attention.key_length", n_embd // n_head),
        n_vocab=int(vocab),  # type: ignore[call-overload]
        n_ctx_train=_int(header, f"{arch}.context_length"),
        layer_bytes=tuple(layer_bytes), token_embd_bytes=token_embd,
        output_bytes=output, other_bytes=other,
    )


def inspect_model(path: Path, require_supported: bool = True) -> ModelInfo:
    return model_info(read_header(path), require_supported)


def parse_layers(text: str, n_layer: int) -> tuple[int, int]:
    """`A:B` → (A, B), a non-empty half-open range inside [0, n_layer]."""
    try:
        a_text, b_text = text.split(":")
        a, b = int(a_text), int(b_text)
    except ValueError:
        raise SpecshardError(f"layer range '{text}' is not of the form A:B") from None
    if not 0 <= a < b <= n_layer:
        raise SpecshardError(
            f"layer range {a}:{b} is out of bounds: the model has layers 0:{n_layer}")
    return a, b


RowToFloat = Callable[[int, int, int], None]  # (source, destination, n values)


class TokenEmbedding:
    """The full model's token_embd, looked up and dequantized as llama.cpp does.

    `row_to_float` gives ggml's row dequantizer for a tensor type (cluster.llama.ggml):
    bit-identical to gguf's numpy dequantize and ~30× faster on one row (0.008 vs
    0.24 ms, docs/overhead.md). Without it, or for a type it has none for, numpy does
    the work.
    """

    def __init__(self, header: GGUFHeader,
                 row_to_float: Callable[[int], RowToFloat | None] | None = None) -> None:
        tensor = header.tensor("token_embd.weight")
        if tensor is None:
            raise SpecshardError(f"{header.path.name} has no token_embd.weight")
        self.type = tensor.type
        self.n_embd, self.n_vocab = tensor.shape[0], tensor.shape[1]
        self.rows = np.memmap(header.path, dtype=np.uint8, mode="r", offset=tensor.offset,
                              shape=(tensor.shape[1], tensor.row_bytes))
        self._to_float = row_to_float(tensor.type) if row_to_float else None

    def lookup(self, token_ids: np.ndarray) -> np.ndarray:
        from gguf.quants import dequantize

        if token_ids.size and (token_ids.min() < 0 or token_ids.max() >= self.n_vocab):
            raise SpecshardError(f"token id out of range 0..{self.n_vocab - 1}")
        if self._to_float is None:
            return np.ascontiguousarray(
                dequantize(np.asarray(self.rows[token_ids]), self.type), dtype=np.float32)
        out = np.empty((token_ids.size, self.n_embd), np.float32)
        src, row_bytes = self.rows.ctypes.data, self.rows.shape[1]
        dst, out_bytes = out.ctypes.data, 4 * self.n_embd
        for i, token in enumerate(token_ids.tolist()):
            self._to_float(src + token * row_bytes, dst + i * out_bytes, self.n_embd)
        return out
