"""One llama.cpp model + context with one KV stream per sequence, as stages and the draft
model both use it, and the calls that keep llama.cpp's ubatches in row order.

With one KV stream per sequence (`kv_unified=false`) llama.cpp splits a batch into
ubatches of *equal* rows per sequence over runs of *consecutive* sequence ids
(llama-batch.cpp, `split_equal(…, sequential)`), so its ubatch order is not the batch's
row order when sequences bring different numbers of rows: we saw a slot's last row come
back with the logits of the row before it (llama-cpp-python 0.3.36;
tests/test_draft.py::test_sequences_drafted_together_get_their_own_guesses). Each
`llama_decode` call is therefore one that llama.cpp keeps in row order: pieces of equal
length, sorted by sequence, at most n_batch rows (`decode_calls`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp

from cluster.errors import SpecshardError
from cluster.llama.backend import init_backend
from cluster.rope import RopeParams

_SCALING = {"none": llama_cpp.LLAMA_ROPE_SCALING_TYPE_NONE,
            "linear": llama_cpp.LLAMA_ROPE_SCALING_TYPE_LINEAR,
            "yarn": llama_cpp.LLAMA_ROPE_SCALING_TYPE_YARN}


@dataclass(frozen=True)
class ContextConfig:
    n_ctx: int  # per sequence
    n_seq_max: int = 1
    n_batch: int = 512
    n_threads: int = 2
    n_gpu_layers: int = 999
    rope: RopeParams | None = None  # None: the model's own values, as llama.cpp reads them
    type_k: int | None = None  # a ggml type; None: llama.cpp's default (f16)
    type_v: int | None = None
    flash_attn: bool | None = False  # None: llama.cpp's default (auto)


@dataclass
class LlamaContext:
    model: Any
    ctx: Any
    mem: Any
    n_vocab: int
    n_embd: int
    n_ctx_seq: int  # what llama.cpp gives a sequence (it pads n_ctx)
    n_batch: int  # llama.cpp clamps n_batch to n_ctx: what it really took


def apply_rope(cparams: Any, rope: RopeParams) -> None:
    """Every RoPE value explicit in llama.cpp's context parameters."""
    cparams.rope_scaling_type = _SCALING[rope.scaling]
    cparams.rope_freq_base = rope.freq_base
    cparams.rope_freq_scale = rope.freq_scale
    cparams.yarn_orig_ctx = rope.yarn_orig_ctx
    cparams.yarn_ext_factor = rope.yarn_ext_factor
    cparams.yarn_attn_factor = rope.yarn_attn_factor
    cparams.yarn_beta_fast = rope.yarn_beta_fast
    cparams.yarn_beta_slow = rope.yarn_beta_slow


def open_context(path: Path, config: ContextConfig, what: str,
                 before_init: Callable[[Any, Any], None] | None = None) -> LlamaContext:
    """Load `path` and make its context; `what` names it in errors; `before_init(model,
    cparams)` may change the context parameters last (a stage installs its eval callback
    there)."""
    init_backend()
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = config.n_gpu_layers
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
    if not model:
        raise SpecshardError(f"llama.cpp could not load {what} {path}")
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = config.n_ctx * config.n_seq_max
    cparams.n_batch = cparams.n_ubatch = config.n_batch
    cparams.n_seq_max = config.n_seq_max
    # One KV stream per sequence: a sequence's attention then sees exactly the cells it
    # would see alone, whatever else the context holds (a request decoded alone is
    # reproducible; the module docstring says what it costs in ubatches).
    cparams.kv_unified = False
    cparams.n_threads = cparams.n_threads_batch = config.n_threads
    if config.type_k is not None:
        cparams.type_k = config.type_k
    if config.type_v is not None:
        cparams.type_v = config.type_v
    if config.flash_attn is not None:
        cparams.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
                                   if config.flash_attn
                                   else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
    cparams.no_perf = True
    if config.rope is not None:
        apply_rope(cparams, config.rope)
    if before_init is not None:
        before_init(model, cparams)
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    if not ctx:
        llama_cpp.llama_model_free(model)
        raise SpecshardError(f"llama.cpp could not create a context for {what}")
    return LlamaContext(
        model=model, ctx=ctx, mem=llama_cpp.llama_get_memory(ctx),
        n_vocab=llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model)),
        n_embd=llama_cpp.llama_model_n_embd(model),
        n_ctx_seq=min(config.n_ctx, llama_cpp.llama_n_ctx_seq(ctx)),
        n_batch=llama_cpp.llama_n_batch(ctx))


def decode_calls(lengths: list[int], seqs: list[int], n_batch: int
                 ) -> list[list[tuple[int, int, int]]]:
    """The llama_decode calls for items of `lengths` rows (item i of sequence seqs[i]):
    lists of (item index, lo, hi) row pieces.

    Round r holds the r-th n_batch-sized piece of every item (an item's pieces run in
    order); within a round, pieces of one length go together, by sequence id, at most
    n_batch rows a call — as many graph computations as llama.cpp would make itself.
    """
    pieces = [[(lo, min(lo + n_batch, n)) for lo in range(0, n, n_batch)] for n in lengths]
    calls = []
    for r in range(max((len(p) for p in pieces), default=0)):
        by_length: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
        for i, p in enumerate(pieces):
            if r < len(p):
                lo, hi = p[r]
                by_length[hi - lo].append((i, lo, hi))
        for length in sorted(by_length):
            group = sorted(by_length[length], key=lambda item: seqs[item[0]])
            per_call = max(n_batch // length, 1)
            calls += [group[k:k + per_call] for k in range(0, len(group), per_call)]
    return calls


def decode_passes(lengths: list[int], seqs: list[int], n_batch: int) -> int:
    """How many ubatches — passes over the weights — llama.cpp makes of `decode_calls`'
    calls: one per run of consecutive sequence ids in a call (`split_equal(…,
    sequential)` with one KV stream per sequence). Slots 0, 1, 2, 3 are one pass; 0, 2,
    4, 6 are four (bench/slot_runs.py)."""
    total = 0
    for call in decode_calls(lengths, seqs, n_batch):
        ids = [seqs[i] for i, _, _ in call]
        total += 1 + sum(b != a + 1 for a, b in zip(ids, ids[1:], strict=False))
    return total
