"""A tiny random-weight GGUF the tests write themselves (runs in seconds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFWriter

N_EMBD, N_HEAD, N_HEAD_KV, N_FF, N_VOCAB = 64, 4, 2, 128, 96


def write_tiny_model(path: Path, arch: str = "qwen2", n_layer: int = 4, tied: bool = False,
                     seed: int = 0, vocab_from: Path | None = None, n_ctx: int = 256,
                     rope_scaling: tuple[str, float, int] | None = None,
                     extra: dict[str, object] | None = None) -> Path:
    """A qwen2/qwen3/llama-shaped model with random weights: f32 with no real tokenizer,
    or, `vocab_from` a GGUF, that model's tokenizer and chat template (its 152k-row
    embedding and head in f16): a chat model that decodes in a millisecond a token.
    `rope_scaling`: (type, factor, original context) as rope metadata; `extra`: more
    metadata keys (floats as f32, ints as u32, strings), e.g. general.sampling.*."""
    rng = np.random.default_rng(seed)
    head_dim = N_EMBD // N_HEAD

    def w(*shape: int, dtype: type = np.float32) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.08).astype(dtype)

    writer = GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_block_count(n_layer)
    writer.add_context_length(n_ctx)
    writer.add_embedding_length(N_EMBD)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_rope_freq_base(10000.0)
    if rope_scaling is not None:
        kind, factor, original = rope_scaling
        writer.add_string(f"{arch}.rope.scaling.type", kind)
        writer.add_float32(f"{arch}.rope.scaling.factor", factor)
        writer.add_uint32(f"{arch}.rope.scaling.original_context_length", original)
    for key, value in (extra or {}).items():
        if isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, int):
            writer.add_int32(key, value)
        else:
            writer.add_string(key, str(value))
    writer.add_layer_norm_rms_eps(1e-6)
    n_vocab, big = N_VOCAB, np.float32
    if vocab_from is None:
        writer.add_vocab_size(N_VOCAB)
        writer.add_tokenizer_model("none")
    else:
        n_vocab, big = _copy_tokenizer(writer, vocab_from), np.float16
    writer.add_string("general.tiny_marker", "copied-to-every-stage")
    writer.add_tensor("token_embd.weight", w(n_vocab, N_EMBD, dtype=big))
    if not tied:
        writer.add_tensor("output.weight", w(n_vocab, N_EMBD, dtype=big))
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


def _copy_tokenizer(writer: GGUFWriter, source: Path) -> int:
    """The tokenizer (and chat template) of `source`; returns its vocabulary size."""
    from gguf import GGUFReader

    fields = GGUFReader(str(source)).fields

    def strings(key: str) -> list[str]:
        f = fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    def scalar(key: str) -> int:
        f = fields[key]
        return int(f.parts[f.data[0]][0])

    tokens = strings("tokenizer.ggml.tokens")
    writer.add_tokenizer_model(strings("tokenizer.ggml.model")[0])
    writer.add_tokenizer_pre(strings("tokenizer.ggml.pre")[0])
    writer.add_token_list(tokens)
    types = fields["tokenizer.ggml.token_type"]
    writer.add_token_types([int(types.parts[i][0]) for i in types.data])
    writer.add_token_merges(strings("tokenizer.ggml.merges"))
    writer.add_eos_token_id(scalar("tokenizer.ggml.eos_token_id"))
    writer.add_bos_token_id(scalar("tokenizer.ggml.bos_token_id"))
    writer.add_pad_token_id(scalar("tokenizer.ggml.padding_token_id"))
    writer.add_add_bos_token(bool(scalar("tokenizer.ggml.add_bos_token")))
    writer.add_chat_template(strings("tokenizer.chat_template")[0])
    return len(tokens)
