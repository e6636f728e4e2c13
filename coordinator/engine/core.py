"""The engine core: one owner for every running sequence (vLLM v1's EngineCore, pipelined).

    step():  take what arrived (verdicts, requests, cancellations, ring events)
             apply each to the sequences it concerns
             while a micro-batch slot is free: schedule, draft, submit
             → StepOutput: what was scheduled, what each verdict did

`step` is the only code that changes a sequence, and one thread runs it (`start`); the
ring's reader threads, the API and the rebuild only post messages to the inbox.
Recovery is a state, driven by those messages: running → recovering (a helper thread
rebuilds the ring and posts the result; the replay's batches come back as verdicts do)
→ running, or → down when the ring cannot be rebuilt, retried in the background while
new requests get 503. Output processing (text, stop strings, the thinking guard,
limits) is per request, in `output.py`.
"""

from __future__ import annotations

import enum
import logging
import queue
import statistics
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from cluster import trace
from cluster.errors import ClusterError, ClusterUnavailable, SpecshardError
from cluster.llama.context import decode_passes
from cluster.messages import Batch, SeqResult, Slice
from cluster.sampling import SamplingParams, SparseDist
from coordinator.constrain.hooks import decided_under, slice_guesses
from coordinator.engine.request import Failed, Finished, TextChunk
from coordinator.engine.scheduler import Planned, SchedulerConfig, schedule
from coordinator.engine.sequence import Sequence, Share
from coordinator.metrics import Metrics
from coordinator.ring.contract import (
    BatchDone,
    BatchFailed,
    Rebuilder,
    Ring,
    RingEvent,
    RingLost,
    Sink,
    WorkerLost,
)
from coordinator.ring.recovery import REPLAY_WINDOW, replay_plan
from coordinator.speculation.drafting import (
    Draft,
    Drafter,
    DraftRequest,
    common_prefix,
    draft_rng,
)
from coordinator.speculation.gamma import DraftCosts, GammaPolicy
from coordinator.tokenizer import Tokenizer

log = logging.getLogger(__name__)

MIN_SHARE = 32  # prompt positions worth a copy from another slot (docs/scheduler.md)
MAX_RECOVERIES = 5  # rebuilds in a row before the ring is reported down
DOWN_RETRY_S = 10.0  # while down, a rebuild is tried this often


class State(enum.Enum):
    RUNNING = "running"
    RECOVERING = "recovering"  # rebuilding the ring, or replaying into it
    DOWN = "down"  # could not rebuild: requests get 503, a rebuild is retried


# --- messages into the core ----------------------------------------------------------------

@dataclass(frozen=True)
class Admit:
    seq: Sequence


@dataclass(frozen=True)
class Cancel:
    seq: Sequence
    reason: str = "abort"


@dataclass(frozen=True)
class FromRing:
    epoch: int  # which ring it came from: events of a replaced ring are stale
    event: RingEvent


@dataclass(frozen=True)
class Rebuilt:
    epoch: int
    ring: Ring


@dataclass(frozen=True)
class RebuildFailed:
    epoch: int
    why: str


@dataclass(frozen=True)
class Stop:
    pass


Message = Admit | Cancel | FromRing | Rebuilt | RebuildFailed | Stop


# --- what a step did -----------------------------------------------------------------------

@dataclass(frozen=True)
class SeqOutcome:
    """What one verdict (or failure) did to a sequence."""

    seq: Sequence
    tokens: list[int]  # decided and appended this step
    finish: str | None = None  # "stop", "length", "abort", or "error"


@dataclass
class StepOutput:
    scheduled: list[Batch] = field(default_factory=list)
    outcomes: list[SeqOutcome] = field(default_factory=list)
    state: State = State.RUNNING


@dataclass(frozen=True)
class BatchTiming:
    """One batch's round trip (benches read these: hop time = wall − compute)."""

    rows: int
    wall_ms: float  # submitted → verdicts back
    stage_ms: dict[str, float]  # llama_decode time per worker
    busy_ms: dict[str, float]  # arrival → handed on, per non-last worker
    skipped_rows: int = 0  # rows the last worker did not compute (stale windows)


@dataclass
class InFlight:
    batch: Batch
    members: list[tuple[Sequence, Slice, int]]  # with the sequence's chain when sent
    sent_at: float
    replay: bool = False  # a replayed batch: rebuilds caches, decides nothing


class EngineCore:
    def __init__(self, ring: Ring, tokenizer: Tokenizer, config: SchedulerConfig,
                 drafter: Drafter | None = None, policy: GammaPolicy | None = None,
                 metrics: Metrics | None = None, rebuilder: Rebuilder | None = None,
                 batch_timeout_s: float = 600.0, cache_prompt: bool = True,
                 share_prefix: bool = True) -> None:
        self.ring = ring
        self.tokenizer = tokenizer
        self.config = config
        self.drafter = drafter
        self.policy = policy or GammaPolicy()
        self.metrics = metrics or Metrics()
        self.rebuilder = rebuilder
        self.batch_timeout_s = batch_timeout_s
        self.cache_prompt = cache_prompt
        self.share_prefix = share_prefix
        self.parallel = ring.n_seq
        self.inbox: queue.Queue[Message] = queue.Queue()
        self.state = State.RUNNING
        self.epoch = 0
        self.free_slots = list(range(self.parallel))
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # by slot
        self.in_flight: dict[int, InFlight] = {}  # by batch id
        self.frees: set[int] = set()  # slots to clear on every stage with the next batch
        # Idle caches to move, (from, to, positions), first thing in the next batch: a new
        # request takes a slot next to the decoding ones (`_place`).
        self.moves: list[tuple[int, int, int]] = []
        # Free slots whose caches (every stage's, and the draft's) still hold a finished
        # sequence's tokens: a new request that starts with them computes only the rest.
        self.cached: dict[int, list[int]] = {}
        self._used: dict[int, int] = {}  # slot → when it was last given out (LRU)
        self.timings: deque[BatchTiming] = deque(maxlen=4096)
        self._stage_series: dict[str, Any] = {}  # per-worker histogram children
        self._next_id = 1
        self._owner: int | None = None  # the thread that steps
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._ring_down = False  # the current ring refused a submit: its loss is coming
        self._lost_epoch = -1  # the epoch whose loss is being handled
        self._rebuilding = False  # a rebuild thread is running
        self._attempts = 0  # rebuilds tried since the ring was last running
        self._retry_at: float | None = None  # when to try the next rebuild
        self._replay: deque[list[Slice]] = deque()
        # One long-lived thread for rebuilds: a worker process it restarts dies with the
        # thread that started it (PR_SET_PDEATHSIG follows the thread, not the process).
        self._rebuild_thread = ThreadPoolExecutor(1, thread_name_prefix="ring-rebuild")
        self._lost_why = ""
        ring.connect(self._sink_for(self.epoch))
        self.metrics.slots_free.set(len(self.free_slots))
        self._set_state(State.RUNNING)

    # --- the loop ----------------------------------------------------------------------

    def start(self) -> EngineCore:
        self._thread = threading.Thread(target=self._loop, daemon=True, name="engine-core")
        self._thread.start()
        return self

    def reconnect(self) -> None:
        """Take the ring's events back after another engine borrowed the ring (the demo's
        comparison runs)."""
        self.ring.connect(self._sink_for(self.epoch))

    def post(self, message: Message) -> None:
        self.inbox.put(message)

    def _sink_for(self, epoch: int) -> Sink:
        return lambda event: self.post(FromRing(epoch, event))

    def _loop(self) -> None:
        while not self._stopping:
            try:
                self.step(self._wait_s())
            except Exception:  # a bug in scheduling: what runs cannot go on safely
                log.exception("engine step failed")
                for seq in [*self.running.values(), *self.waiting]:
                    self._finish(seq, error=ClusterError("the engine failed; see the "
                                                         "server log"))
        self._abort_all()

    def _wait_s(self) -> float:
        if self._retry_at is None or self._rebuilding:
            return 1.0
        return min(max(self._retry_at - time.monotonic(), 0.0), 1.0)

    def step(self, wait_s: float = 0.0) -> StepOutput:
        """Apply what arrived (waiting up to `wait_s` for the first message), then fill
        the free micro-batch slots. The only code that changes a sequence."""
        if self._owner is None:
            self._owner = threading.get_ident()
        elif self._owner != threading.get_ident():
            raise RuntimeError("EngineCore.step runs on one thread only")
        out = StepOutput()
        for message in self._take(wait_s):
            self._apply(message, out)
        if self._stopping:
            return out
        if self.state is State.RUNNING:
            self._fill(out)
        elif self._retry_at is not None and not self._rebuilding \
                and time.monotonic() >= self._retry_at:
            self._start_rebuild()
        self._check_deadlines()
        out.state = self.state
        return out

    def _take(self, wait_s: float) -> list[Message]:
        try:
            messages = [self.inbox.get(timeout=wait_s) if wait_s > 0 else
                        self.inbox.get_nowait()]
        except queue.Empty:
            return []
        while True:
            try:
                messages.append(self.inbox.get_nowait())
            except queue.Empty:
                return messages

    def _apply(self, message: Message, out: StepOutput) -> None:
        if isinstance(message, Admit):
            message.seq.claim()
            if self.state is State.DOWN:
                self._finish(message.seq, error=ClusterUnavailable(
                    f"the ring is down ({self._lost_why}); retry later"), out=out)
            else:
                self.waiting.append(message.seq)
                self.metrics.queue_depth.set(len(self.waiting))
        elif isinstance(message, Cancel):
            if message.seq in self.waiting:
                self.waiting.remove(message.seq)
                self.metrics.queue_depth.set(len(self.waiting))
            self._finish(message.seq, reason=message.reason, out=out)
        elif isinstance(message, Stop):
            self._stopping = True
        elif isinstance(message, Rebuilt):
            self._rebuilt(message)
        elif isinstance(message, RebuildFailed):
            if message.epoch == self.epoch:
                self._rebuilding = False
                self._rebuild_failed(message.why)
        elif message.epoch == self.epoch:
            event = message.event
            if isinstance(event, RingLost):
                self._lose(event.why)
            elif isinstance(event, BatchDone):
                self._update(event, out)
            else:
                self._refused(event, out)

    def _check_deadlines(self) -> None:
        now = time.perf_counter()
        late = [f for f in self.in_flight.values() if now - f.sent_at > self.batch_timeout_s]
        if late:
            self._lose(f"no answer for batch {late[0].batch.batch_id} in "
                       f"{self.batch_timeout_s:.0f} s")

    # --- schedule and submit -----------------------------------------------------------

    def _admit(self) -> None:
        while self.waiting and self._open():
            seq = self.waiting.popleft()
            if seq.done:
                continue
            slot, reused = self._place(*self._slot_for(seq))
            self.free_slots.remove(slot)
            self._used[slot] = self._next_id
            self.cached.pop(slot, None)
            self.frees.discard(slot)  # its first slice starts at `reused`: that clears it
            seq.slot = slot
            seq.acceptance = self.policy.new_stats()
            seq.reuse(reused, self._prefix_history(seq, reused))
            seq.share = self._share_for(seq, slot, reused)
            self.running[slot] = seq
        self._set_cached_metric()
        self.metrics.queue_depth.set(len(self.waiting))
        self.metrics.slots_free.set(len(self.free_slots))
        self.metrics.running.set(len(self.running))

    def _fill(self, out: StepOutput) -> None:
        self._admit()
        while len(self.in_flight) < self.config.micro_batches and not self._ring_down:
            for seq in self.running.values():
                if seq.share is not None:
                    self._resolve_share(seq)
            plan = schedule(list(self.running.values()), self.config, self._gamma)
            if not plan and (not (self.frees or self.moves) or self.in_flight):
                return  # frees ride along with the next real batch
            batch = self._build(plan, out)
            if not batch.slices:  # every planned sequence's window failed to build
                continue
            try:
                self._submit(batch)
            except Exception as exc:  # a batch the ring could not take: its sequences
                log.exception("submitting batch %d failed", batch.batch_id)
                self.in_flight.pop(batch.batch_id, None)
                error = ClusterError(f"sending a batch failed: {type(exc).__name__}: {exc}")
                self._unmoved(batch)
                for piece in batch.slices:
                    if piece.seq in self.running:
                        self._finish(self.running[piece.seq], error=error, out=out)
                continue
            out.scheduled.append(batch)

    def _open(self) -> list[int]:
        """Free slots a request may take now: not one an idle cache moves into with the
        next batch (a slot appears once in a batch)."""
        into = {dst for _, dst, _ in self.moves}
        return [s for s in self.free_slots if s not in into]

    def _slot_for(self, seq: Sequence) -> tuple[int, int]:
        """The free slot for `seq`, and how many of its prompt's tokens that slot's caches
        already hold (llama-server's slot choice by similarity): the longest cached
        prefix if it covers at least half of what the slot holds; otherwise the lowest
        empty slot (decoding sequences in consecutive slots share a pass over a stage's
        weights: docs/scheduler.md, Lanes), or else the least recently used one — a warm
        slot is never evicted while an empty one is free. At least the prompt's last
        token is computed (its logits)."""
        prompt = seq.tokens
        use = self.cache_prompt and seq.request.cache_prompt

        def shared(slot: int) -> int:
            return common_prefix(self.cached.get(slot, []), prompt) if use else 0

        free = self._open()
        best = max(free, key=lambda slot: (shared(slot), -self._used.get(slot, 0)))
        held = len(self.cached.get(best, []))
        if not held or 2 * shared(best) < held:
            best = min(free, key=lambda slot: (
                slot in self.cached, self._used.get(slot, 0) if slot in self.cached else 0,
                slot))
        return best, min(shared(best), len(prompt) - 1)

    def _place(self, chosen: int, reused: int) -> tuple[int, int]:
        """Where the request decodes: `chosen` (the slot whose cache it reuses, or the
        one to take) unless another free slot keeps the decoding sequences in fewer runs
        of consecutive slots — llama.cpp computes only consecutive sequences in one pass
        over a stage's weights (docs/scheduler.md, "Placement"). Then the request takes
        that slot: its own prefix is copied from `chosen` (`_share_for`), and the idle
        cache the slot held moves to `chosen` — or, when `chosen` holds the prefix, to an
        empty slot or the least recently used one. Returns the slot and how many prompt
        tokens its own cache holds."""
        busy = self.running

        def runs_added(slot: int) -> int:
            return 1 - (slot - 1 in busy) - (slot + 1 in busy)

        free = self._open()
        best = min(free, key=lambda s: (runs_added(s), s in self.cached, s))
        if runs_added(chosen) <= runs_added(best) or (reused and not self.share_prefix):
            return chosen, reused
        if best in self.cached:
            to = chosen
            if reused:  # `chosen` holds the prefix the request copies: not there
                others = [s for s in free if s not in (best, chosen)]
                if not others:
                    return chosen, reused
                to = min(others, key=lambda s: (s in self.cached, self._used.get(s, 0), s))
            self._move(best, to)
        return best, 0

    def _move(self, src: int, dst: int) -> None:
        """Move an idle slot's cache to another free slot on every stage (llama.cpp copies
        the KV stream) with the next batch; what `dst` held is evicted. The draft model's
        cache of it stays where it was (it copies by content when it can)."""
        held = self.cached.pop(src)
        self.cached[dst] = held
        self._used[dst] = self._used.get(src, 0)
        self.frees.discard(dst)
        self.moves.append((src, dst, len(held)))
        self.metrics.cache_moves.inc()
        for seq in self.running.values():  # a request yet to copy from it: from `dst`
            if seq.share is not None and seq.share.source is None and seq.share.slot == src:
                seq.share.slot = dst

    def _share_for(self, seq: Sequence, slot: int, reused: int) -> Share | None:
        """A longer prefix of `seq`'s prompt than its own slot holds, in another slot:
        a running sequence's prompt (computed, or being computed: `seq` then waits for
        it) or an idle slot's cache. Copied on every stage instead of computed again
        (conversations that share a system prompt, agents their tool schemas)."""
        if not (self.share_prefix and self.cache_prompt and seq.request.cache_prompt):
            return None
        prompt = seq.tokens
        best = Share(-1, None, 0, reused)
        for other, r in self.running.items():
            n = common_prefix(r.tokens[:r.n_prompt], prompt)
            if other != slot and not r.done and n > best.length:
                best = Share(other, r, n, reused)
        for other, held in self.cached.items():
            n = common_prefix(held, prompt)
            if other != slot and n > best.length:
                best = Share(other, None, n, reused)
        best.length = min(best.length, len(prompt) - 1)
        return best if best.length >= reused + MIN_SHARE else None

    def _resolve_share(self, seq: Sequence) -> None:
        """Before each batch, until `seq`'s first slice is sent: copy what its source
        holds now, wait while the source's prompt is still being sent, or — the source
        gone (finished uncached, its slot given out, the ring lost) — compute the prefix
        as if there were no source."""
        share = seq.share
        assert share is not None
        source, prompt = share.source, seq.tokens
        if source is not None and self.running.get(share.slot) is source:
            if not source.started or min(source.n_sent, source.n_prompt) < share.length:
                seq.share_ready = False  # the source sends its prompt first
                return
            held = common_prefix(source.tokens[:min(source.n_sent, source.n_prompt)], prompt)
        elif share.slot in self.cached:
            held = common_prefix(self.cached[share.slot], prompt)
        else:
            held = 0
        n = min(held, share.length)
        if n < share.own + MIN_SHARE:
            seq.share, seq.copy_from = None, -1
            seq.reuse(share.own, self._prefix_history(seq, share.own))
            return
        seq.share_ready, seq.copy_from = True, share.slot
        seq.reuse(n, self._prefix_history(seq, n))

    def _prefix_history(self, seq: Sequence, reused: int) -> list[tuple[int, Slice]]:
        """A reused prefix as replayable batches (in prompt-chunk pieces): a rebuilt
        ring's caches are empty, and the batches that computed the prefix were another
        request's."""
        chunk = self.config.prefill_chunk
        return [(self._new_batch_id(), Slice(seq=seq.slot, start=lo,
                                             tokens=seq.tokens[lo:min(lo + chunk, reused)],
                                             judge=False))
                for lo in range(0, reused, chunk)]

    def _gamma(self, seq: Sequence, room: int, at_least: int = 0) -> int:
        """γ for `seq`'s next window (a run-ahead one when it is judging): negative when
        a run-ahead window has no room left under the context or max_tokens."""
        if self.drafter is None:
            return 0
        if not seq.judging:  # a new chain: run ahead or not, by its history
            seq.depth = self._depth(seq)
        # The window emits up to γ + 1 tokens after the decided ones and the guesses
        # already sent (a link takes the bonus token's position).
        limit = min(room, self.ring.n_ctx - len(seq.tokens) - len(seq.ahead) - 1,
                    seq.request.max_tokens - seq.generated - len(seq.ahead) - 1)
        chosen = max(self.policy.choose(seq.acceptance, seq.stats.steps, seq.depth), at_least)
        return min(chosen, limit) if seq.judging else max(0, min(chosen, limit))

    def _depth(self, seq: Sequence) -> int:
        """Windows `seq` keeps in flight: 1 (synchronous) without a drafter, under a
        grammar (its masks follow the decided tokens) or with one micro-batch in flight."""
        if self.drafter is None or seq.request.constraint is not None \
                or self.config.micro_batches < 2:
            return 1
        return self.policy.depth(seq.acceptance, self.config.micro_batches)

    def _build(self, plan: list[Planned], out: StepOutput) -> Batch:
        drafts = self._drafts([p for p in plan if p.judge and p.gamma + p.link > 0], out)
        slices = []
        for p in plan:
            s = p.seq
            if s.done:  # its draft failed
                continue
            try:
                slices.append(self._window(p, drafts))
            except Exception as exc:  # this sequence's window (its grammar, say): it alone
                log.exception("building a window of sequence %d failed", s.slot)
                self._finish(s, error=ClusterError(f"{type(exc).__name__}: {exc}"), out=out)
        slices += [Slice(seq=slot, start=0, tokens=[], judge=False) for slot in self.frees]
        self.frees.clear()
        # Moves first: a stage copies in slice order, before any slice drops or adds rows.
        slices[:0] = [Slice(seq=dst, start=n, tokens=[], judge=False, copy_from=src)
                      for src, dst, n in self.moves]
        self.moves.clear()
        return Batch(self._new_batch_id(), slices)

    def _window(self, p: Planned, drafts: dict[int, tuple[list[int], list[SparseDist]]]
                ) -> Slice:
        """The planned rows of one sequence: prompt tokens, or a judged window."""
        s = p.seq
        start = s.front if p.ahead else s.n_sent
        tokens = [s.ahead[-1]] if p.ahead else s.tokens[s.n_sent:s.n_sent + p.n_tokens]
        guesses, dists = drafts.get(s.slot, ([], []))
        link = guesses[p.gamma] if p.link and len(guesses) > p.gamma else -1
        guesses, dists = guesses[:p.gamma], dists[:p.gamma + (link >= 0)]
        masks: list[bytes] = []
        if p.judge and s.request.constraint is not None:  # constrained decoding
            guesses, dists, masks = slice_guesses(s.request.constraint, guesses, dists)
        return Slice(
            seq=s.slot, start=start, tokens=[*tokens, *guesses], sampling=
            s.request.sampling, n_draft=len(guesses), draft_dists=list(dists),
            step_seed=s.step_seed(start) if p.judge else 0, judge=p.judge, masks=masks,
            copy_from=-1 if s.started else s.copy_from, link=link,
            chain=s.chain if p.judge else -1)

    def _drafts(self, plan: list[Planned], step: StepOutput
                ) -> dict[int, tuple[list[int], list[SparseDist]]]:
        """Guesses for the planned windows (γ, and a link when running ahead), one
        batched call, drafted after the decided tokens and the guesses already sent;
        reused when a window is sent again (after a worker loss), so a solo request's
        batches do not change. A sequence whose drafting fails is ended alone."""
        guesses: dict[int, tuple[list[int], list[SparseDist]]] = {}
        asks = []
        for p in plan:
            s = p.seq
            n = p.gamma + p.link
            at = (len(s.tokens), len(s.ahead))
            if at in s.drafts:
                kept, dists = s.drafts[at]
                guesses[s.slot] = (kept[:n], dists[:n])
            else:
                start = s.front if p.ahead else s.n_sent
                asks.append(DraftRequest(s.slot, [*s.tokens, *s.ahead], n,
                                         s.request.sampling, draft_rng(s.step_seed(start)),
                                         s.request.constraint))
        if asks and self.drafter is not None:
            t0 = time.perf_counter()
            for ask, draft in zip(asks, self._propose(self.drafter, asks), strict=True):
                seq = self.running[ask.seq]
                if isinstance(draft, Exception):
                    log.warning("drafting for sequence %d failed: %s", ask.seq, draft)
                    self._finish(seq, error=ClusterError(f"drafting failed: {draft}"),
                                 out=step)
                    continue
                seq.drafts = {at: d for at, d in seq.drafts.items()
                              if at[0] >= len(seq.tokens)}
                seq.drafts[(len(seq.tokens), len(seq.ahead))] = (draft.tokens,
                                                                 list(draft.dists))
                guesses[ask.seq] = (draft.tokens, list(draft.dists))
            self.metrics.draft_ms.observe(1000 * (time.perf_counter() - t0))
        return guesses

    @staticmethod
    def _propose(drafter: Drafter, asks: list[DraftRequest]) -> list[Draft | Exception]:
        """One batched call; when it fails, one call per sequence, to find whose it is."""
        try:
            return list(drafter.propose(asks))
        except Exception as exc:
            if len(asks) == 1:
                return [exc]
        drafts: list[Draft | Exception] = []
        for ask in asks:
            try:
                drafts.extend(drafter.propose([ask]))
            except Exception as exc:
                drafts.append(exc)
        return drafts

    def _submit(self, batch: Batch, replay: bool = False) -> None:
        members = [] if replay else [(self.running[s.seq], s, self.running[s.seq].chain)
                                     for s in batch.slices
                                     if s.seq in self.running and s.tokens]
        for seq, piece, _ in members:
            ahead = piece.judge and seq.judging  # sent before the verdict it continues
            seq.sent(piece)
            if piece.judge:
                seq.stats.ahead_windows += ahead
                self.metrics.windows.labels(kind="ahead" if ahead else "first").inc()
            if not seq.started:
                self._started(seq, piece)
        self.in_flight[batch.batch_id] = InFlight(batch, members, time.perf_counter(), replay)
        self.metrics.batch_rows.observe(batch.n_rows)
        if not replay:
            decode = [piece for seq, piece, _ in members if seq.decoding]
            self.metrics.batch_decode_rows.observe(sum(len(p.tokens) for p in decode))
            if decode:
                self.metrics.batch_decode_passes.observe(decode_passes(
                    [len(p.tokens) for p in decode], [p.seq for p in decode],
                    self.config.max_batch_tokens))
        try:
            self.ring.submit(batch)
        except WorkerLost as exc:  # handled like the ring's own report of the loss
            self._ring_down = True
            self.post(FromRing(self.epoch, RingLost(str(exc))))

    def _started(self, seq: Sequence, piece: Slice) -> None:
        """Its first slice is sent: what it reused is final."""
        seq.started = True
        seq.share, seq.copy_from = None, -1
        reused = seq.stats.n_cached_tokens
        self.metrics.prompt_tokens_reused.inc(reused)
        self.metrics.prompt_tokens_computed.inc(seq.n_prompt - reused)
        if piece.copy_from >= 0:
            self.metrics.prompt_tokens_copied.inc(piece.start)

    def _new_batch_id(self) -> int:
        batch_id, self._next_id = self._next_id, self._next_id + 1
        return batch_id

    # --- update from results -----------------------------------------------------------

    def _update(self, done: BatchDone, out: StepOutput) -> None:
        flight = self.in_flight.pop(done.result.batch_id, None)
        if flight is None:
            return
        if flight.replay:
            self._send_replay()
            return
        self._observe_times(flight, done)
        verdicts = {r.seq: r for r in done.result.results}
        for seq, piece, chain in flight.members:
            if seq.done:
                continue
            if piece.judge and chain != seq.chain:  # ran ahead of a verdict that broke it
                seq.stats.stale_windows += 1
                self.metrics.stale_windows.inc()
                skipped = verdicts.get(piece.seq)
                if skipped is not None and skipped.skipped:  # and the last worker knew
                    seq.stats.skipped_windows += 1
                    self.metrics.skipped_windows.inc()
                continue
            try:
                # Replayed if the ring is lost. A copied prefix is replayed from its tokens
                # (the history's first pieces): a rebuilt ring's source slot is empty.
                seq.history.append((flight.batch.batch_id, piece if piece.copy_from < 0
                                    else replace(piece, copy_from=-1)))
                self._verdict(seq, piece, verdicts.get(piece.seq) if piece.judge else None,
                              out)
            except Exception as exc:  # this sequence's failure, not its neighbours'
                log.exception("a verdict for sequence %d failed", piece.seq)
                self._finish(seq, error=exc if isinstance(exc, SpecshardError | ClusterError)
                             else ClusterError(f"{type(exc).__name__}: {exc}"), out=out)
        self._set_kv_metric()

    def _verdict(self, seq: Sequence, piece: Slice, result: SeqResult | None,
                 out: StepOutput) -> None:
        if piece.judge and result is None:
            raise ClusterError(f"the last worker sent no verdict for sequence {piece.seq}")
        if result is not None and result.skipped:  # a worker that thinks a chain broke
            raise ClusterError(f"the last worker skipped a live window of sequence "
                               f"{piece.seq} (chain {piece.chain})")
        if result is not None and result.error:
            raise ClusterError(f"the last worker could not judge this request: "
                               f"{result.error}")
        tokens = seq.confirm(piece, result)
        self._set_kv_metric()  # before the text goes out: a reader of /metrics sees it
        if result is None:
            return
        now = time.perf_counter()
        st = seq.stats
        st.steps += 1
        judged = len(piece.guesses)
        if judged:
            st.record_acceptance(judged, len(result.accepted))
            seq.acceptance.observe(judged, len(result.accepted))
        if not seq.decoding:
            st.prefill_s = now - seq.arrived
            seq.first_token_at = now
            self.metrics.ttft_s.observe(st.prefill_s)
        decided = seq.output.decide(tokens, result.top2_gaps)
        if seq.request.constraint is not None:  # the grammar advances; its end ends it
            decided = decided_under(seq.request.constraint, decided)
        seq.tokens.extend(decided.kept)
        if decided.forced:
            # What the model wrote after the token that triggered the guard never became
            # a token: the caches drop it with the next slice.
            seq.n_computed = min(seq.n_computed, len(seq.tokens))
            seq.n_sent = seq.n_computed
            seq.break_chain()
            seq.tokens.extend(decided.forced)
        st.n_tokens += len(decided.tokens)
        self.metrics.tokens_out.inc(len(decided.tokens))
        st.decode_s = now - seq.first_token_at
        if decided.text or decided.tokens:
            seq.sink(TextChunk(decided.text, decided.tokens,
                               decided.gaps if seq.request.with_gaps else [],
                               result.logprobs[:len(decided.kept)]))
        out.outcomes.append(SeqOutcome(seq, decided.tokens, decided.finish))
        if decided.finish is not None:
            self._finish(seq, reason=decided.finish)

    def _refused(self, failed: BatchFailed, out: StepOutput) -> None:
        """A worker refused a batch the engine built: a bug or a desync, not bad input
        (requests are checked before they are admitted). Its sequences fail; the rest go
        on. Their slots are cleared everywhere before reuse. A refused replay is a ring
        that cannot be rebuilt this way: recovery tries again."""
        flight = self.in_flight.pop(failed.batch_id, None)
        if flight is None:
            return
        if flight.replay:
            self._lose(f"{failed.worker} refused a replayed batch: {failed.message}")
            return
        error = ClusterError(f"{failed.worker} refused a batch: {failed.message}")
        log.error("%s", error)
        self._unmoved(flight.batch)
        for seq, _, _ in flight.members:
            self._finish(seq, error=error, out=out)

    def _unmoved(self, batch: Batch) -> None:
        """A batch that did not run on every stage: an idle cache it moved may not be
        where `cached` says. The slot is cleared everywhere instead."""
        for piece in batch.slices:
            if piece.copy_from >= 0 and not piece.tokens and piece.seq in self.cached:
                del self.cached[piece.seq]
                self.frees.add(piece.seq)
        self._set_cached_metric()

    def _observe_times(self, flight: InFlight, done: BatchDone) -> None:
        wall_ms = 1000 * (time.perf_counter() - flight.sent_at)
        trace.mark("verdict", flight.batch.batch_id)
        skipped = {r.seq for r in done.result.results if r.skipped}
        self.timings.append(BatchTiming(
            flight.batch.n_rows, wall_ms, done.stage_ms, done.busy_ms,
            sum(len(s.tokens) for s in flight.batch.slices if s.seq in skipped)))
        for worker, ms in done.stage_ms.items():
            series = self._stage_series.get(worker)
            if series is None:
                series = self._stage_series[worker] = self.metrics.stage_ms.labels(worker=worker)
            series.observe(ms)
        hops = len(done.stage_ms) + 1
        if done.stage_ms:
            self.metrics.hop_ms.observe(max(wall_ms - sum(done.stage_ms.values()), 0) / hops)

    def _set_kv_metric(self) -> None:
        self.metrics.kv_tokens.set(sum(s.n_computed for s in self.running.values()))

    def _set_cached_metric(self) -> None:
        self.metrics.kv_cached_tokens.set(sum(len(t) for t in self.cached.values()))

    # --- ending a sequence -------------------------------------------------------------

    def _finish(self, seq: Sequence, reason: str = "stop", error: BaseException | None = None,
                out: StepOutput | None = None) -> None:
        if seq.done:
            return
        seq.done = True
        if seq.slot >= 0 and self.running.get(seq.slot) is seq:
            del self.running[seq.slot]
            self.free_slots.append(seq.slot)
            self.free_slots.sort()
            if self.cache_prompt and error is None and self.state is State.RUNNING:
                # Positions below n_computed hold these tokens on every stage; batches
                # still in flight only touch positions from their start on, ≥ n_computed.
                # (Not while recovering: a rebuilt ring holds only what was replayed.)
                self.cached[seq.slot] = seq.tokens[:min(seq.n_computed, len(seq.tokens))]
            else:
                self.frees.add(seq.slot)
                if self.drafter is not None:
                    self.drafter.release(seq.slot)
            self._set_cached_metric()
        self._set_kv_metric()
        self.metrics.slots_free.set(len(self.free_slots))
        self.metrics.running.set(len(self.running))
        if out is not None:
            out.outcomes.append(SeqOutcome(seq, [], "error" if error else reason))
        if error is not None:
            cause = "client" if isinstance(error, SpecshardError) else "cluster"
            self.metrics.requests_failed.labels(cause=cause).inc()
            seq.sink(Failed(error))
            return
        tail = seq.output.tail()
        if tail:
            seq.sink(TextChunk(tail, []))
        self.metrics.observe_stats(seq.stats)
        seq.sink(Finished(reason, seq.n_prompt, seq.stats.n_tokens, seq.stats))

    def _abort_all(self) -> None:
        """The loop stopped: nobody waits for an answer that will not come."""
        for seq in [*self.running.values(), *self.waiting]:
            self._finish(seq, reason="abort")
        self.waiting.clear()

    # --- recovery ----------------------------------------------------------------------

    def _set_state(self, state: State) -> None:
        self.state = state
        for s in State:
            self.metrics.ring_state.labels(state=s.value).set(int(s is state))

    def _lose(self, why: str) -> None:
        """The current ring is lost: its batches in flight are gone. Sequences resume
        from what the caches surely held (`Sequence.rewind`) once a rebuilt ring has
        been replayed into; meanwhile they wait and new requests queue."""
        if self._lost_epoch == self.epoch:
            return  # this ring's loss is already being handled
        self._lost_epoch = self.epoch
        self._lost_why = why
        self.in_flight.clear()
        self.frees.clear()  # a rebuilt ring starts with every cache empty
        self.moves.clear()
        self.cached.clear()
        self._set_cached_metric()
        if self.drafter is not None:  # the draft's caches of idle slots go with them
            for slot in self.free_slots:
                self.drafter.release(slot)
        self._replay.clear()
        for seq in self.running.values():
            seq.rewind()
            if not seq.started:  # the replay computes its prefix: nothing to copy
                seq.share, seq.copy_from = None, -1
        if self.rebuilder is None:
            log.error("ring lost (%s) and nothing can rebuild it", why)
            self._give_up(WorkerLost(why), retry=False)
            return
        if self.state is State.RUNNING:
            log.warning("ring lost (%s): rebuilding it, then replaying %d sequences", why,
                        len(self.running))
            self._attempts = 0
        self._set_state(State.RECOVERING if self.state is not State.DOWN else State.DOWN)
        self._start_rebuild()

    def _start_rebuild(self) -> None:
        self.epoch += 1
        self._attempts += 1
        self._rebuilding = True
        self._retry_at = None
        rebuilder, epoch = self.rebuilder, self.epoch
        assert rebuilder is not None

        def rebuild() -> None:
            try:
                self.post(Rebuilt(epoch, rebuilder.rebuild(self._sink_for(epoch))))
            except Exception as exc:  # the engine decides what to do: retry, or give up
                self.post(RebuildFailed(epoch, f"{type(exc).__name__}: {exc}"))

        self._rebuild_thread.submit(rebuild)

    def _rebuilt(self, message: Rebuilt) -> None:
        if message.epoch != self.epoch:  # a rebuild superseded by a newer one
            message.ring.close()
            return
        self._rebuilding = False
        self.ring = message.ring
        self._ring_down = False
        self._replay = deque(replay_plan(list(self.running.values())))
        self._send_replay()

    def _send_replay(self) -> None:
        """Keep REPLAY_WINDOW replayed batches in flight; running again when all are
        back."""
        while self._replay and len(self.in_flight) < REPLAY_WINDOW and not self._ring_down:
            self._submit(Batch(self._new_batch_id(), self._replay.popleft()), replay=True)
        if not self._replay and not self.in_flight and not self._ring_down:
            log.info("ring rebuilt after %d attempt(s); %d sequences replayed",
                     self._attempts, len(self.running))
            self.metrics.restarts.inc()
            self._attempts = 0
            self._set_state(State.RUNNING)

    def _rebuild_failed(self, why: str) -> None:
        log.warning("rebuilding the ring failed (attempt %d): %s", self._attempts, why)
        if self.state is State.DOWN:
            self._retry_at = time.monotonic() + DOWN_RETRY_S
        elif self._attempts >= MAX_RECOVERIES:
            self._give_up(WorkerLost(f"the ring could not be rebuilt ({self._attempts} "
                                     f"attempts): {why}"), retry=True)
        else:
            self._retry_at = time.monotonic() + min(0.5 * 2 ** (self._attempts - 1), 10.0)

    def _give_up(self, error: ClusterError, retry: bool) -> None:
        """Fail what runs and waits (503: a client may retry); new requests get 503."""
        for seq in [*self.running.values(), *self.waiting]:
            self._finish(seq, error=error)
        self.waiting.clear()
        self._set_state(State.DOWN)
        self._retry_at = time.monotonic() + DOWN_RETRY_S if retry else None

    # --- calibration -------------------------------------------------------------------

    def calibrate(self, probe: list[int], guesses: int = 4, repeats: int = 3) -> DraftCosts:
        """Time verify passes of 1 and 1 + `guesses` tokens, on slot 0, and a draft token,
        before the loop starts: γ and the chunking beside decoding streams are decided
        from these numbers, never from live timings. `probe`: a few real token ids."""
        if self._thread is not None:
            raise RuntimeError("calibrate before start()")
        answers: queue.Queue[RingEvent] = queue.Queue()
        self.ring.connect(answers.put)

        def timed(*windows: list[Slice]) -> float:
            """Batches sent back to back; the time until the last is answered."""
            batches = [Batch(self._new_batch_id(), slices) for slices in windows]
            t0 = time.perf_counter()
            for batch in batches:
                self.ring.submit(batch)
            for batch in batches:
                try:
                    event = answers.get(timeout=self.batch_timeout_s)
                except queue.Empty:
                    raise WorkerLost("the ring did not answer while measuring its costs") \
                        from None
                if not isinstance(event, BatchDone) or \
                        event.result.batch_id != batch.batch_id:
                    raise ClusterError(f"measuring the ring's costs failed: {event}")
            return time.perf_counter() - t0

        stages = self.config.micro_batches
        try:
            n = len(probe)
            timed([Slice(0, 0, probe[:-1], judge=False)])
            one = [timed([Slice(0, n - 1, probe[-1:])]) for _ in range(repeats)]
            window = [Slice(0, n - 1, [*probe[-1:], *probe[:guesses]], n_draft=guesses)]
            many = [timed(window) for _ in range(repeats)]
            # A run-ahead window right behind it (the positions that follow): what the
            # second adds is what a window costs when the stages overlap.
            behind = [Slice(0, n + guesses, probe[guesses:2 * guesses + 1], n_draft=guesses)]
            pair = [timed(window, behind) for _ in range(repeats)] if stages > 1 else []
            timed([Slice(0, 0, [], judge=False)])
        finally:
            self.ring.connect(self._sink_for(self.epoch))
        draft = 0.0
        if self.drafter is not None:
            sampling = SamplingParams()

            def drafting(context: list[int]) -> float:
                assert self.drafter is not None
                t0 = time.perf_counter()
                self.drafter.propose([DraftRequest(0, context, guesses, sampling,
                                                   draft_rng(0))])
                return time.perf_counter() - t0

            drafting(probe)
            draft = statistics.median(drafting([*probe, probe[k]]) for k in range(repeats))
            self.drafter.release(0)
        t_many = statistics.median(many)
        overlap = (statistics.median(pair) - t_many) / (t_many / stages) if pair else 1.0
        costs = DraftCosts.measured(draft / guesses, statistics.median(one), t_many,
                                    guesses + 1, overlap)
        self.use_costs(costs)
        log.info("ring and draft costs: %s", costs.as_dict())
        return costs

    def use_costs(self, costs: DraftCosts) -> None:
        """Decide γ and the rows a batch may hold beside decoding streams by these."""
        self.policy = replace(self.policy, costs=costs)
        self.config = replace(self.config, row_cost=(costs.verify_a, costs.verify_b))

    # --- shutdown ----------------------------------------------------------------------

    def stop(self) -> None:
        self.post(Stop())
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._rebuild_thread.shutdown(wait=False, cancel_futures=True)
