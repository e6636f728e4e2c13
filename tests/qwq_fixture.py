"""Shape-only GGUF fixtures (docs/architecture.md, "The demo models"): a real header, a
sparse hole for the data.

QwQ-32B Q4_K_H takes its per-layer types from the model card (steampunque/QwQ-32B-Hybrid-
GGUF, LAYER_TYPES, token_embd Q4_K, output Q6_K); the per-tensor bumps inside a layer follow
llama_tensor_get_type in llama.cpp's src/llama-quant.cpp (0.3.36 vendored tree).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from gguf.constants import GGML_QUANT_SIZES, GGUFValueType
from gguf.constants import GGMLQuantizationType as T

from cluster.gguf_file import OutTensor, encode_kv, write_gguf

QWQ_LAYER_TYPES = (
    ["Q4_K_M", "Q4_K_S", "Q3_K_L"] + ["Q3_K_M"] * 13
    + ["Q3_K_L", "Q3_K_M"] * 4 + ["Q3_K_L"] * 16
    + ["Q4_K_S", "Q3_K_L"] * 4 + ["Q4_K_S"] * 8
    + ["Q4_K_M", "Q4_K_S", "Q4_K_M", "Q4_K_M", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K"]
)
_BASE = {"Q3_K_M": T.Q3_K, "Q3_K_L": T.Q3_K, "Q4_K_S": T.Q4_K, "Q4_K_M": T.Q4_K,
         "Q5_K_S": T.Q5_K, "Q5_K_M": T.Q5_K, "Q6_K": T.Q6_K, "Q8_0": T.Q8_0}


@dataclass(frozen=True)
class ShapeSpec:
    arch: str
    name: str
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    n_ctx_train: int
    layer_types: tuple[str, ...]  # llama.cpp ftype name per layer
    token_embd_type: T
    output_type: T | None  # None: the lm_head is tied to token_embd

    @property
    def n_layer(self) -> int:
        return len(self.layer_types)


QWQ_32B_Q4_K_H = ShapeSpec(
    arch="qwen2", name="QwQ-32B Q4_K_H (shape only)", n_embd=5120, n_ff=27648, n_head=40,
    n_head_kv=8, head_dim=128, n_vocab=152064, n_ctx_train=40960,
    layer_types=tuple(QWQ_LAYER_TYPES), token_embd_type=T.Q4_K, output_type=T.Q6_K)
QWEN3_0_6B_Q8_0 = ShapeSpec(
    arch="qwen3", name="Qwen3-0.6B Q8_0 (shape only)", n_embd=1024, n_ff=3072, n_head=16,
    n_head_kv=8, head_dim=128, n_vocab=151936, n_ctx_train=40960,
    layer_types=("Q8_0",) * 28, token_embd_type=T.Q8_0, output_type=None)


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _bumped(ftype: str, tensor: str, i: int, n: int) -> T:
    """llama_tensor_get_type's rules for attn_v, ffn_down and attn_output (non-Falcon)."""
    base = _BASE[ftype]
    if tensor == "attn_v":
        rules = {"Q3_K_M": T.Q5_K if i < 2 else T.Q4_K, "Q3_K_L": T.Q5_K,
                 "Q4_K_M": T.Q6_K if _more_bits(i, n) else base,
                 "Q5_K_M": T.Q6_K if _more_bits(i, n) else base,
                 "Q4_K_S": T.Q5_K if i < 4 else base}
        return rules.get(ftype, base)
    if tensor == "ffn_down":
        rules = {"Q3_K_M": T.Q5_K if i < n // 16 else T.Q4_K, "Q3_K_L": T.Q5_K,
                 "Q4_K_M": T.Q6_K if _more_bits(i, n) else base,
                 "Q5_K_M": T.Q6_K if _more_bits(i, n) else base,
                 "Q4_K_S": T.Q5_K if i < n // 8 else base}
        return rules.get(ftype, base)
    if tensor == "attn_output":
        return {"Q3_K_M": T.Q4_K, "Q3_K_L": T.Q5_K}.get(ftype, base)
    return base


def _tensor(name: str, shape: tuple[int, ...], ttype: T) -> OutTensor:
    block, size = GGML_QUANT_SIZES[ttype]
    n = 1
    for d in shape:
        n *= d
    return OutTensor(name, shape, ttype, n // block * size)


def _layer(spec: ShapeSpec, i: int) -> list[OutTensor]:
    ftype, n, e = spec.layer_types[i], spec.n_layer, spec.n_embd
    q, kv = spec.n_head * spec.head_dim, spec.n_head_kv * spec.head_dim
    p = f"blk.{i}."
    tensors = [
        _tensor(p + "attn_norm.weight", (e,), T.F32),
        _tensor(p + "attn_q.weight", (e, q), _bumped(ftype, "attn_q", i, n)),
        _tensor(p + "attn_k.weight", (e, kv), _bumped(ftype, "attn_k", i, n)),
        _tensor(p + "attn_v.weight", (e, kv), _bumped(ftype, "attn_v", i, n)),
        _tensor(p + "attn_output.weight", (q, e), _bumped(ftype, "attn_output", i, n)),
        _tensor(p + "ffn_norm.weight", (e,), T.F32),
        _tensor(p + "ffn_gate.weight", (e, spec.n_ff), _bumped(ftype, "ffn_gate", i, n)),
        _tensor(p + "ffn_up.weight", (e, spec.n_ff), _bumped(ftype, "ffn_up", i, n)),
        _tensor(p + "ffn_down.weight", (spec.n_ff, e), _bumped(ftype, "ffn_down", i, n)),
    ]
    if spec.arch == "qwen2":
        tensors += [_tensor(p + f"attn_{x}.bias", (d,), T.F32)
                    for x, d in (("q", q), ("k", kv), ("v", kv))]
    if spec.arch == "qwen3":
        tensors += [_tensor(p + f"attn_{x}_norm.weight", (spec.head_dim,), T.F32)
                    for x in ("q", "k")]
    return tensors


def _metadata(spec: ShapeSpec) -> list[bytes]:
    a, u32, f32 = spec.arch, GGUFValueType.UINT32, GGUFValueType.FLOAT32
    text = GGUFValueType.STRING
    # tokenizer "none" with <arch>.vocab_size: llama.cpp loads it without a vocabulary.
    return [
        encode_kv("general.architecture", text, a),
        encode_kv("general.name", text, spec.name),
        encode_kv(f"{a}.block_count", u32, spec.n_layer),
        encode_kv(f"{a}.context_length", u32, spec.n_ctx_train),
        encode_kv(f"{a}.embedding_length", u32, spec.n_embd),
        encode_kv(f"{a}.feed_forward_length", u32, spec.n_ff),
        encode_kv(f"{a}.attention.head_count", u32, spec.n_head),
        encode_kv(f"{a}.attention.head_count_kv", u32, spec.n_head_kv),
        encode_kv(f"{a}.attention.key_length", u32, spec.head_dim),
        encode_kv(f"{a}.attention.value_length", u32, spec.head_dim),
        encode_kv(f"{a}.rope.freq_base", f32, 1e6),
        encode_kv(f"{a}.attention.layer_norm_rms_epsilon", f32, 1e-6),
        encode_kv(f"{a}.vocab_size", u32, spec.n_vocab),
        encode_kv("tokenizer.ggml.model", text, "none"),
    ]


def write_shape_only(path: Path, spec: ShapeSpec) -> Path:
    """A GGUF with every tensor's real name, shape and type, and no data (a sparse hole)."""
    tensors = [_tensor("token_embd.weight", (spec.n_embd, spec.n_vocab), spec.token_embd_type)]
    if spec.output_type is not None:
        tensors.append(_tensor("output.weight", (spec.n_embd, spec.n_vocab), spec.output_type))
    tensors.append(_tensor("output_norm.weight", (spec.n_embd,), T.F32))
    for i in range(spec.n_layer):
        tensors += _layer(spec, i)
    with open(path, "wb") as out:
        offsets = write_gguf(out, _metadata(spec), tensors)
    os.truncate(path, offsets[-1] + tensors[-1].n_bytes)
    return path


if __name__ == "__main__":  # python -m tests.qwq_fixture DIR: the fixtures the README plans
    import sys

    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    out.mkdir(parents=True, exist_ok=True)
    for spec, name in ((QWQ_32B_Q4_K_H, "QwQ-32B.Q4_K_H.gguf"),
                       (QWEN3_0_6B_Q8_0, "Qwen3-0.6B-Q8_0.gguf")):
        print(write_shape_only(out / name, spec))
