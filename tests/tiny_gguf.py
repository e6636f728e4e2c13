"""A tiny random-weight GGUF the tests write themselves (runs in seconds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFWriter

N_EMBD, N_HEAD, N_HEAD_KV, N_FF, N_VOCAB = 64, 4, 2, 128, 96


def write_tiny_model(path: Path, arch: str = "qwen2", n_layer: int = 4, tied: bool = False,
                     seed: int = 0) -> Path:
    """A qwen2/qwen3/llama-shaped model with f32 weights and no real tokenizer."""
    rng = np.random.default_rng(seed)
    head_dim = N_EMBD // N_HEAD

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.08).astype(np.float32)

    writer = GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_block_count(n_layer)
    writer.add_context_length(256)
    writer.add_embedding_length(N_EMBD)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(N_VOCAB)
    writer.add_tokenizer_model("none")
    writer.add_string("general.tiny_marker", "copied-to-every-stage")
    writer.add_tensor("token_embd.weight", w(N_VOCAB, N_EMBD))
    if not tied:
        writer.add_tensor("output.weight", w(N_VOCAB, N_EMBD))
    writer.add_tensor("output_norm.weight", 1 + w(N_EMBD))
    for i in range(n_layer):
        p = f"blk.{i}."
        writer.add_tensor(p + "attn_norm.weight", 1 + w(N_EMBD))
        writer.add_tensor(p + "attn_q.weight", w(N_EMBD, N_EMBD))
        writer.add_tensor(p + "attn_k.weight", w(N_HEAD_KV * head_dim, N_EMBD))
        writer.add_tensor(p + "attn_v.weight", w(N_HEAD_KV * head_dim, N_EMBD))
        if arch == "qwen2":
            writer.add_tensor(p + "attn_q.bias", w(N_EMBD))
            writer.add_tensor(p + "attn_k.bias", w(N_HEAD_KV * head_dim))
            writer.add_tensor(p + "attn_v.bias", w(N_HEAD_KV * head_dim))
        if arch == "qwen3":
            writer.add_tensor(p + "attn_q_norm.weight", 1 + w(head_dim))
            writer.add_tensor(p + "attn_k_norm.weight", 1 + w(head_dim))
        writer.add_tensor(p + "attn_output.weight", w(N_EMBD, N_EMBD))
        writer.add_tensor(p + "ffn_norm.weight", 1 + w(N_EMBD))
        writer.add_tensor(p + "ffn_gate.weight", w(N_FF, N_EMBD))
        writer.add_tensor(p + "ffn_up.weight", w(N_FF, N_EMBD))
        writer.add_tensor(p + "ffn_down.weight", w(N_EMBD, N_FF))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
