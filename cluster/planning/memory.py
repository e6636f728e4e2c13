"""Device bytes of one pipeline stage: weights, KV cache and compute buffer.

The formulas follow llama.cpp 0.3.36 (vendored in llama-cpp-python 0.3.36) and are checked
against the sizes it logs (tests/test_plan.py); docs/planning.md derives them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cluster.errors import SpecshardError
from cluster.gguf_file import read_header
from cluster.model_info import KvType, ModelInfo, model_info

N_UBATCH = 512  # llama.cpp's default n_batch/n_ubatch, and the worker's (cluster/llama/stage.py)
CTX_PAD = 256  # llama_context pads n_ctx and n_ctx_seq to 256 (src/llama-context.cpp)
F32 = 4
F16 = 2


@dataclass(frozen=True)
class ModelShape:
    """A ModelInfo plus the FFN width, which sizes the compute buffer."""

    info: ModelInfo
    n_ff: int


def model_shape(model: ModelInfo | Path) -> ModelShape:
    """Read from the GGUF header only (a ModelInfo's header is read again for n_ff)."""
    header = read_header(model.path if isinstance(model, ModelInfo) else model)
    info = model if isinstance(model, ModelInfo) else model_info(header)
    n_ff = header.values.get(f"{info.arch}.feed_forward_length")
    if n_ff is None:
        raise SpecshardError(f"{header.path.name}: metadata key "
                             f"{info.arch}.feed_forward_length is missing")
    return ModelShape(info, int(n_ff))  # type: ignore[call-overload]


@dataclass(frozen=True)
class StageMemory:
    """What one stage holds on its device, in bytes."""

    weights: int
    kv: int
    compute: int

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute


def _pad(n: int, to: int = CTX_PAD) -> int:
    return -(-n // to) * to


def kv_cells_per_seq(ctx: int, parallel: int) -> int:
    """Cells of one sequence's KV stream: the worker asks for n_ctx = ctx · parallel and
    llama.cpp pads it, divides by n_seq_max and pads again (one stream per sequence)."""
    return _pad(_pad(ctx * parallel) // parallel)


def kv_bytes(info: ModelInfo, n_layers: int, kv: KvType, ctx: int, parallel: int) -> int:
    """K and V of n_layers layers: one row of n_head_kv · head_dim values per cell."""
    row = round(info.n_head_kv * info.head_dim * kv.bytes_per_value)
    return 2 * n_layers * row * kv_cells_per_seq(ctx, parallel) * parallel


def weights_bytes(info: ModelInfo, begin: int, end: int) -> int:
    """Device weights of layers [begin, end): the layers, the small non-layer tensors every
    stage copies (output_norm…), and the lm_head on the last stage. token_embd stays in
    host memory: llama.cpp keeps the input layer on the CPU, and the first stage's worker
    looks rows up in the full model's mmap (docs/architecture.md, "Stages")."""
    head = info.lm_head_bytes if end == info.n_layer else 0
    return sum(info.layer_bytes[begin:end]) + info.other_bytes + head


def compute_bytes(shape: ModelShape, has_head: bool, ctx: int, parallel: int,
                  flash_attn: bool, n_ubatch: int = N_UBATCH) -> int:
    """Peak of llama.cpp's worst-case graph (n_ubatch tokens, every one an output).

    ggml-alloc reuses memory between layers, so the buffer is the largest of three live
    sets: attention (KQ scores unless flash attention, the mask, residual, Q, K, V), the
    FFN (gate, up and their product), and the lm_head's logits. Coefficients fitted to
    llama.cpp's logged sizes for Qwen2.5-1.5B, QwQ-32B and Qwen3-0.6B shapes (±3 %).
    """
    info = shape.info
    tokens = min(n_ubatch, kv_cells_per_seq(ctx, parallel) * parallel)
    n_kv = kv_cells_per_seq(ctx, parallel)
    n_q, n_kv_dim = info.n_head * info.head_dim, info.n_head_kv * info.head_dim
    mask = n_kv * tokens * (F16 if flash_attn else F32)
    kq = 0 if flash_attn else n_kv * tokens * info.n_head * F32
    attention = kq + mask + tokens * F32 * (3 * info.n_embd + 2 * n_q + 2 * n_kv_dim)
    ffn = mask + tokens * F32 * (3 * shape.n_ff + 4 * info.n_embd)
    logits = tokens * F32 * (info.n_vocab + 2 * info.n_embd) if has_head else 0
    return max(attention, ffn, logits)


def stage_memory(shape: ModelShape, begin: int, end: int, kv: KvType, ctx: int, parallel: int,
                 flash_attn: bool) -> StageMemory:
    info = shape.info
    return StageMemory(
        weights=weights_bytes(info, begin, end),
        kv=kv_bytes(info, end - begin, kv, ctx, parallel),
        compute=compute_bytes(shape, end == info.n_layer, ctx, parallel, flash_attn),
    )


def read_bytes_per_token(memory: StageMemory, parallel: int) -> int:
    """Bytes a stage streams from device memory per generated token of one sequence at
    full context: all its weights and that sequence's KV (decoding is bandwidth-bound)."""
    return memory.weights + memory.kv // parallel
