"""One request as the engine runs it: its tokens, what the ring holds of them, its text.

Positions: `tokens` is the prompt plus every decided token. The ring's KV caches hold
`tokens[:n_computed]` for sure; batches in flight may be extending that up to `n_sent`.
The next slice starts at `n_sent` with the tokens not sent yet — prompt chunks, or the
last decided token (and any forced ones) followed by draft guesses.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from cluster.messages import SeqResult, Slice
from cluster.sampling import SparseDist
from coordinator.engine.output import Output
from coordinator.engine.ownership import Owned
from coordinator.engine.request import EventSink, GenerationRequest, Stats
from coordinator.speculation.gamma import AcceptanceStats


@dataclass(eq=False)
class Share:
    """A prompt prefix another slot holds or is computing, to copy before the first slice
    (llama.cpp's memory seq_cp on every stage) instead of computing it again."""

    slot: int
    source: Sequence | None  # the running sequence whose prompt it is; None: a cached slot
    length: int  # positions to copy
    own: int  # positions its own slot holds (what it computes from without the copy)


@dataclass(eq=False)  # compared and hashed by identity: one object per request
class Sequence(Owned):
    """Written only by the engine's step once admitted (`Owned` checks it in tests)."""

    request: GenerationRequest
    sink: EventSink
    output: Output
    arrived: float = field(default_factory=time.perf_counter)
    slot: int = -1  # the sequence id in every stage, while running
    tokens: list[int] = field(default_factory=list)
    n_prompt: int = 0
    n_computed: int = 0
    n_sent: int = 0
    judging: bool = False  # a judged slice is in flight: the next tokens wait for it
    done: bool = False
    stats: Stats = field(default_factory=Stats)
    acceptance: AcceptanceStats = field(default_factory=AcceptanceStats)
    history: list[tuple[int, Slice]] = field(default_factory=list)  # completed, for replay
    first_token_at: float = 0.0
    last_draft: tuple[int, list[int], list[SparseDist]] | None = None  # (at, tokens, dists)
    share: Share | None = None  # a prefix to copy, until the first slice is sent
    share_ready: bool = False  # `share` can be copied now (its source has sent it)
    copy_from: int = -1  # the first slice copies positions 0 .. n_sent − 1 from this slot
    started: bool = False  # its first slice was sent

    def __post_init__(self) -> None:
        seed = self.request.sampling.seed
        # Unseeded: a base of its own, fixed for the request's life (replays reuse it).
        self.seed_base = random.getrandbits(62) if seed is None else seed
        self.tokens = list(self.request.prompt)
        self.n_prompt = len(self.tokens)
        self.stats.n_prompt_tokens = self.n_prompt

    @property
    def decoding(self) -> bool:
        """Past its prompt: it has generated its first token."""
        return len(self.tokens) > self.n_prompt

    @property
    def pending(self) -> int:
        """Decided tokens not sent to the ring yet."""
        return len(self.tokens) - self.n_sent

    @property
    def ready(self) -> bool:
        return not self.done and not self.judging and self.pending > 0 and \
            (self.share is None or self.share_ready)

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.n_prompt

    def step_seed(self) -> int:
        """The last worker's seed for this sequence's next judged slice.

        A function of the request's seed and the step number, so a step re-sent after a
        worker loss draws exactly what it would have drawn."""
        if self.request.sampling.greedy:
            return 0  # greedy verification draws nothing
        # Python hashes tuples of ints the same in every process and run (no
        # PYTHONHASHSEED for ints); 70 µs a step cheaper than a numpy SeedSequence.
        return hash((self.seed_base, self.stats.steps)) & 0x7FFF_FFFF_FFFF_FFFF

    def confirm(self, piece: Slice, result: SeqResult | None) -> list[int]:
        """A batch holding `piece` came back: what the ring now holds, tokens decided."""
        if not piece.tokens:
            return []
        if result is None:  # a prompt chunk
            self.n_computed = max(self.n_computed, piece.end)
            return []
        self.judging = False
        kept = piece.end - piece.n_draft + len(result.accepted)
        self.n_computed = kept
        self.n_sent = kept
        return result.tokens

    def reuse(self, held: int, prefix: list[tuple[int, Slice]]) -> None:
        """The slot's caches already hold the first `held` tokens (a cached prompt):
        only the rest is sent; `prefix` replays them after a worker loss."""
        self.n_computed = self.n_sent = held
        self.stats.n_cached_tokens = held
        self.history = list(prefix)

    def rewind(self) -> None:
        """The batches in flight are lost: send again from what the ring surely holds."""
        self.n_sent = self.n_computed
        self.judging = False
