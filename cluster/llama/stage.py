"""A pipeline stage: a range of layers run by llama.cpp on embeddings in, hidden
states (or logits, on the last stage) out. See docs/architecture.md, "Stages".

A batch holds the rows of several sequences, computed in the llama_decode calls
`cluster.llama.context.decode_calls` lays out (why: that module's docstring); the outputs
are put back in the batch's row order. The last stage also keeps each sequence's tokens
(what its slices carried, cut at each slice's start): the penalties of the verdict are
computed from them.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np

from cluster.errors import InvalidForward, SpecshardError
from cluster.gguf_file import read_header
from cluster.llama.backend import free, logits_rows
from cluster.llama.capture import Capture, make_capture
from cluster.llama.context import ContextConfig, decode_calls, open_context
from cluster.llama.ggml import row_to_float
from cluster.messages import Slice
from cluster.model_info import KvType, TokenEmbedding
from cluster.rope import RopeParams

log = logging.getLogger(__name__)


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
    rope: RopeParams | None = None  # None: the model's own values

    def __post_init__(self) -> None:
        if self.type_v is not KvType.F16 and not self.flash_attn:
            raise SpecshardError("a quantized V cache needs flash attention")


class Stage:
    """One loaded stage with its own llama_context and one KV stream per sequence."""

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
        self.embedding: TokenEmbedding | None = None
        if self.is_first:
            if config.model_path is None:
                raise SpecshardError("the first stage needs the full model for token_embd")
            self.embedding = TokenEmbedding(read_header(config.model_path), row_to_float)
        self.capture: Capture | None = None
        self._load()

    def _load(self) -> None:
        c = self.config

        def install_capture(model: object, cparams: object) -> None:
            if not self.is_last:  # the last layer's output, read by the eval callback
                self.capture = make_capture(f"l_out-{self.n_layer - 1}".encode(),
                                            llama_cpp.llama_model_n_embd(model), c.n_batch)
                self.capture.install(cparams)

        lc = open_context(c.stage_path, ContextConfig(
            n_ctx=c.n_ctx, n_seq_max=c.n_seq_max, n_batch=c.n_batch, n_threads=c.n_threads,
            rope=c.rope, type_k=c.type_k.ggml_type, type_v=c.type_v.ggml_type,
            flash_attn=c.flash_attn), "the stage", install_capture)
        self._model, self._ctx, self._mem = lc.model, lc.ctx, lc.mem
        self.n_embd, self.n_vocab = lc.n_embd, lc.n_vocab
        # llama.cpp pads the context (to 256); the limit is what was asked for.
        self.n_ctx_seq = lc.n_ctx_seq
        # llama.cpp clamps n_batch to n_ctx: chunk by what it really took.
        self.n_batch = lc.n_batch
        self._batch = llama_cpp.llama_batch_init(self.n_batch, self.n_embd, 1)
        self._embd = ctypes.cast(self._batch.embd, ctypes.c_void_p).value or 0
        self._lengths = [0] * c.n_seq_max
        # The last stage: each sequence's tokens, position by position.
        self._tokens: list[list[int]] = [[] for _ in range(c.n_seq_max)]

    # --- sequences ---------------------------------------------------------------------

    def length(self, seq: int) -> int:
        self._check_seq(seq)
        return self._lengths[seq]

    def tokens(self, seq: int) -> list[int]:
        """The tokens at the sequence's positions (kept by the last stage only; the
        penalties of its verdicts are computed from them). Not a copy."""
        self._check_seq(seq)
        return self._tokens[seq]

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
        del self._tokens[seq][length:]

    def copy(self, src: int, dst: int, length: int) -> None:
        """Make `dst` hold what `src` holds at positions 0 .. length − 1 (a shared prompt
        prefix). With a KV stream per sequence llama.cpp copies the whole stream's
        buffers, at the start of the next llama_decode: on a GPU a few ms against the
        seconds of computing a long prefix again (docs/scheduler.md, "Shared prefixes")."""
        self._check_seq(src)
        self._check_seq(dst)
        if src == dst or not 0 <= length <= self._lengths[src]:
            raise InvalidForward(f"cannot copy {length} positions of sequence {src} "
                                 f"(it holds {self._lengths[src]}) into sequence {dst}")
        llama_cpp.llama_memory_seq_rm(self._mem, dst, -1, -1)
        llama_cpp.llama_memory_seq_cp(self._mem, src, dst, -1, -1)
        llama_cpp.llama_memory_seq_rm(self._mem, dst, length, -1)
        self._lengths[dst] = length
        self._tokens[dst] = self._tokens[src][:length]

    # --- batches -----------------------------------------------------------------------

    def validate(self, slices: list[Slice], n_floats: int | None) -> None:
        """Raise InvalidForward unless the whole batch fits; checked before any change."""
        seen: set[int] = set()
        copied: dict[int, int] = {}  # lengths after the copies, made first in slice order
        for s in slices:
            self._check_seq(s.seq)
            if s.seq in seen:
                raise InvalidForward(f"sequence {s.seq} appears twice in one batch")
            seen.add(s.seq)
            if s.copy_from >= 0:
                self._check_seq(s.copy_from)
                held = copied.get(s.copy_from, self._lengths[s.copy_from])
                if s.copy_from == s.seq or s.start > held:
                    raise InvalidForward(
                        f"sequence {s.seq} cannot copy {s.start} positions from sequence "
                        f"{s.copy_from}, which holds {held}")
                copied[s.seq] = s.start
        for s in slices:
            if s.copy_from < 0 and not 0 <= s.start <= self._lengths[s.seq]:
                raise InvalidForward(
                    f"positions must continue sequence {s.seq} at or before "
                    f"{self._lengths[s.seq]}, got {s.start}")
            if s.end > self.n_ctx_seq:
                raise InvalidForward(
                    f"positions {s.start}..{s.end - 1} of sequence {s.seq} exceed the "
                    f"context of {self.n_ctx_seq} tokens")
            if s.tokens and not 0 <= s.n_draft < len(s.tokens):
                raise InvalidForward(f"{s.n_draft} draft guesses in a slice of "
                                     f"{len(s.tokens)} tokens")
        n_rows = sum(len(s.tokens) for s in slices)
        if n_floats is not None and n_floats != n_rows * self.n_embd:
            raise InvalidForward(
                f"hidden states hold {n_floats} values, expected {n_rows} × {self.n_embd}")

    def forward(self, slices: list[Slice], hidden: np.ndarray | None = None,
                borrow: bool = False) -> np.ndarray | list[np.ndarray]:
        """Run the stage's layers on every slice's rows; all or nothing.

        The first stage embeds the slices' tokens (`hidden` None); the others take the
        previous stage's hidden states, Σ rows × n_embd f32 in slice order. Non-last
        stages return their hidden states in the same order; the last returns, per
        slice, the logits of its judged rows (judged rows × n_vocab; none when not
        judged). Positions a sequence holds from its slice's start on are dropped first.
        `borrow`: a batch decoded in one call may return views of llama.cpp's logits
        buffer instead of copies, valid until this stage's next decode (the worker judges
        them at once: one pass less over ~600 KB a row).
        """
        if self.is_first:
            if hidden is not None:
                raise InvalidForward("the first stage takes token ids, not hidden states")
            hidden = self._embed(slices)
        elif hidden is None:
            raise InvalidForward("this stage takes hidden states, none were sent")
        self.validate(slices, hidden.size)
        n_rows = sum(len(s.tokens) for s in slices)
        hidden = np.ascontiguousarray(hidden, dtype=np.float32).reshape(n_rows, self.n_embd)
        for s in slices:  # copies first: a slice below may drop what its source holds
            if s.copy_from >= 0:
                self.copy(s.copy_from, s.seq, s.start)
        for s in slices:
            if s.start < self._lengths[s.seq]:  # rejected guesses of the previous step
                self.truncate(s.seq, s.start)
        offsets = np.cumsum([0, *(len(s.tokens) for s in slices)])
        out = None if self.is_last else np.empty((n_rows, self.n_embd), np.float32)
        logits: list[list[np.ndarray]] = [[] for _ in slices]  # per slice, per call
        try:
            calls = self._calls(slices)
            for call in calls:
                rows = [(int(offsets[i]) + lo, int(offsets[i]) + hi) for i, lo, hi in call]
                got = self._decode(slices, call, hidden, rows, borrow and len(calls) == 1)
                if out is not None:
                    assert isinstance(got, np.ndarray)
                    at = 0
                    for a, b in rows:
                        out[a:b] = got[at:at + b - a]
                        at += b - a
                else:
                    assert isinstance(got, list)
                    for (i, _, _), rows_of in zip(call, got, strict=True):
                        logits[i].append(rows_of)
        except BaseException:
            for s in slices:  # what reached the caches is not valid: back to the start
                llama_cpp.llama_memory_seq_rm(self._mem, s.seq, s.start, -1)
                self._lengths[s.seq] = s.start
                del self._tokens[s.seq][s.start:]
            raise
        for s in slices:
            self._lengths[s.seq] = s.end
            if self.is_last:
                held = self._tokens[s.seq]
                del held[s.start:]
                held.extend(s.tokens)
        if out is not None:
            return out
        # A slice decoded in one call (every decode step) keeps its array: one copy of
        # the logits (~600 KB a row at a 152k vocabulary), not two.
        return [parts[0] if len(parts) == 1 else np.concatenate(parts) if parts
                else np.empty((0, self.n_vocab), np.float32) for parts in logits]

    def _embed(self, slices: list[Slice]) -> np.ndarray:
        assert self.embedding is not None
        tokens = np.asarray([t for s in slices for t in s.tokens], dtype=np.int64)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.embedding.n_vocab):
            raise InvalidForward(f"token id out of range 0..{self.embedding.n_vocab - 1}")
        if not tokens.size:
            return np.empty((0, self.n_embd), np.float32)
        return self.embedding.lookup(tokens)

    def _calls(self, slices: list[Slice]) -> list[list[tuple[int, int, int]]]:
        """The llama_decode calls: lists of (slice index, lo, hi) row pieces."""
        return decode_calls([len(s.tokens) for s in slices], [s.seq for s in slices],
                            self.n_batch)

    def _decode(self, slices: list[Slice], call: list[tuple[int, int, int]],
                hidden: np.ndarray, rows: list[tuple[int, int]], borrow: bool = False
                ) -> np.ndarray | list[np.ndarray]:
        batch, at = self._batch, 0
        wanted: list[list[int]] = []
        for (i, lo, hi), (a, b) in zip(call, rows, strict=True):
            s = slices[i]
            judged = {r - lo for r in s.judged_rows if lo <= r < hi}
            wanted.append([])
            ctypes.memmove(self._embd + 4 * at * self.n_embd, hidden[a:b].ctypes.data,
                           4 * (b - a) * self.n_embd)
            for k in range(hi - lo):
                batch.pos[at] = s.start + lo + k
                batch.n_seq_id[at] = 1
                batch.seq_id[at][0] = s.seq
                # Non-last stages ask for every row: else llama.cpp prunes rows in the
                # last layer and l_out holds only the output rows.
                batch.logits[at] = (k in judged) if self.is_last else True
                if self.is_last and k in judged:
                    wanted[-1].append(at)
                at += 1
        batch.n_tokens = at
        if self.capture is not None:
            self.capture.reset()
        status = llama_cpp.llama_decode(self._ctx, batch)
        if status != 0:
            raise SpecshardError(f"llama_decode failed with status {status}")
        if self.capture is not None:
            captured = self.capture.rows()
            if len(captured) != at:
                raise SpecshardError(f"captured {len(captured)} rows of a batch of {at}")
            return captured
        return [logits_rows(self._ctx, rows_of, self.n_vocab, borrow) for rows_of in wanted]

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            free(self._batch, self._ctx, self._model)
            self._ctx = None

    def __del__(self) -> None:
        self.close()
