"""The engine core: one loop owns every running sequence (vLLM v1's EngineCore, pipelined).

    while running:
        while a micro-batch slot is free and the scheduler has rows: draft, submit
        wait for one message (a verdict, a new request, a cancellation, a lost worker)
        update the sequences it concerns

Everything that changes a sequence happens under one lock (`_step`), taken by this
loop's thread — and by a ring thread that reads a verdict while the loop waits and
nothing older is queued: that thread updates the sequences and submits the next batch
itself, one thread hand-off less per token (docs/overhead.md). Other threads talk to
the core only through the inbox. Recovery is written next to the step it repairs
(`_recover`, on the loop's thread only): rebuild the ring, replay what the lost caches
held, carry on.
"""

from __future__ import annotations

import logging
import queue
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

from cluster import trace
from cluster.errors import SpecshardError
from cluster.messages import Batch, SeqResult, Slice
from cluster.sampling import SamplingParams, SparseDist
from coordinator.engine.request import Failed, Finished, TextChunk
from coordinator.engine.scheduler import Planned, SchedulerConfig, schedule
from coordinator.engine.sequence import Sequence
from coordinator.metrics import Metrics
from coordinator.ring.grpc_ring import BatchDone, BatchFailed, RingEvent, RingLost, WorkerLost
from coordinator.ring.recovery import Rebuilder, Ring, replay_batches
from coordinator.speculation.drafting import Drafter, DraftRequest, draft_rng
from coordinator.speculation.gamma import DraftCosts, GammaPolicy
from coordinator.tokenizer import Tokenizer

log = logging.getLogger(__name__)

MAX_RECOVERIES = 5  # in a row: a ring that keeps failing is reported, not retried forever


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
class Stop:
    pass


Message = Admit | Cancel | FromRing | Stop


@dataclass(frozen=True)
class BatchTiming:
    """One batch's round trip (benches read these: hop time = wall − compute)."""

    rows: int
    wall_ms: float  # submitted → verdicts back
    stage_ms: dict[str, float]  # llama_decode time per worker
    busy_ms: dict[str, float]  # arrival → handed on, per non-last worker


@dataclass
class InFlight:
    batch: Batch
    members: list[tuple[Sequence, Slice]]
    sent_at: float


class EngineCore:
    def __init__(self, ring: Ring, tokenizer: Tokenizer, config: SchedulerConfig,
                 drafter: Drafter | None = None, policy: GammaPolicy | None = None,
                 metrics: Metrics | None = None, rebuilder: Rebuilder | None = None,
                 batch_timeout_s: float = 600.0) -> None:
        self.ring = ring
        self.tokenizer = tokenizer
        self.config = config
        self.drafter = drafter
        self.policy = policy or GammaPolicy()
        self.metrics = metrics or Metrics()
        self.rebuilder = rebuilder
        self.batch_timeout_s = batch_timeout_s
        self.parallel = ring.n_seq
        self.inbox: queue.Queue[Message] = queue.Queue()
        self._step = threading.Lock()  # held while anything here changes
        self._ready = threading.Event()  # set when the inbox gets a message
        self._ring_down = False  # a submit found the ring lost: recovery is queued
        self.epoch = 0
        self.free_slots = list(range(self.parallel))
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # by slot
        self.in_flight: dict[int, InFlight] = {}
        self.frees: set[int] = set()  # slots to clear on every stage with the next batch
        self.timings: deque[BatchTiming] = deque(maxlen=4096)
        self._stage_series: dict[str, Any] = {}  # per-worker histogram children
        self._next_id = 1
        self._thread: threading.Thread | None = None
        self._stopping = False
        ring.connect(self._sink_for(self.epoch))
        self.metrics.slots_free.set(len(self.free_slots))

    # --- the loop ----------------------------------------------------------------------

    def start(self) -> EngineCore:
        self._thread = threading.Thread(target=self._loop, daemon=True, name="engine-core")
        self._thread.start()
        return self

    def post(self, message: Message) -> None:
        self.inbox.put(message)
        self._ready.set()

    def _sink_for(self, epoch: int):  # type: ignore[no-untyped-def]
        return lambda event: self._from_ring(FromRing(epoch, event))

    def _from_ring(self, message: FromRing) -> None:
        """A ring thread's event. A verdict that finds the loop waiting (the step lock
        free) and nothing older queued is handled right here, and the next batch sent
        from here: the loop's thread would have to wake first. Anything else — and
        everything before start() or during a recovery, which holds the lock — queues."""
        if isinstance(message.event, BatchDone) and self._thread is not None \
                and self._step.acquire(blocking=False):
            try:
                if self.inbox.empty() and not self._stopping:
                    self._guarded(self._handle, message)
                    self._guarded(self._fill)
                    return
            finally:
                self._step.release()
        self.post(message)

    def _loop(self) -> None:
        while not self._stopping:
            self._ready.clear()  # before draining: a message posted after it sets it again
            with self._step:
                while not self._stopping:
                    try:
                        message = self.inbox.get_nowait()
                    except queue.Empty:
                        break
                    self._guarded(self._handle, message)
                if self._stopping:
                    return
                self._guarded(self._fill)
                self._guarded(self._check_deadlines)
            self._ready.wait(timeout=1.0)

    def _guarded(self, step: Any, *args: object) -> None:
        try:
            step(*args)
        except Exception as exc:  # a bug: fail what runs, keep the loop for the rest
            log.exception("engine step failed")
            for seq in [*self.running.values(), *self.waiting]:
                self._finish(seq, error=exc)

    def _handle(self, message: Message) -> None:
        if isinstance(message, Admit):
            self.waiting.append(message.seq)
            self.metrics.queue_depth.set(len(self.waiting))
        elif isinstance(message, Cancel):
            if message.seq in self.waiting:
                self.waiting.remove(message.seq)
                self.metrics.queue_depth.set(len(self.waiting))
            if not message.seq.done:
                self._finish(message.seq, reason=message.reason)
        elif isinstance(message, Stop):
            self._stopping = True
        elif message.epoch == self.epoch:
            event = message.event
            if isinstance(event, BatchDone):
                self._update(event)
            elif isinstance(event, BatchFailed):
                self._refused(event)
            else:
                self._recover(event.why)

    def _check_deadlines(self) -> None:
        now = time.perf_counter()
        late = [f for f in self.in_flight.values() if now - f.sent_at > self.batch_timeout_s]
        if late:
            self._recover(f"no answer for batch {late[0].batch.batch_id} in "
                          f"{self.batch_timeout_s:.0f} s")

    # --- schedule and submit -----------------------------------------------------------

    def _admit(self) -> None:
        while self.waiting and self.free_slots:
            seq = self.waiting.popleft()
            if seq.done:
                continue
            seq.slot = self.free_slots.pop(0)
            seq.acceptance = self.policy.new_stats()
            self.frees.discard(seq.slot)  # its first slice starts at 0: that clears it
            self.running[seq.slot] = seq
        self.metrics.queue_depth.set(len(self.waiting))
        self.metrics.slots_free.set(len(self.free_slots))
        self.metrics.running.set(len(self.running))

    def _fill(self) -> None:
        self._admit()
        while len(self.in_flight) < self.config.micro_batches and not self._ring_down:
            plan = schedule(list(self.running.values()), self.config, self._gamma)
            if not plan and not self.frees:
                return
            if not plan and self.in_flight:
                return  # frees ride along with the next real batch
            self._submit(self._build(plan))

    def _gamma(self, seq: Sequence, room: int, at_least: int = 0) -> int:
        if self.drafter is None:
            return 0
        limit = min(room, self.ring.n_ctx - len(seq.tokens) - 1,
                    seq.request.max_tokens - seq.generated - 1)
        chosen = max(self.policy.choose(seq.acceptance, seq.stats.steps), at_least)
        return max(0, min(chosen, limit))

    def _build(self, plan: list[Planned]) -> Batch:
        drafts = self._drafts([p for p in plan if p.gamma > 0 and p.judge])
        slices = []
        for p in plan:
            s = p.seq
            tokens = s.tokens[s.n_sent:s.n_sent + p.n_tokens]
            guesses, dists = drafts.get(s.slot, ([], []))
            slices.append(Slice(
                seq=s.slot, start=s.n_sent, tokens=[*tokens, *guesses], sampling=
                s.request.sampling, n_draft=len(guesses), draft_dists=list(dists),
                step_seed=s.step_seed() if p.judge else 0, judge=p.judge))
        slices += [Slice(seq=slot, start=0, tokens=[], judge=False) for slot in self.frees]
        self.frees.clear()
        batch_id, self._next_id = self._next_id, self._next_id + 1
        return Batch(batch_id, slices)

    def _drafts(self, plan: list[Planned]) -> dict[int, tuple[list[int], list[SparseDist]]]:
        """Guesses for the planned sequences, one batched call; reused when a step is
        sent again (after a worker loss), so a solo request's batches do not change."""
        out: dict[int, tuple[list[int], list[SparseDist]]] = {}
        asks = []
        for p in plan:
            s = p.seq
            if s.last_draft is not None and s.last_draft[0] == len(s.tokens):
                out[s.slot] = (s.last_draft[1][:p.gamma], s.last_draft[2][:p.gamma])
            else:
                asks.append(DraftRequest(s.slot, s.tokens, p.gamma, s.request.sampling,
                                         draft_rng(s.step_seed())))
        if asks and self.drafter is not None:
            t0 = time.perf_counter()
            for ask, draft in zip(asks, self.drafter.propose(asks), strict=True):
                seq = self.running[ask.seq]
                seq.last_draft = (len(seq.tokens), draft.tokens, list(draft.dists))
                out[ask.seq] = (draft.tokens, list(draft.dists))
            self.metrics.draft_ms.observe(1000 * (time.perf_counter() - t0))
        return out

    def _submit(self, batch: Batch) -> None:
        members = [(self.running[s.seq], s) for s in batch.slices if s.seq in self.running
                   and s.tokens]
        for seq, piece in members:
            seq.n_sent = piece.end - piece.n_draft
            seq.in_flight += 1
            seq.judging = seq.judging or piece.judge
        self.in_flight[batch.batch_id] = InFlight(batch, members, time.perf_counter())
        self.metrics.batch_rows.observe(batch.n_rows)
        try:
            self.ring.submit(batch)
        except WorkerLost as exc:  # recovery runs on the loop's thread, this may be a ring's
            self._ring_down = True
            self.post(FromRing(self.epoch, RingLost(str(exc))))

    # --- update from results -----------------------------------------------------------

    def _update(self, done: BatchDone) -> None:
        flight = self.in_flight.pop(done.result.batch_id, None)
        if flight is None:
            return
        self._observe_times(flight, done)
        verdicts = {r.seq: r for r in done.result.results}
        for seq, piece in flight.members:
            seq.in_flight -= 1
            if seq.done:
                continue
            seq.history.append((flight.batch.batch_id, piece))  # replayed without verdicts
            result = verdicts.get(piece.seq) if piece.judge else None
            if piece.judge and result is None:
                self._finish(seq, error=SpecshardError(
                    f"the last worker sent no verdict for sequence {piece.seq}"))
                continue
            decided = seq.confirm(piece, result)
            if result is not None:
                self._decided(seq, piece, result, decided)
        self._set_kv_metric()

    def _decided(self, seq: Sequence, piece: Slice, result: SeqResult, tokens: list[int]
                 ) -> None:
        now = time.perf_counter()
        st = seq.stats
        st.steps += 1
        if piece.n_draft:
            st.record_acceptance(piece.n_draft, len(result.accepted))
            seq.acceptance.observe(piece.n_draft, len(result.accepted))
        if not seq.decoding:
            st.prefill_s = now - seq.arrived
            seq.first_token_at = now
            self.metrics.ttft_s.observe(st.prefill_s)
        emitted: list[int] = []
        gaps: list[float] = []
        text = ""
        reason = None
        for i, token in enumerate(tokens):
            seq.tokens.append(token)
            emitted.append(token)
            gaps.append(result.top2_gaps[i])
            st.n_tokens += 1
            self.metrics.tokens_out.inc()
            if self.tokenizer.is_end(token) and not seq.request.ignore_eos:
                reason = "stop"
                break
            piece_text = seq.text.push(token)
            text += seq.stop.push(piece_text)
            if seq.stop.stopped:
                reason = "stop"
                break
            forced = seq.request.guard.push(piece_text) if seq.request.guard else None
            if forced:
                added, added_text = self._force(seq, forced)
                emitted += added
                gaps += [0.0] * len(added)  # decided by the guard, not by a margin
                text += seq.stop.push(added_text)
                if seq.stop.stopped:
                    reason = "stop"
                    break
            if seq.generated >= seq.request.max_tokens or len(seq.tokens) >= self.ring.n_ctx:
                reason = "length"
                break
            if forced:
                break
        st.decode_s = now - seq.first_token_at
        if text or emitted:
            seq.sink(TextChunk(text, emitted, gaps if seq.request.with_gaps else []))
        if reason is not None:
            self._finish(seq, reason=reason)

    def _force(self, seq: Sequence, text: str) -> tuple[list[int], str]:
        """Append text the guard decided on, as far as max_tokens and the context allow;
        what the model wrote after the token that triggered it was never appended, and
        leaves the caches with the next slice."""
        seq.n_computed = min(seq.n_computed, len(seq.tokens))
        seq.n_sent = seq.n_computed
        room = min(seq.request.max_tokens - seq.generated, self.ring.n_ctx - len(seq.tokens))
        forced = self.tokenizer.encode(text, special=True, add_bos=False)[:max(room, 0)]
        seq.tokens.extend(forced)
        seq.stats.n_tokens += len(forced)
        return forced, "".join(seq.text.push(token) for token in forced)

    def _refused(self, failed: BatchFailed) -> None:
        """A worker refused a batch the engine built: a bug or a desync, not bad input
        (requests are checked before they are admitted). Its sequences fail; the rest go
        on. Their slots are cleared everywhere before reuse."""
        flight = self.in_flight.pop(failed.batch_id, None)
        if flight is None:
            return
        error = SpecshardError(f"{failed.worker} refused a batch: {failed.message}")
        log.error("%s", error)
        for seq, _ in flight.members:
            seq.in_flight -= 1
            if not seq.done:
                self._finish(seq, error=error)

    def _observe_times(self, flight: InFlight, done: BatchDone) -> None:
        wall_ms = 1000 * (time.perf_counter() - flight.sent_at)
        trace.mark("verdict", flight.batch.batch_id)
        self.timings.append(BatchTiming(flight.batch.n_rows, wall_ms, done.stage_ms,
                                        done.busy_ms))
        for worker, ms in done.stage_ms.items():
            series = self._stage_series.get(worker)
            if series is None:
                series = self._stage_series[worker] = self.metrics.stage_ms.labels(worker=worker)
            series.observe(ms)
        hops = len(done.stage_ms) + 1
        if done.stage_ms:
            self.metrics.hop_ms.observe(max(wall_ms - sum(done.stage_ms.values()), 0) / hops)

    def _set_kv_metric(self) -> None:
        held = sum(s.n_computed for s in self.running.values())
        self.metrics.kv_tokens.set(held)

    # --- ending a sequence -------------------------------------------------------------

    def _finish(self, seq: Sequence, reason: str = "stop",
                error: BaseException | None = None) -> None:
        if seq.done:
            return
        seq.done = True
        if seq.slot >= 0 and self.running.get(seq.slot) is seq:
            del self.running[seq.slot]
            self.free_slots.append(seq.slot)
            self.free_slots.sort()
            self.frees.add(seq.slot)
            if self.drafter is not None:
                self.drafter.release(seq.slot)
        self.metrics.slots_free.set(len(self.free_slots))
        self.metrics.running.set(len(self.running))
        if error is not None:
            self.metrics.requests_failed.inc()
            seq.sink(Failed(error))
            return
        tail = seq.stop.flush() if not seq.stop.stopped else ""
        if tail:
            seq.sink(TextChunk(tail, []))
        self.metrics.observe_stats(seq.stats)
        seq.sink(Finished(reason, seq.n_prompt, seq.stats.n_tokens, seq.stats.as_dict(),
                          seq.stats))

    # --- recovery ----------------------------------------------------------------------

    def _recover(self, why: str) -> None:
        """A worker is lost: rebuild the ring, replay every live sequence, carry on.

        The batches in flight are lost; their sequences resume from what the caches held
        (`Sequence.rewind`). The replay re-sends each completed batch, restricted to the
        live sequences, so a sequence that ran alone rebuilds bit-identical caches."""
        self._ring_down = False
        if self.rebuilder is None:
            for seq in list(self.running.values()):
                self._finish(seq, error=WorkerLost(why))
            self.in_flight.clear()
            return
        log.warning("ring lost (%s): rebuilding and replaying %d sequences", why,
                    len(self.running))
        self.in_flight.clear()
        self.frees.clear()
        for seq in self.running.values():
            seq.rewind()
        for attempt in range(1, MAX_RECOVERIES + 1):
            self.epoch += 1
            try:
                self.ring = self.rebuilder.rebuild(self._sink_for(self.epoch))
                replay_batches(self.ring, list(self.running.values()), self._next_batch_id,
                               self._replay_wait)
                self.metrics.restarts.inc()
                return
            except (WorkerLost, SpecshardError) as exc:
                log.warning("recovery attempt %d failed: %s", attempt, exc)
                time.sleep(min(2.0 * attempt, 10.0))
        error = WorkerLost(f"the ring failed {MAX_RECOVERIES} times in a row: {why}")
        for seq in list(self.running.values()):
            self._finish(seq, error=error)

    def _next_batch_id(self) -> int:
        batch_id, self._next_id = self._next_id, self._next_id + 1
        return batch_id

    def _replay_wait(self, batch_ids: set[int]) -> None:
        """Wait until the replayed batches come back; keep other messages for later."""
        kept: list[Message] = []
        try:
            while batch_ids:
                message = self.inbox.get(timeout=self.batch_timeout_s)
                if isinstance(message, FromRing):
                    if message.epoch != self.epoch:
                        continue
                    event = message.event
                    if isinstance(event, BatchDone):
                        batch_ids.discard(event.result.batch_id)
                        continue
                    if isinstance(event, RingLost):
                        raise WorkerLost(event.why)
                    raise SpecshardError(f"replay refused by {event.worker}: {event.message}")
                kept.append(message)
        except queue.Empty:
            raise WorkerLost("the replay got no answer") from None
        finally:
            for message in kept:
                self.inbox.put(message)

    # --- calibration -------------------------------------------------------------------

    def calibrate(self, probe: list[int], guesses: int = 4, repeats: int = 3) -> DraftCosts:
        """Time verify passes of 1 and 1 + `guesses` tokens, on slot 0, and a draft token,
        before the loop starts: γ and the chunking beside decoding streams are decided
        from these numbers, never from live timings. `probe`: a few real token ids."""
        if self._thread is not None:
            raise RuntimeError("calibrate before start()")

        def timed(slices: list[Slice]) -> float:
            batch = Batch(self._next_batch_id(), slices)
            t0 = time.perf_counter()
            self.ring.submit(batch)
            self._replay_wait({batch.batch_id})
            return time.perf_counter() - t0

        n = len(probe)
        timed([Slice(0, 0, probe[:-1], judge=False)])
        one = [timed([Slice(0, n - 1, probe[-1:])]) for _ in range(repeats)]
        many = [timed([Slice(0, n - 1, [*probe[-1:], *probe[:guesses]], n_draft=guesses)])
                for _ in range(repeats)]
        timed([Slice(0, 0, [], judge=False)])
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
        costs = DraftCosts.measured(draft / guesses, statistics.median(one),
                                    statistics.median(many), guesses + 1)
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
