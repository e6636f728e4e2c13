"""The small typed structs that travel between coordinator and workers.

Protobuf conversions of these live in one module (`cluster/wire_convert.py`); every
other module deals in these domain objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cluster.hardware import HostInfo
from cluster.sampling import SamplingParams, SparseDist


@dataclass(frozen=True)
class StepRequest:
    """One pass down the pipeline for one sequence.

    `tokens` is the prompt (prefill) or `[last token, d1..dγ]`; the last `n_draft` of
    them are draft guesses for the last worker to verify. `start` is the position of
    tokens[0]: each stage first drops whatever it holds from `start` on, which is how
    the previous step's rejected guesses leave every KV cache.
    """

    seq: int
    start: int
    tokens: list[int]
    sampling: SamplingParams
    n_draft: int = 0
    draft_dists: list[SparseDist] = field(default_factory=list)
    step_seed: int = 0  # the last worker's rng for this step: same seed, same tokens
    step_id: int = 0
    return_logits: bool = False  # the verdict carries the logits rows it was made from

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    @property
    def draft(self) -> list[int]:
        return self.tokens[len(self.tokens) - self.n_draft:] if self.n_draft else []


@dataclass(frozen=True)
class StepResult:
    """What the last worker sends back: accepted guesses plus one token of its own."""

    seq: int
    step_id: int
    accepted: list[int]
    next_token: int
    top2_gaps: list[float]  # target logit margin of each emitted token: near-tie evidence
    logits: np.ndarray | None = None  # rows × n_vocab, when the request asked for them

    @property
    def tokens(self) -> list[int]:
        return [*self.accepted, self.next_token]


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


@dataclass(frozen=True)
class LoadUpdate:
    phase: str  # CUT, LOAD, CONNECT, READY
    fraction: float
    detail: str = ""


@dataclass(frozen=True)
class Hop:
    """A step as it travels down the ring: the request, plus hidden states after stage 0.

    `cancel` drops everything the sequence holds from `request.start` on, in order with
    the steps around it (how a finished or abandoned sequence is freed).
    """

    request: StepRequest
    hidden: np.ndarray | None = None  # n_tokens × n_embd, f32
    cancel: bool = False


@dataclass(frozen=True)
class NodeInfo:
    host: HostInfo
    versions: dict[str, str]
    stage: LoadSpec | None = None
    model_n_layer: int = 0
