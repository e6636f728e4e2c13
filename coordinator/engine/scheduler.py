"""Which rows go into the next micro-batch (vLLM v1's `schedule`, for a pipeline).

Decode rows first: each decoding sequence's pending token(s) plus its draft guesses,
then chunks of prompts, under a token budget. The rules, and why:
- At most ⌈decoding ÷ micro_batches⌉ decoding sequences per batch: with N stages, N
  batches must be in flight for every stage to be busy, and a sequence can be in only
  one of them (its next token needs its last verdict). Those sequences are one lane:
  slots next to each other, as llama.cpp computes consecutive slots' rows in one pass
  over the weights and any other set in one pass per run of them (`_lane`).
- While any sequence is decoding, a long prompt arrives in chunks that ride along with
  the decode rows instead of stalling them (chunked prefill, as llama-server and vLLM
  do): a batch holds at most `max_batch_tokens` rows, and no more than makes it last
  `max_stall` times the decode-only batch the streams will make with the prompts that
  are one chunk from their first token — ⌈(decoding + those) ÷ micro_batches⌉ rows, or
  this batch's own decode rows if more — by the ring's costs measured at start
  (t(rows) = a + b·rows). A time budget per batch, as Sarathi-Serve's token budget from
  an inter-token-latency target: one long prompt cannot stretch the streams' steps,
  while short prompts arriving beside a few streams are not prefilled a row at a time.
  A prompt that finishes in the batch may stretch it to twice that (`FINISHING`): its
  stall is paid once, and it decodes beside the streams from the next step on.
  On a GPU a few hundred rows cost little more than one; on a CPU every row costs.
  With nobody decoding, a prompt goes in `prefill_chunk` pieces, several in flight back
  to back, so stage 0 computes chunk c+1 while stage 1 computes chunk c.
- A sequence decoded alone always gets the same batches: chunk boundaries at multiples
  of `prefill_chunk`, then one step at a time with a γ that depends only on its tokens.
- Run-ahead: while fewer sequences decode than micro-batches go round, the stages would
  idle between a sequence's windows; a sequence whose last window ends with a link sends
  the next window before the verdict (up to its depth). When other sequences fill the
  ring, nobody runs ahead.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace

from coordinator.engine.sequence import Sequence

# Rows of prompts that finish in the batch may stretch it to FINISHING × max_stall: that
# stall is paid once per prompt, which then decodes beside the streams (every later step
# fuller), where a long prompt's earlier chunks would stall every batch while it arrives.
# 8 chat clients arriving over a second: 18.4 tok/s at max_stall 2 without it, 22.1 at 4
# (bench/serve_load.py --max-stall; docs/scheduler.md).
FINISHING = 2.0


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_tokens: int = 512
    prefill_chunk: int = 256
    micro_batches: int = 1  # batches in flight; the engine's default is the stage count
    # A batch carrying prompt rows lasts at most this many decode-only batches: the
    # streams' inter-token latency while a prompt arrives (bench/throughput.py, (d)).
    # The rows are a llama_decode call of their own — on a GPU another read of the
    # stage's weights — so below 2 a GPU would carry one prompt row per batch.
    max_stall: float = 2.0
    # (a, b) seconds: one llama_decode call of r rows costs a + b·r through the ring,
    # measured at start. None: rows only (max_batch_tokens) bound a batch.
    row_cost: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.max_batch_tokens < 1 or self.prefill_chunk < 1 or self.micro_batches < 1:
            raise ValueError("max_batch_tokens, prefill_chunk and micro_batches must be ≥ 1")
        if self.max_stall < 1:
            raise ValueError("max_stall must be ≥ 1")

    def cost(self, lengths: list[int]) -> float:
        """A batch's time by its slices' row counts: one call per distinct length (the
        stage runs equal-length slices together, cluster/llama/stage.py)."""
        a, b = self.row_cost or (0.0, 0.0)
        return a * len(set(lengths)) + b * sum(lengths)


@dataclass(frozen=True)
class Planned:
    seq: Sequence
    n_tokens: int  # pending tokens to send (from seq.n_sent on); 1 when running ahead
    gamma: int  # draft guesses to append (only when every pending token is sent)
    ahead: bool = False  # a run-ahead window: its first row is the last window's link
    link: bool = False  # the window ends with a link: a window may follow before its verdict

    @property
    def judge(self) -> bool:
        return self.ahead or self.seq.n_sent + self.n_tokens == len(self.seq.tokens)

    @property
    def rows(self) -> int:
        return self.n_tokens + self.gamma


GammaOf = Callable[[Sequence, int, int], int]  # (sequence, room, at least) → γ; < 0: no room


def schedule(running: list[Sequence], config: SchedulerConfig,
             gamma_of: GammaOf) -> list[Planned]:
    """The next micro-batch's plan; empty when nothing can be sent now.

    `gamma_of(seq, room, at_least)` is the sequence's γ for its next step — at least
    `at_least` if its limits allow, at most `room`; negative for a run-ahead window that
    its limits leave no room for."""
    decoding = [s for s in running if s.decoding and not s.done]
    cap = math.ceil(len(decoding) / config.micro_batches)
    budget = config.max_batch_tokens if decoding else sys.maxsize
    spare = len(decoding) < config.micro_batches  # stages idle between their windows
    plan: list[Planned] = []
    for s in _lane([s for s in decoding if s.ready or (spare and s.can_run_ahead)],
                   decoding, cap):
        if not s.ready:
            gamma = gamma_of(s, budget - 1, 0)
            if budget >= 1 and gamma >= 0:
                plan.append(Planned(s, 1, gamma, ahead=True, link=True))
                budget -= 1 + gamma
            continue
        n = min(s.pending, budget)
        if n <= 0:
            break
        gamma = max(gamma_of(s, budget - n, 0), 0) if n == s.pending else 0
        # gamma_of has decided the sequence's depth for the chain this window starts
        plan.append(Planned(s, n, gamma, link=spare and s.depth > 1 and n == s.pending))
        budget -= n + gamma
    plan = _one_shape(plan, config, gamma_of, budget)
    budget = config.max_batch_tokens - sum(p.rows for p in plan) if decoding else sys.maxsize
    far = near = budget  # rows for prompts still chunks away / finishing in this batch
    if decoding and config.row_cost is not None:
        # Prompts one chunk from their first token decode beside the streams soon.
        soon = sum(not s.decoding and not s.done and s.pending <= config.prefill_chunk
                   for s in running)
        load = max(cap, math.ceil((len(decoding) + soon) / config.micro_batches))
        far = min(budget, _prompt_rows(plan, config, load, config.max_stall))
        near = min(budget, _prompt_rows(plan, config, load, FINISHING * config.max_stall))
    used = 0
    for s in sorted((s for s in running if not s.decoding and s.ready),
                    key=lambda s: s.arrived):
        room = near if s.pending <= config.prefill_chunk else far
        n = min(s.pending, config.prefill_chunk, room - used)
        if n <= 0:
            break
        plan.append(Planned(s, n, 0))
        used += n
    return plan


def _lane(candidates: list[Sequence], decoding: list[Sequence], cap: int
          ) -> list[Sequence]:
    """The decoding sequences this batch takes: the ready ones of one lane, the lane with
    the most of them (the lowest on a tie). Lanes are the decoding sequences by slot, cut
    in runs of `cap`. A stage's KV has one stream per slot, and llama.cpp puts only
    consecutive slots in one ubatch: a batch of slots 0, 2, 4, 6 is four passes over the
    stage's weights where 0, 1, 2, 3 is one (bench/slot_runs.py). Sequences that begin
    decoding one after another would otherwise alternate between the micro-batches and
    stay so; a batch of one lane keeps them together, and a lane split by a change in
    who decodes comes back together within a round."""
    if not candidates:
        return []
    order = sorted(decoding, key=lambda s: s.slot)
    lane = {id(s): i // cap for i, s in enumerate(order)}
    ready: dict[int, list[Sequence]] = {}
    for s in sorted(candidates, key=lambda s: s.slot):
        ready.setdefault(lane[id(s)], []).append(s)
    return max(ready.items(), key=lambda item: (len(item[1]), -item[0]))[1]


def _one_shape(plan: list[Planned], config: SchedulerConfig, gamma_of: GammaOf,
               budget: int) -> list[Planned]:
    """Give the decode slices one row count, with more guesses for the shorter ones,
    when the call that saves costs more than the rows it adds (a GPU: a call reads the
    stage's weights, a row costs almost nothing; a CPU: rows cost, calls do not)."""
    lengths = [p.rows for p in plan]
    if len(set(lengths)) < 2 or config.row_cost is None:
        return plan
    longest = max(lengths)
    raised = [replace(p, gamma=gamma_of(p.seq, p.gamma + budget, longest - p.n_tokens))
              if p.n_tokens == p.seq.pending and not p.ahead else p for p in plan]
    added = sum(p.rows for p in raised) - sum(lengths)
    if added > budget or config.cost([p.rows for p in raised]) >= config.cost(lengths):
        return plan
    return raised


def _prompt_rows(plan: list[Planned], config: SchedulerConfig, load: int,
                 stall: float) -> int:
    """Prompt rows the batch may add while sequences decode: its time stays within
    `stall` times a decode-only batch of `load` rows (or of this batch's own decode rows,
    when that costs more). At least one row: a prompt is never starved."""
    a, b = config.row_cost or (0.0, 0.0)
    lengths = [p.rows for p in plan]
    reference = max(config.cost(lengths) if lengths else 0.0, config.cost([1] * load))
    room = stall * reference - config.cost(lengths) - a  # a call of its own
    return max(int(room / b + 1e-9) if b > 0 else config.max_batch_tokens, 1)
