"""Which rows go into the next micro-batch (vLLM v1's `schedule`, for a pipeline).

Decode rows first: each decoding sequence's pending token(s) plus its draft guesses,
then chunks of prompts, under a token budget. The rules, and why:
- At most ⌈decoding ÷ micro_batches⌉ decoding sequences per batch: with N stages, N
  batches must be in flight for every stage to be busy, and a sequence can be in only
  one of them (its next token needs its last verdict).
- While any sequence is decoding, a long prompt arrives in chunks that ride along with
  the decode rows instead of stalling them (chunked prefill, as llama-server and vLLM
  do): a batch holds at most `max_batch_tokens` rows, and no more than makes it last
  `max_stall` times a decode-only batch, by the ring's costs measured at start
  (t(rows) = a + b·rows). On a GPU a few hundred rows cost little more than one; on a
  CPU every row costs, and the bound keeps the streams' inter-token latency.
  With nobody decoding, a prompt goes in `prefill_chunk` pieces, several in flight back
  to back, so stage 0 computes chunk c+1 while stage 1 computes chunk c.
- A sequence decoded alone always gets the same batches: chunk boundaries at multiples
  of `prefill_chunk`, then one step at a time with a γ that depends only on its tokens.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

from coordinator.engine.sequence import Sequence


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_tokens: int = 512
    prefill_chunk: int = 256
    micro_batches: int = 1  # batches in flight; the engine's default is the stage count
    # A batch carrying prompt rows lasts at most this many decode-only batches. 2 keeps a
    # stream's p99 inter-token latency within 2.5× its p50 (bench/throughput.py, (d)).
    max_stall: float = 2.0
    row_cost: tuple[float, float] | None = None  # (a, b) seconds; None: no time bound

    def __post_init__(self) -> None:
        if self.max_batch_tokens < 1 or self.prefill_chunk < 1 or self.micro_batches < 1:
            raise ValueError("max_batch_tokens, prefill_chunk and micro_batches must be ≥ 1")
        if self.max_stall < 1:
            raise ValueError("max_stall must be ≥ 1")

    def rows_while_decoding(self, decode_rows: int) -> int:
        """The most rows a batch may hold beside `decode_rows` rows of decoding."""
        if self.row_cost is None:
            return self.max_batch_tokens
        a, b = self.row_cost
        if b <= 0:
            return self.max_batch_tokens
        bound = int((self.max_stall * (a + b * decode_rows) - a) / b)
        return max(min(bound, self.max_batch_tokens), decode_rows + 1)


@dataclass(frozen=True)
class Planned:
    seq: Sequence
    n_tokens: int  # pending tokens to send (from seq.n_sent on)
    gamma: int  # draft guesses to append (only when every pending token is sent)

    @property
    def judge(self) -> bool:
        return self.seq.n_sent + self.n_tokens == len(self.seq.tokens)


def schedule(running: list[Sequence], config: SchedulerConfig,
             gamma_of: Callable[[Sequence, int], int]) -> list[Planned]:
    """The next micro-batch's plan; empty when nothing can be sent now.

    `gamma_of(seq, room)` is the sequence's γ for its next step, at most `room`."""
    decoding = [s for s in running if s.decoding and not s.done]
    cap = math.ceil(len(decoding) / config.micro_batches)
    budget = config.max_batch_tokens if decoding else sys.maxsize
    plan: list[Planned] = []
    for s in sorted((s for s in decoding if s.ready), key=lambda s: s.slot)[:cap]:
        n = min(s.pending, budget)
        if n <= 0:
            break
        gamma = gamma_of(s, budget - n) if n == s.pending else 0
        plan.append(Planned(s, n, gamma))
        budget -= n + gamma
    if decoding:  # prompt rows only as far as the decoding streams can wait for them
        rows = sum(p.n_tokens + p.gamma for p in plan)
        budget = min(budget, config.rows_while_decoding(max(rows, cap)) - rows)
    prompts = sorted((s for s in running if not s.decoding and s.ready),
                     key=lambda s: s.arrived)
    for s in prompts:
        n = min(s.pending, config.prefill_chunk, budget)
        if n <= 0:
            break
        plan.append(Planned(s, n, 0))
        budget -= n
    return plan
