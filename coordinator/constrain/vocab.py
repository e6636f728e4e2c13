"""llguidance's view of the target's vocabulary, built once per tokenizer from the GGUF's
own (llama.cpp's `vocab_only` model that `coordinator/tokenizer.py` loads)."""

from __future__ import annotations

import ctypes
import threading
import weakref
from importlib.metadata import version
from typing import Any

import llama_cpp
import llguidance

from coordinator.tokenizer import Tokenizer

_lock = threading.Lock()
_cache: weakref.WeakKeyDictionary[Tokenizer, llguidance.LLTokenizer] = \
    weakref.WeakKeyDictionary()


def end_tokens(tokenizer: Tokenizer) -> list[int]:
    """The tokens that end a reply (EOS, EOT): a finished grammar allows only these."""
    vocab = tokenizer._vocab  # noqa: SLF001 - the llama.cpp vocab the tokenizer loaded
    ends = [llama_cpp.llama_vocab_eos(vocab), llama_cpp.llama_vocab_eot(vocab)]
    return sorted({t for t in ends if t >= 0})


def ll_tokenizer(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """llguidance's tokenizer for this vocabulary (built on first use: ~1 s, then cached)."""
    with _lock:
        ll = _cache.get(tokenizer)
        if ll is None:
            ll = _from_vocab(tokenizer._vocab, end_tokens(tokenizer))  # noqa: SLF001
            _cache[tokenizer] = ll
        return ll


def engine_info() -> dict[str, Any]:
    """What /props and /v1/cluster say about constrained decoding."""
    return {"engine": "llguidance", "version": version("llguidance"),
            "response_format": ["text", "json_object", "json_schema"],
            "grammar": True, "json_schema": True,
            "tool_choice": ["none", "auto", "required", "function"],
            "parallel_tool_calls": True, "speculative": True}


def _from_vocab(vocab: Any, ends: list[int]) -> llguidance.LLTokenizer:
    """`llguidance.llamacpp.lltokenizer_from_vocab`, with llama.cpp's current attribute
    call (the helper's deprecated one warns once per token: 152k warnings)."""
    n = llama_cpp.llama_vocab_n_tokens(vocab)
    size = 16 * 1024
    buf = ctypes.create_string_buffer(size + 1)
    tokens: list[bytes] = []
    control, user = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL, llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
    for token in range(n):
        k = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, True)
        if k < 0:
            raise ValueError(f"token {token} does not fit {size} bytes")
        piece = buf.raw[:k]
        attr = llama_cpp.llama_vocab_get_attr(vocab, token)
        # Control tokens, and user-defined ones that look like them (<tool_call>), are
        # special to llguidance: a grammar names them, text never spells them.
        if attr & control or (attr & user and piece.startswith(b"<") and
                              piece.endswith(b">")):
            piece = b"\xff" + piece
        tokens.append(piece)
    tokenize = ctypes.cast(llama_cpp.llama_cpp._lib.llama_tokenize, ctypes.c_void_p).value
    return llguidance.LLTokenizer.from_llamacpp(  # type: ignore[attr-defined]
        tokens=tokens, vocab_ptr=vocab, tokenize_fptr=tokenize, eos_token=ends, slices=None)
