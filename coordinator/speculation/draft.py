"""The draft model: a small model of the target's family, run in-process on the coordinator,
and the check that its vocabulary speaks the target's."""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np

from cluster.constrain import masked
from cluster.errors import SpecshardError
from cluster.gguf_file import GGUFHeader, read_header
from cluster.llama.backend import free, logits_row
from cluster.llama.context import ContextConfig, decode_calls, open_context
from cluster.sampling import SamplingParams, SparseDist, filtered_probs, sample, transform
from coordinator.speculation.drafting import Draft, DraftRequest, common_prefix

log = logging.getLogger(__name__)

# llama.cpp common/speculative.cpp, common_speculative_are_compatible.
MIN_COPY = 32  # prefix positions worth copying from another slot, not computing
SPEC_VOCAB_MAX_SIZE_DIFFERENCE = 128
SPEC_VOCAB_CHECK_START_TOKEN_ID = 5


def token_texts(header: GGUFHeader) -> list[bytes]:
    """`tokenizer.ggml.tokens`, parsed from its raw bytes (the header keeps only its length)."""
    raw = header.raw_kv.get("tokenizer.ggml.tokens")
    if raw is None:
        return []
    (key_len,) = struct.unpack_from("<Q", raw, 0)
    pos = 8 + key_len + 4 + 4  # key, value type (array), item type (string)
    (count,) = struct.unpack_from("<Q", raw, pos)
    pos += 8
    out = []
    for _ in range(count):
        (n,) = struct.unpack_from("<Q", raw, pos)
        out.append(raw[pos + 8:pos + 8 + n])
        pos += 8 + n
    return out


def check_vocab(target_path: Path, draft_path: Path) -> None:
    """Raise unless the draft's tokens mean what the target's do (llama.cpp's rule)."""
    target, draft = read_header(target_path), read_header(draft_path)
    tv, dv = target.values, draft.values
    name = f"draft {draft_path.name} and target {target_path.name}"
    kind = "tokenizer.ggml.model"
    if tv.get(kind) != dv.get(kind):
        raise SpecshardError(f"{name} have different vocabulary types "
                             f"({dv.get(kind)} vs {tv.get(kind)}): the draft cannot speculate")
    for key in ("tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        if tv.get(key) != dv.get(key):
            raise SpecshardError(f"{name} differ in {key} ({dv.get(key)} vs {tv.get(key)})")
    t_tokens, d_tokens = token_texts(target), token_texts(draft)
    if abs(len(t_tokens) - len(d_tokens)) > SPEC_VOCAB_MAX_SIZE_DIFFERENCE:
        raise SpecshardError(
            f"{name} have vocabularies of {len(d_tokens)} and {len(t_tokens)} tokens; at most "
            f"{SPEC_VOCAB_MAX_SIZE_DIFFERENCE} may differ")
    n = min(len(t_tokens), len(d_tokens))
    start = SPEC_VOCAB_CHECK_START_TOKEN_ID
    if t_tokens[start:n] != d_tokens[start:n]:
        i = next(i for i in range(start, n) if t_tokens[i] != d_tokens[i])
        raise SpecshardError(f"{name} disagree on token {i}: draft {d_tokens[i]!r}, "
                             f"target {t_tokens[i]!r}")


@dataclass(frozen=True)
class DraftConfig:
    path: Path
    n_ctx: int = 4096  # per sequence
    n_seq_max: int = 1  # sequences drafted at once: the engine's --parallel
    n_batch: int = 512
    n_threads: int = 2
    n_gpu_layers: int = 999  # the draft sits on the coordinator's GPU when there is one
    # Guesses are drawn from (and sent with) the draft's `dist_top` likeliest tokens; 0: all.
    dist_top: int = 64


def draft_dist(row: np.ndarray, sampling: SamplingParams, limit: int,
               tokens: Sequence[int] = ()) -> SparseDist:
    """The draft's filtered distribution over its `limit` likeliest tokens, after the
    request's logit bias and penalties over `tokens` (the sequence so far, the guesses
    before this one included: the target's row for this guess is penalised alike).

    The rule is exact for any draft distribution, provided the guess is drawn from the
    one sent with it; so the cut costs only the tail's acceptance. It bounds what travels
    to the last worker (a whole 152k-token distribution is 2.4 MB per guess) and replaces
    a sort of the vocabulary (≈19 ms here) by a partition.
    """
    row = transform(row, sampling, tokens)
    if limit <= 0 or limit >= row.size:
        return filtered_probs(row, sampling)
    candidates = np.argpartition(row, -limit)[-limit:]
    sub = filtered_probs(row[candidates], sampling)
    return SparseDist(candidates[sub.ids].astype(np.int64), sub.probs)


class DraftModel:
    """A `Drafter` backed by a small GGUF model: one set of weights for every sequence.

    Each sequence slot has its own KV stream (`kv_unified=false`, as on the stages), kept
    in step with the sequence: a proposal reuses the longest common prefix of what the
    slot has decoded, drops the rest (rejected guesses), decodes the new tokens of every
    sequence in one batch, then guesses position by position — one batched decode per
    position for all sequences still drafting. Greedy guesses are the argmax; sampled
    ones are drawn from the same filtered distribution the target will use, which
    travels with the guess for the rejection rule.
    """

    def __init__(self, config: DraftConfig) -> None:
        self.config = config
        # flash_attn None: llama.cpp's own choice, as the draft always had.
        lc = open_context(config.path, ContextConfig(
            n_ctx=config.n_ctx, n_seq_max=config.n_seq_max, n_batch=config.n_batch,
            n_threads=config.n_threads, n_gpu_layers=config.n_gpu_layers, flash_attn=None),
            "the draft model")
        self._model, self._ctx, self._mem = lc.model, lc.ctx, lc.mem
        self.n_vocab = lc.n_vocab
        self.n_ctx = llama_cpp.llama_n_ctx_seq(self._ctx)
        self.n_batch = lc.n_batch  # clamped to n_ctx by llama.cpp
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        # The tokens whose K/V each slot's stream holds.
        self.decoded: list[list[int]] = [[] for _ in range(config.n_seq_max)]
        self.copied = 0  # prefix positions copied between slots, not computed

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        drafts = {r.seq: Draft([], []) for r in requests}
        # γ guesses need positions up to len(context) + γ − 2 in the draft's cache.
        gammas = {r.seq: min(r.gamma, self.n_ctx - len(r.context) + 1) for r in requests}
        active = [r for r in requests if gammas[r.seq] > 0 and r.context]
        if not active:
            return [drafts[r.seq] for r in requests]
        rows = self._sync({r.seq: r.context for r in active})
        # Streams of their own: the verifier may draw from a generator seeded like `rng`.
        rngs = {r.seq: r.rng.spawn(1)[0] for r in active}
        for i in range(max(gammas[r.seq] for r in active)):
            step = []
            for r in active:
                if i >= gammas[r.seq]:
                    continue
                row = rows[r.seq]
                if r.constraint is not None:  # guess under the grammar's mask
                    row = masked(row, r.constraint.mask())
                dist = draft_dist(row, r.sampling, self.config.dist_top,
                                  [*r.context, *drafts[r.seq].tokens]
                                  if r.sampling.transforms else ())
                token = sample(dist, rngs[r.seq])
                if r.constraint is not None and not r.constraint.push(token):
                    gammas[r.seq] = i  # the mask allowed nothing: no more guesses
                    continue
                drafts[r.seq].tokens.append(token)
                drafts[r.seq].dists.append(dist)
                if i < gammas[r.seq] - 1:
                    step.append((r.seq, [token]))
            if step:
                rows.update(self._decode(step))
        for r in active:  # the guesses leave the grammar's state as it was
            if r.constraint is not None:
                r.constraint.pop(len(drafts[r.seq].tokens))
        return [drafts[r.seq] for r in requests]

    def _sync(self, contexts: dict[int, list[int]]) -> dict[int, np.ndarray]:
        """Make each slot hold exactly its context; the logits after its last token."""
        copied: set[int] = set()
        for seq, context in contexts.items():  # copies first: a truncation below may
            self._copy_prefix(seq, context, copied)  # drop what a source holds
        todo = []
        for seq, context in contexts.items():
            # The last token is decoded again when already held: its logits were not kept.
            keep = min(common_prefix(self.decoded[seq], context), len(context) - 1)
            self.truncate(seq, keep)
            todo.append((seq, context[keep:]))
        return self._decode(todo)

    def _copy_prefix(self, seq: int, context: list[int], copied: set[int]) -> None:
        """When another slot holds a longer prefix of `context` (a system prompt two
        conversations share), copy it (the stages do the same; llama.cpp copies the
        stream at the next decode) instead of computing it again."""
        own = common_prefix(self.decoded[seq], context)
        best, best_n = -1, own
        for other, held in enumerate(self.decoded):
            if other != seq and other not in copied:
                n = common_prefix(held, context)
                if n > best_n:
                    best, best_n = other, n
        best_n = min(best_n, len(context) - 1)
        if best < 0 or best_n < own + MIN_COPY:
            return
        llama_cpp.llama_memory_seq_rm(self._mem, seq, -1, -1)
        llama_cpp.llama_memory_seq_cp(self._mem, best, seq, -1, -1)
        llama_cpp.llama_memory_seq_rm(self._mem, seq, best_n, -1)
        self.decoded[seq] = self.decoded[best][:best_n]
        self.copied += best_n - own
        copied.add(seq)

    def release(self, seq: int) -> None:
        self.truncate(seq, 0)

    def truncate(self, seq: int, length: int) -> None:
        """Forget the slot's positions ≥ length."""
        if length < len(self.decoded[seq]):
            llama_cpp.llama_memory_seq_rm(self._mem, seq, length, -1)
            del self.decoded[seq][length:]

    def _decode(self, work: list[tuple[int, list[int]]]) -> dict[int, np.ndarray]:
        """Append tokens to slots; the logits after each slot's last token. The calls
        keep llama.cpp's ubatches in row order (`cluster.llama.context.decode_calls`)."""
        work = [(seq, tokens) for seq, tokens in work if tokens]
        rows: dict[int, np.ndarray] = {}
        for call in decode_calls([len(t) for _, t in work], [seq for seq, _ in work],
                                 self.n_batch):
            rows.update(self._call([(work[i][0], work[i][1][lo:hi], hi == len(work[i][1]))
                                    for i, lo, hi in call]))
        return rows

    def _call(self, work: list[tuple[int, list[int], bool]]) -> dict[int, np.ndarray]:
        """One llama_decode of at most n_batch rows; the logits after the last row of each
        piece whose flag asks for them (a slot's last piece)."""
        batch, at, last_of = self._batch, 0, {}
        for seq, tokens, wanted in work:
            for k, token in enumerate(tokens):
                batch.token[at], batch.pos[at] = token, len(self.decoded[seq]) + k
                batch.n_seq_id[at], batch.seq_id[at][0] = 1, seq
                batch.logits[at] = wanted and k == len(tokens) - 1
                at += 1
            if wanted:
                last_of[seq] = at - 1
        batch.n_tokens = at
        status = llama_cpp.llama_decode(self._ctx, batch)
        if status != 0:
            for seq, _, _ in work:  # drop whatever of the failed call reached the cache
                llama_cpp.llama_memory_seq_rm(self._mem, seq, len(self.decoded[seq]), -1)
            raise SpecshardError(f"draft llama_decode failed with status {status}")
        rows = {}
        for seq, tokens, _ in work:
            self.decoded[seq].extend(tokens)
        for seq, index in last_of.items():
            rows[seq] = logits_row(self._ctx, index, self.n_vocab)
        return rows

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            free(self._batch, self._ctx, self._model)
            self._ctx = None

    def __del__(self) -> None:
        self.close()
