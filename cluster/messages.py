"""The small typed structs that travel between coordinator and workers.

Protobuf conversions of these live in one module (`cluster/wire_convert.py`); every
other module deals in these domain objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cluster.hardware import HostInfo
from cluster.rope import RopeParams
from cluster.sampling import SamplingParams, SparseDist


@dataclass(frozen=True)
class Slice:
    """One sequence's rows in a batch: contiguous positions start .. end − 1.

    `tokens` are the sequence's tokens not yet in the KV caches (the last one decided,
    or a chunk of the prompt) followed by `n_draft` draft guesses. Each stage first drops
    whatever it holds of `seq` from `start` on, which is how the previous step's rejected
    guesses leave every KV cache; a slice without tokens does only that (with
    `copy_from`, it moves an idle cache into `seq`).
    """

    seq: int
    start: int
    tokens: list[int]
    sampling: SamplingParams = SamplingParams()
    n_draft: int = 0
    draft_dists: list[SparseDist] = field(default_factory=list)
    step_seed: int = 0  # the last worker's rng for this slice: same seed, same tokens
    judge: bool = True  # the last worker verifies and answers (False: a prompt chunk)
    return_logits: bool = False  # the answer carries the judged rows' logits
    # Constrained decoding: one packed bit mask per judged row (`cluster.constrain`), the
    # tokens the grammar allows there; empty: no constraint.
    masks: list[bytes] = field(default_factory=list)
    # Every stage first makes `seq` hold what sequence `copy_from` holds at positions
    # 0 .. start − 1 (a shared prompt prefix: llama.cpp's memory seq_cp); copies run first,
    # in slice order; -1: no copy.
    copy_from: int = -1
    # Run-ahead speculation: a draft guess for the position after the last row, judged at
    # that row instead of drawing a bonus token (the next window, already sent, starts
    # with it); `draft_dists` then has n_draft + 1 entries. -1: none.
    link: int = -1
    # The run-ahead chain this judged window belongs to, unique in the engine's life; the
    # last worker skips a chain's windows once a verdict of its own broke it. -1: none.
    chain: int = -1

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    @property
    def draft(self) -> list[int]:
        return self.tokens[len(self.tokens) - self.n_draft:] if self.n_draft else []

    @property
    def guesses(self) -> list[int]:
        """What the judged rows verify: the guesses among the rows, then the link."""
        return [*self.draft, self.link] if self.link >= 0 else self.draft

    @property
    def judged_rows(self) -> list[int]:
        """Rows (within the slice) whose logits the verdict needs: the last pending
        token's and every guess's."""
        if not self.judge or not self.tokens:
            return []
        n = len(self.tokens)
        return list(range(n - self.n_draft - 1, n))


@dataclass(frozen=True)
class Batch:
    """A micro-batch: the rows of several sequences, computed together by every stage."""

    batch_id: int
    slices: list[Slice]

    @property
    def n_rows(self) -> int:
        return sum(len(s.tokens) for s in self.slices)


@dataclass(frozen=True)
class TokenLogprobs:
    """One emitted token's log probability under the target (log softmax of its raw
    logits, before penalties and filters) and the likeliest tokens', most likely first."""

    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(frozen=True)
class SeqResult:
    """The last worker's verdict on one judged slice: accepted guesses plus one token —
    none when every guess was accepted, a slice's link included (`next_token` −1)."""

    seq: int
    accepted: list[int]
    next_token: int  # the correction or the bonus token; -1: none (the link accepted)
    top2_gaps: list[float]  # target logit margin of each emitted token: near-tie evidence
    logits: np.ndarray | None = None  # judged rows × n_vocab, when the slice asked
    error: str = ""  # this slice alone could not be judged: why (the rest were)
    # One per emitted token (`tokens`), when the request asked (SamplingParams.logprobs).
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    # Not computed: a stale run-ahead window the last worker skipped (early cancellation).
    skipped: bool = False

    @property
    def breaks_chain(self) -> bool:
        """The windows sent behind this one are stale: they assumed every guess and the
        link accepted (no token drawn), and this verdict says otherwise. The coordinator
        and the last worker both decide by it."""
        return self.next_token >= 0 or bool(self.error) or self.skipped

    @property
    def tokens(self) -> list[int]:
        return [*self.accepted, self.next_token] if self.next_token >= 0 else self.accepted


@dataclass(frozen=True)
class BatchResult:
    batch_id: int
    results: list[SeqResult]  # one per judged slice, in slice order
    # (llama_decode ms, busy ms) of every worker, in ring order: what the batch cost
    times: list[tuple[float, float]] = field(default_factory=list)


@dataclass(frozen=True)
class Activations:
    """A batch as it travels down the ring: hidden states after stage 0 (f32 rows)."""

    batch: Batch
    hidden: np.ndarray | None = None  # Σ rows × n_embd, f32 (None into the first stage)
    times: list[tuple[float, float]] = field(default_factory=list)  # (stage, busy) ms each


@dataclass(frozen=True)
class Peer:
    """The next worker down the ring, as the worker before it dials it."""

    address: str  # host:port
    tls: bool = False
    server_name: str = ""  # TLS name override, when certificates name hosts differently


@dataclass(frozen=True)
class LoadSpec:
    """Which stage a worker should load, and how."""

    model_path: str  # on the worker's disk; "demo" = the demo target
    begin: int
    end: int
    n_ctx: int = 4096  # per sequence
    n_seq_max: int = 1
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool = False
    n_threads: int = 2
    downstream: Peer | None = None  # None on the last stage
    wire_f16: bool = False  # send hidden states downstream as f16 (halves the bytes)
    rope: RopeParams | None = None  # resolved by the coordinator; None: the model's own


@dataclass(frozen=True)
class LoadUpdate:
    phase: str  # CUT, LOAD, CONNECT, READY
    fraction: float
    detail: str = ""


@dataclass(frozen=True)
class NodeInfo:
    host: HostInfo
    versions: dict[str, str]
    stage: LoadSpec | None = None
    model_n_layer: int = 0
    capture: str = ""  # how the stage's output is read: "c", "python", or "" (last stage)
