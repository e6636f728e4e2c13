"""A pipeline stage: a range of layers run by llama.cpp on embeddings in, hidden
states (or logits, on the last stage) out. See ARCHITECTURE.md, "the stage technique".
"""

from __future__ import annotations

import ctypes
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np

from cluster.errors import InvalidForward, SpecshardError
from cluster.gguf_file import read_header
from cluster.model_info import KvType, TokenEmbedding
from worker.ggml_api import ggml_backend_tensor_get, ggml_get_name, ggml_nbytes

log = logging.getLogger(__name__)
_backend_lock = threading.Lock()
_backend_ready = False


def _llama_log(level: int, text: bytes, _user: int) -> None:
    # llama.cpp is chatty at load; its lines go to logging at DEBUG (WARN/ERROR kept).
    log.log({4: logging.ERROR, 3: logging.INFO}.get(level, logging.DEBUG), "%s",
            text.decode(errors="replace").rstrip())


_log_callback = llama_cpp.llama_log_callback(_llama_log)


def init_backend() -> None:
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _backend_ready = True


@dataclass(frozen=True)
class StageConfig:
    """How to load one stage."""

    stage_path: Path
    model_path: Path | None = None  # full model: token_embd for the first stage
    n_ctx: int = 4096
    n_seq_max: int = 1
    n_batch: int = 512
    type_k: KvType = KvType.F16
    type_v: KvType = KvType.F16
    flash_attn: bool = False
    n_threads: int = 2


class Stage:
    """One loaded stage with its own llama_context and KV cache."""

    def __init__(self, config: StageConfig) -> None:
        header = read_header(config.stage_path)
        values = header.values
        if "specshard.stage.begin" not in values:
            raise SpecshardError(f"{config.stage_path} is not a specshard stage file")
        self.config = config
        self.begin = int(values["specshard.stage.begin"])  # type: ignore[call-overload]
        self.end = int(values["specshard.stage.end"])  # type: ignore[call-overload]
        self.model_n_layer = int(values["specshard.stage.model_n_layer"])  # type: ignore[call-overload]
        self.is_first = self.begin == 0
        self.is_last = self.end == self.model_n_layer
        self.n_layer = self.end - self.begin
        if config.type_v is not KvType.F16 and not config.flash_attn:
            raise SpecshardError("a quantized V cache needs flash attention")
        self.embedding: TokenEmbedding | None = None
        if self.is_first:
            if config.model_path is None:
                raise SpecshardError("the first stage needs the full model for token_embd")
            self.embedding = TokenEmbedding(read_header(config.model_path))
        self._out_name = f"l_out-{self.n_layer - 1}".encode()
        self._captured: list[np.ndarray] = []
        self._load()

    def _load(self) -> None:
        init_backend()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 999  # a stage offloads all its layers and its head
        self._model = llama_cpp.llama_model_load_from_file(
            str(self.config.stage_path).encode(), mparams)
        if not self._model:
            raise SpecshardError(f"llama.cpp could not load {self.config.stage_path}")
        self.n_embd = llama_cpp.llama_model_n_embd(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self._model))
        c = self.config
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = c.n_ctx * c.n_seq_max
        cparams.n_batch = cparams.n_ubatch = c.n_batch
        cparams.n_seq_max = c.n_seq_max
        # One KV stream per sequence: a sequence's attention then sees exactly the cells
        # it would see alone, so concurrent requests decode bit-identically to solo ones.
        cparams.kv_unified = False
        cparams.n_threads = cparams.n_threads_batch = c.n_threads
        cparams.type_k = c.type_k.ggml_type
        cparams.type_v = c.type_v.ggml_type
        cparams.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if c.flash_attn
                                   else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        cparams.no_perf = True
        if not self.is_last:
            # Keep a reference: the C side holds only the pointer.
            self._callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_eval)
            cparams.cb_eval = self._callback
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise SpecshardError("llama.cpp could not create a context for the stage")
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        # llama.cpp pads the context (to 256); the limit is what was asked for.
        self.n_ctx_seq = min(c.n_ctx, llama_cpp.llama_n_ctx_seq(self._ctx))
        # llama.cpp clamps n_batch to n_ctx: chunk by what it really took.
        self.n_batch = llama_cpp.llama_n_batch(self._ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, self.n_embd, 1)
        self._lengths = [0] * c.n_seq_max

    def _on_eval(self, tensor: int, ask: bool, _user: int) -> bool:
        if ask:
            return bool(ggml_get_name(tensor) == self._out_name)
        if ggml_get_name(tensor) != self._out_name:
            return True
        rows = np.empty(ggml_nbytes(tensor) // 4, dtype=np.float32)
        ggml_backend_tensor_get(tensor, rows.ctypes.data, 0, rows.nbytes)
        self._captured.append(rows.reshape(-1, self.n_embd))
        return False  # skip the rest of the split: the final norm and the dummy head

    def length(self, seq: int) -> int:
        self._check_seq(seq)
        return self._lengths[seq]

    def _check_seq(self, seq: int) -> None:
        if not 0 <= seq < self.config.n_seq_max:
            raise InvalidForward(
                f"unknown sequence {seq}: this stage has sequences 0..{self.config.n_seq_max - 1}")

    def truncate(self, seq: int, length: int) -> None:
        """Forget positions >= length of a sequence (rejected draft tokens, resets)."""
        self._check_seq(seq)
        if not 0 <= length <= self._lengths[seq]:
            raise InvalidForward(
                f"cannot truncate sequence {seq} to {length}: it holds {self._lengths[seq]}")
        llama_cpp.llama_memory_seq_rm(self._mem, seq, length, -1)
        self._lengths[seq] = length

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        assert self.embedding is not None
        return self.embedding.lookup(tokens)

    def validate(self, seq: int, start: int, n_tokens: int, n_floats: int | None) -> None:
        """Raise InvalidForward unless a batch fits; checked before anything changes."""
        self._check_seq(seq)
        if n_tokens <= 0:
            raise InvalidForward("empty batch")
        if not 0 <= start <= self._lengths[seq]:
            raise InvalidForward(
                f"positions must continue sequence {seq} at or before "
                f"{self._lengths[seq]}, got {start}")
        if start + n_tokens > self.n_ctx_seq:
            raise InvalidForward(
                f"positions {start}..{start + n_tokens - 1} exceed the context of "
                f"{self.n_ctx_seq} tokens")
        if n_floats is not None and n_floats != n_tokens * self.n_embd:
            raise InvalidForward(
                f"hidden states hold {n_floats} values, expected {n_tokens} × {self.n_embd}")

    def forward(self, seq: int, start: int, tokens: np.ndarray | None = None,
                hidden: np.ndarray | None = None, logit_rows: list[int] | None = None,
                ) -> np.ndarray:
        """Run the stage's layers on positions start.. of `seq`.

        Positions from `start` on that the sequence already holds are dropped first:
        that is how rejected draft tokens leave every stage's KV cache.

        Non-last stages return the hidden states (n_tokens × n_embd, f32). The last stage
        returns logits for `logit_rows` (default: the last row) — n_rows × n_vocab.
        """
        if (tokens is None) == (hidden is None):
            raise InvalidForward("give token ids (first stage) or hidden states, not both")
        if tokens is not None:
            if not self.is_first:
                raise InvalidForward("token ids go to the first stage only")
            tokens = np.asarray(tokens, dtype=np.int64)
            self.validate(seq, start, len(tokens), None)
            assert self.embedding is not None
            if tokens.min() < 0 or tokens.max() >= self.embedding.n_vocab:
                raise InvalidForward(
                    f"token id out of range 0..{self.embedding.n_vocab - 1}")
            hidden = self.embed(tokens)
        assert hidden is not None
        n_tokens = hidden.shape[0] if hidden.ndim == 2 else 0
        self.validate(seq, start, n_tokens, hidden.size)
        hidden = np.ascontiguousarray(hidden, dtype=np.float32).reshape(n_tokens, self.n_embd)
        rows = sorted(set(logit_rows if logit_rows is not None else [n_tokens - 1]))
        if rows and not 0 <= rows[0] <= rows[-1] < n_tokens:
            raise InvalidForward(f"logit rows {rows} outside the batch of {n_tokens}")
        if start < self._lengths[seq]:  # rejected draft tokens of the previous step
            self.truncate(seq, start)
        outputs: list[np.ndarray] = []
        for lo in range(0, n_tokens, self.n_batch):
            hi = min(lo + self.n_batch, n_tokens)
            chunk_rows = [r - lo for r in rows if lo <= r < hi]
            self._decode(seq, start + lo, hidden[lo:hi], chunk_rows)
            if self.is_last:
                outputs.extend(self._logits(r) for r in chunk_rows)
        self._lengths[seq] = start + n_tokens
        if self.is_last:
            return np.stack(outputs) if outputs else np.empty((0, self.n_vocab), np.float32)
        captured, self._captured = self._captured, []
        return np.concatenate(captured) if len(captured) > 1 else captured[0]

    def _decode(self, seq: int, start: int, hidden: np.ndarray, rows: list[int]) -> None:
        batch, n = self._batch, hidden.shape[0]
        batch.n_tokens = n
        ctypes.memmove(batch.embd, hidden.ctypes.data, hidden.nbytes)
        wanted = set(rows)
        for i in range(n):
            batch.pos[i] = start + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            # Non-last stages ask for every row: else llama.cpp prunes rows in the last
            # layer and l_out holds only the output rows.
            batch.logits[i] = (i in wanted) if self.is_last else True
        status = llama_cpp.llama_decode(self._ctx, batch)
        if status != 0:
            llama_cpp.llama_memory_seq_rm(self._mem, seq, self._lengths[seq], -1)
            self._captured = []
            raise SpecshardError(f"llama_decode failed with status {status}")

    def _logits(self, index: int) -> np.ndarray:
        ptr = llama_cpp.llama_get_logits_ith(self._ctx, index)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            llama_cpp.llama_model_free(self._model)
            self._ctx = None

    def __del__(self) -> None:
        self.close()
