"""One request as the engine runs it: its tokens, what the ring holds of them, its text.

Positions: `tokens` is the prompt plus every decided token. The ring's KV caches hold
`tokens[:n_computed]` for sure; batches in flight may be extending that up to `n_sent`.
The next slice starts at `n_sent` with the tokens not sent yet — prompt chunks, or the
last decided token (and any forced ones) followed by draft guesses.

Run-ahead speculation (docs/scheduler.md, "Run-ahead windows"): a window may end with a
link — a guess for the position after its last row, judged there — and the next window,
sent before the verdict, starts with that link. `ahead` holds the guesses sent past the
decided tokens, the chain the windows in flight assume; a verdict that breaks it (a
rejection, forced tokens) gives it a new `chain`, and the windows sent on the old chain
are stale. Chain ids are never reused, in this process or (w.h.p.) another: every judged
window carries its chain, and the last worker skips the windows of a chain one of its
verdicts broke (docs/scheduler.md, "Early cancellation").
"""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass, field

from cluster.messages import SeqResult, Slice
from cluster.sampling import SparseDist
from coordinator.engine.output import Output
from coordinator.engine.ownership import Owned
from coordinator.engine.request import EventSink, GenerationRequest, Stats
from coordinator.speculation.gamma import AcceptanceStats

# A random start: a worker that outlives one coordinator meets another's chains.
_chains = itertools.count(random.getrandbits(40) << 20)


def new_chain() -> int:
    return next(_chains)


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
    flying: int = 0  # judged windows of the current chain in flight
    depth: int = 1  # judged windows it may have in flight (1: synchronous speculation)
    ahead: list[int] = field(default_factory=list)  # guesses sent past `tokens`, in order
    linked: bool = False  # the last window sent ends with a link: the next may follow it
    chain: int = field(default_factory=new_chain)  # renewed when a verdict breaks `ahead`
    done: bool = False
    stats: Stats = field(default_factory=Stats)
    acceptance: AcceptanceStats = field(default_factory=AcceptanceStats)
    history: list[tuple[int, Slice]] = field(default_factory=list)  # completed, for replay
    first_token_at: float = 0.0
    # Drafts by (tokens decided, guesses sent) when drafted: a window re-sent after a
    # worker loss reuses its guesses (those of windows older than the decided tokens go).
    drafts: dict[tuple[int, int], tuple[list[int], list[SparseDist]]] = \
        field(default_factory=dict)
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
    def judging(self) -> bool:
        """A judged window is in flight: the next tokens wait for its verdict (or run
        ahead of it)."""
        return self.flying > 0

    @property
    def ready(self) -> bool:
        return not self.done and not self.judging and self.pending > 0 and \
            (self.share is None or self.share_ready)

    @property
    def can_run_ahead(self) -> bool:
        """Another window may go out now, continuing the chain past the last one's link."""
        return not self.done and self.linked and 0 < self.flying < self.depth

    @property
    def front(self) -> int:
        """Where the next run-ahead window starts: the last link's position."""
        return len(self.tokens) + len(self.ahead) - 1

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.n_prompt

    def step_seed(self, start: int) -> int:
        """The last worker's seed for this sequence's judged window starting at `start`.

        A function of the request's seed, the tokens decided and the window's start — one
        value per window, run-ahead windows included — so a window re-sent after a worker
        loss draws exactly what it would have drawn."""
        if self.request.sampling.greedy:
            return 0  # greedy verification draws nothing
        # Python hashes tuples of ints the same in every process and run (no
        # PYTHONHASHSEED for ints); 70 µs a step cheaper than a numpy SeedSequence.
        return hash((self.seed_base, len(self.tokens), start)) & 0x7FFF_FFFF_FFFF_FFFF

    def sent(self, piece: Slice) -> None:
        """`piece` went out: its rows are in flight."""
        if piece.judge:
            self.flying += 1
            self.ahead += piece.guesses  # a run-ahead window's first row is the last link
            self.linked = piece.link >= 0
        # Past a link the next window starts at the end; else at the first guess.
        self.n_sent = piece.end if piece.link >= 0 else piece.end - piece.n_draft

    def break_chain(self) -> None:
        """The windows in flight assume tokens that were not decided: they are stale."""
        self.chain = new_chain()  # the windows of the old one are stale
        self.flying = 0
        self.ahead.clear()
        self.linked = False

    def confirm(self, piece: Slice, result: SeqResult | None) -> list[int]:
        """A batch holding `piece` came back: what the ring now holds, tokens decided."""
        if not piece.tokens:
            return []
        if result is None:  # a prompt chunk
            self.n_computed = max(self.n_computed, piece.end)
            return []
        self.flying -= 1
        accepted = len(result.accepted)
        self.n_computed = piece.end - piece.n_draft + min(accepted, piece.n_draft)
        # The last worker skips the windows behind a verdict by this same rule.
        if not result.breaks_chain:
            del self.ahead[:accepted]  # every guess and the link: the chain holds
            self.n_sent = max(self.n_sent, piece.end)
            self.linked = self.linked and self.flying > 0
        else:
            self.break_chain()
            self.n_sent = self.n_computed
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
        self.break_chain()
