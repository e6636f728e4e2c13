"""The draft model: a small model of the target's family, run in-process on the coordinator.

`ModelDrafter` keeps its own llama.cpp context and KV cache in step with the sequence:
each `propose` reuses the longest common prefix of what it has decoded, drops the rest
(rejected guesses) with `llama_memory_seq_rm`, decodes only the new tokens, then guesses
γ tokens — argmax when greedy, else a draw from the same filtered distribution the
target will use, which travels with the guess for the rejection rule.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np

from cluster.errors import SpecshardError
from cluster.gguf_file import GGUFHeader, read_header
from cluster.sampling import SamplingParams, SparseDist, filtered_probs, sample
from coordinator.gamma import GammaConfig, GammaController
from coordinator.generate import Draft
from worker.stage import init_backend

log = logging.getLogger(__name__)

# llama.cpp common/speculative.cpp, common_speculative_are_compatible.
SPEC_VOCAB_MAX_SIZE_DIFFERENCE = 128
SPEC_VOCAB_CHECK_START_TOKEN_ID = 5
_SEQ = 0  # one sequence per drafter: a drafter follows one generation


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
    n_ctx: int = 4096
    n_batch: int = 512
    n_threads: int = 2
    n_gpu_layers: int = 999  # the draft sits on the coordinator's GPU when there is one
    # Guesses are drawn from (and sent with) the draft's `dist_top` likeliest tokens; 0: all.
    dist_top: int = 64


def draft_dist(row: np.ndarray, sampling: SamplingParams, limit: int) -> SparseDist:
    """The draft's filtered distribution over its `limit` likeliest tokens.

    The rule is exact for any draft distribution, provided the guess is drawn from the
    one sent with it; so the cut costs only the tail's acceptance. It bounds what travels
    to the last worker (a whole 152k-token distribution is 2.4 MB per guess) and replaces
    a sort of the vocabulary (≈19 ms here) by a partition.
    """
    if limit <= 0 or limit >= row.size:
        return filtered_probs(row, sampling)
    candidates = np.argpartition(row, -limit)[-limit:]
    sub = filtered_probs(row[candidates], sampling)
    return SparseDist(candidates[sub.ids].astype(np.int64), sub.probs)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    return int(np.argmax(np.asarray(a[:n]) != np.asarray(b[:n])))


class ModelDrafter:
    """A `Drafter` backed by a small GGUF model."""

    def __init__(self, config: DraftConfig, gamma: GammaController | None = None) -> None:
        self.config = config
        self.gamma = gamma or GammaController(GammaConfig())
        init_backend()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = config.n_gpu_layers
        self._model = llama_cpp.llama_model_load_from_file(str(config.path).encode(), mparams)
        if not self._model:
            raise SpecshardError(f"llama.cpp could not load the draft model {config.path}")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self._model))
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = config.n_ctx
        cparams.n_batch = cparams.n_ubatch = config.n_batch
        cparams.n_seq_max = 1
        cparams.n_threads = cparams.n_threads_batch = config.n_threads
        cparams.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise SpecshardError("llama.cpp could not create a context for the draft model")
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self.n_ctx = llama_cpp.llama_n_ctx(self._ctx)
        self.n_batch = llama_cpp.llama_n_batch(self._ctx)  # clamped to n_ctx by llama.cpp
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.decoded: list[int] = []  # the tokens whose K/V the draft's cache holds

    def propose(self, context: list[int], sampling: SamplingParams,
                rng: np.random.Generator) -> Draft:
        # γ guesses need positions up to len(context) + γ − 2 in the draft's cache.
        gamma = min(self.gamma.next_gamma(), self.n_ctx - len(context) + 1)
        if gamma <= 0 or not context:
            log.debug("no draft: %d context tokens, the draft holds %d", len(context), self.n_ctx)
            return Draft([], [])
        # A stream of our own: the verifier may draw from a generator seeded like `rng`.
        rng = rng.spawn(1)[0]
        row = self._sync(context)
        tokens: list[int] = []
        dists: list[SparseDist] = []
        for i in range(gamma):
            dist = draft_dist(row, sampling, self.config.dist_top)
            tokens.append(sample(dist, rng))
            dists.append(dist)
            if i < gamma - 1:
                row = self._decode([tokens[-1]], len(self.decoded))
        return Draft(tokens, dists)

    def observe(self, context: list[int], n_proposed: int, n_accepted: int,
                draft_s: float, verify_s: float) -> None:
        self.gamma.observe(n_proposed, n_accepted, draft_s, verify_s)

    def _sync(self, context: list[int]) -> np.ndarray:
        """Make the cache hold exactly `context`; return the logits after its last token."""
        # The last token is decoded again when already held: its logits were not kept.
        keep = min(common_prefix(self.decoded, context), len(context) - 1)
        self.truncate(keep)
        return self._decode(context[keep:], keep)

    def truncate(self, length: int) -> None:
        """Forget positions ≥ length."""
        if length < len(self.decoded):
            llama_cpp.llama_memory_seq_rm(self._mem, _SEQ, length, -1)
            del self.decoded[length:]

    def _decode(self, tokens: list[int], start: int) -> np.ndarray:
        """Decode tokens at positions start..; the logits after the last one."""
        batch = self._batch
        for lo in range(0, len(tokens), self.n_batch):
            chunk = tokens[lo:lo + self.n_batch]
            batch.n_tokens = len(chunk)
            for i, token in enumerate(chunk):
                batch.token[i] = token
                batch.pos[i] = start + lo + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = _SEQ
                batch.logits[i] = lo + i == len(tokens) - 1
            status = llama_cpp.llama_decode(self._ctx, batch)
            if status != 0:
                # Drop whatever of the failed chunk reached the cache.
                llama_cpp.llama_memory_seq_rm(self._mem, _SEQ, len(self.decoded), -1)
                raise SpecshardError(f"draft llama_decode failed with status {status}")
            self.decoded.extend(chunk)
        ptr = llama_cpp.llama_get_logits_ith(self._ctx, batch.n_tokens - 1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            llama_cpp.llama_model_free(self._model)
            self._ctx = None

    def __del__(self) -> None:
        self.close()

