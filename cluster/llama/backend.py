"""llama.cpp's process-wide set-up, shared by stages, the draft model and the tokenizer."""

from __future__ import annotations

import ctypes
import logging
import threading
from typing import Any

import llama_cpp
import numpy as np

log = logging.getLogger(__name__)
_backend_lock = threading.Lock()
_backend_ready = False


# ggml's levels: 1 debug, 2 info, 3 warn, 4 error, 5 "continues the last line".
# Its info lines (a few hundred at every load) go to DEBUG; warnings and errors are
# shown at the default level — among them its reason when a decode fails.
_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
_last_level = [logging.DEBUG]
# Warnings that are not news for the person reading the log: every stage file causes
# the first by design (it carries no vocabulary, so llama.cpp makes dummy tokens:
# docs/architecture.md, "Stages"); the second is llama.cpp fixing a token type in the
# demo models' vocabulary by itself, at every load.
_EXPECTED = ("load: adding ", "load: control-looking token")


def _llama_log(level: int, text: bytes, _user: int) -> None:
    mapped = _last_level[0] if level == 5 else _LEVELS.get(level, logging.DEBUG)
    _last_level[0] = mapped
    line = text.decode(errors="replace").rstrip()
    if mapped == logging.WARNING and line.startswith(_EXPECTED):
        mapped = logging.DEBUG
    if line:
        log.log(mapped, "%s", line)


_log_callback = llama_cpp.llama_log_callback(_llama_log)


def init_backend() -> None:
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _backend_ready = True


def logits_row(ctx: Any, index: int, n_vocab: int) -> np.ndarray:
    """A copy of the logits of batch row `index` of the last llama_decode."""
    ptr = llama_cpp.llama_get_logits_ith(ctx, index)
    return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()


def logits_rows(ctx: Any, indices: list[int], n_vocab: int, borrow: bool = False
                ) -> np.ndarray:
    """The logits of batch rows `indices` of the last llama_decode as one
    (len(indices), n_vocab) array: copied once, or with `borrow` a view of llama.cpp's
    own buffer when the rows lie one after another there (each ~600 KB at a 152k
    vocabulary), valid only until the context's next decode."""
    pointers = []
    for index in indices:
        ptr = llama_cpp.llama_get_logits_ith(ctx, index)
        if not ptr:  # llama.cpp logs why: a row that asked for no logits
            raise RuntimeError(f"llama.cpp has no logits for batch row {index}")
        pointers.append(ctypes.addressof(ptr.contents))
    row_bytes = 4 * n_vocab
    if borrow and pointers and all(p == pointers[0] + k * row_bytes
                                   for k, p in enumerate(pointers)):
        buffer = (ctypes.c_float * (len(pointers) * n_vocab)).from_address(pointers[0])
        return np.ctypeslib.as_array(buffer).reshape(len(pointers), n_vocab)
    out = np.empty((len(indices), n_vocab), np.float32)
    for k, address in enumerate(pointers):
        ctypes.memmove(out[k].ctypes.data, address, row_bytes)
    return out


def free(batch: Any, ctx: Any, model: Any) -> None:
    """Release a batch, its context and its model, in that order."""
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
